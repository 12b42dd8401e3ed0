//! Several inference-svc replicas, each with its own fake vLLM (one per
//! GPU), behind one in-process session-svc with an in-memory store: what
//! the balancing tests and the balancing benchmark run on.

use std::time::Duration;

use palaver_core::projects::Projects;
use palaver_proto::session::v1::sessions_client::SessionsClient;
use palaver_proto::session::v1::{chat_event, ChatRequest};
use palaver_testkit::fake_vllm::{FakeVllm, FakeVllmConfig};
use prometheus_client::registry::Registry;
use session_svc::balance::{BalanceConfig, Balancer, Policy};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// How often inference-svc checks its model server and session-svc its
/// replicas, in these tests.
pub const HEALTH_INTERVAL: Duration = Duration::from_millis(200);

/// No rate limit, room for every turn's history.
pub fn roomy_projects() -> Projects {
    Projects::from_toml(
        "[projects.general]\nrate_limit = 0\nmax_history_messages = 1000\nmax_history_tokens = 1000000\n",
    )
    .unwrap()
}

/// A fake vLLM behind its own inference-svc (limit 8).
pub struct Replica {
    pub fake: FakeVllm,
    pub url: String,
    /// Stops this replica's inference-svc (it drains, then its port closes).
    pub stop: CancellationToken,
}

pub struct Cluster {
    pub replicas: Vec<Replica>,
    pub client: SessionsClient<Channel>,
    pub balancer: Balancer,
    pub shutdown: CancellationToken,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn bind() -> (TcpListener, String) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    (l, url)
}

/// `n` replicas; session-svc is told about the first `known` of them.
pub async fn cluster(n: usize, known: usize, fake: FakeVllmConfig) -> Cluster {
    cluster_with(n, known, fake, Policy::Affinity).await
}

/// [`cluster`] with a choice of balancing policy.
pub async fn cluster_with(n: usize, known: usize, fake: FakeVllmConfig, policy: Policy) -> Cluster {
    crate::init_logging();
    let shutdown = CancellationToken::new();
    let mut replicas = Vec::new();
    for _ in 0..n {
        let fake = FakeVllm::start(fake.clone()).await;
        let mut cfg = inference_svc::Config::openai(fake.url());
        cfg.model_health_interval = HEALTH_INTERVAL;
        let server = inference_svc::Server::new(cfg, &mut Registry::default()).unwrap();
        let (listener, url) = bind().await;
        let stop = shutdown.child_token();
        tokio::spawn(server.serve(listener, stop.clone()));
        replicas.push(Replica { fake, url, stop });
    }
    let urls: Vec<&str> = replicas[..known].iter().map(|r| r.url.as_str()).collect();
    let mut cfg = session_svc::Config::new(urls.join(","));
    cfg.projects = roomy_projects();
    cfg.balance = BalanceConfig {
        probe: HEALTH_INTERVAL,
        policy,
        ..BalanceConfig::default()
    };
    let server = session_svc::Server::new(
        cfg,
        session_svc::MemoryStore::new(),
        &mut Registry::default(),
    )
    .unwrap();
    let balancer = server.balancer();
    let (listener, url) = bind().await;
    tokio::spawn(server.serve(listener, shutdown.clone()));
    let client = SessionsClient::connect(url).await.unwrap();
    Cluster {
        replicas,
        client,
        balancer,
        shutdown,
    }
}

pub fn session(i: usize) -> String {
    format!("s-{i:03}")
}

/// One turn, unary or streamed; the reply's text.
pub async fn turn(
    mut c: SessionsClient<Channel>,
    session_id: String,
    n: usize,
    stream: bool,
) -> Result<String, tonic::Status> {
    let req = ChatRequest {
        project: "general".into(),
        session_id: session_id.clone(),
        message: format!("{session_id} turn {n}"),
        request_id: format!("{session_id}-{n}"),
        ..Default::default()
    };
    if !stream {
        return Ok(c.chat(req).await?.into_inner().text);
    }
    let mut events = c.chat_stream(req).await?.into_inner();
    while let Some(ev) = events.message().await? {
        if let Some(chat_event::Event::Done(done)) = ev.event {
            return Ok(done.text);
        }
    }
    Err(tonic::Status::internal("stream ended without done"))
}

/// A streamed turn's time to its first token (first delta), and its text.
pub async fn timed_turn(
    mut c: SessionsClient<Channel>,
    session_id: &str,
    message: String,
) -> Result<(Duration, String), tonic::Status> {
    let start = Instant::now();
    let req = ChatRequest {
        project: "general".into(),
        session_id: session_id.into(),
        message,
        ..Default::default()
    };
    let mut events = c.chat_stream(req).await?.into_inner();
    let mut first = None;
    while let Some(ev) = events.message().await? {
        match ev.event {
            Some(chat_event::Event::Delta(_)) => {
                first.get_or_insert_with(|| start.elapsed());
            }
            Some(chat_event::Event::Done(done)) => {
                return Ok((first.unwrap_or_else(|| start.elapsed()), done.text));
            }
            _ => {}
        }
    }
    Err(tonic::Status::internal("stream ended without done"))
}
