//! The whole pipeline in one test process: real redis-server and mosquitto,
//! a fake vLLM over HTTP, and the three services in-process on port 0,
//! talking real gRPC over loopback.

use std::time::Duration;

use palaver_core::projects::Projects;
use palaver_proto::session::v1::sessions_client::SessionsClient;
use palaver_testkit::fake_vllm::{FakeVllm, FakeVllmConfig};
use palaver_testkit::process::{Mosquitto, RedisServer};
use prometheus_client::registry::Registry;
use session_svc::keys::KeySpace;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use palaver_testkit::mqtt::TestClient;

/// How to build a stack; `Default` is the production defaults against a fast fake.
pub struct StackOptions {
    /// The fake vLLM's behaviour.
    pub vllm: FakeVllmConfig,
    /// Tweaks to inference-svc's config (limits, timeouts).
    pub inference: Box<dyn FnOnce(&mut inference_svc::Config) + Send>,
    /// Tweaks to the gateway's config.
    pub gateway: Box<dyn FnOnce(&mut gateway::Config) + Send>,
    /// Projects file for session-svc and the gateway.
    pub projects: Projects,
    /// Number of session-svc replicas sharing the one Redis.
    pub session_replicas: usize,
    /// Whether to start the gateway (a test may run its own gateways).
    pub gateway_started: bool,
    /// A real OpenAI-compatible server (llama-server) for inference-svc,
    /// in place of the fake (which still runs, unused).
    pub model_url: Option<String>,
}

impl Default for StackOptions {
    fn default() -> Self {
        Self {
            vllm: FakeVllmConfig::default(),
            inference: Box::new(|_| {}),
            gateway: Box::new(|_| {}),
            projects: Projects::builtin(),
            session_replicas: 1,
            gateway_started: true,
            model_url: None,
        }
    }
}

impl StackOptions {
    /// Production defaults against a fake vLLM that waits `ttft`, then
    /// `tpot` between each of `tokens` words (latency ttft + (tokens-1)·tpot).
    pub fn with_backend(ttft: Duration, tpot: Duration, tokens: usize) -> Self {
        Self {
            vllm: FakeVllmConfig {
                ttft,
                tpot,
                tokens,
                ..FakeVllmConfig::default()
            },
            ..Self::default()
        }
    }

    /// Production defaults against a fake vLLM that answers two words,
    /// all at once, `ttft` after each request: for tests about what goes
    /// around a turn rather than about its timing.
    pub fn replying_after(ttft: Duration) -> Self {
        Self::with_backend(ttft, Duration::ZERO, 2)
    }
}

/// A running pipeline. Dropping it stops everything.
pub struct Stack {
    pub redis: RedisServer,
    pub broker: Mosquitto,
    pub vllm: FakeVllm,
    /// `http://127.0.0.1:PORT` of each session-svc replica.
    pub session_urls: Vec<String>,
    pub inference_url: String,
    pub shutdown: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    gateway_metrics: Registry,
    client_seq: std::sync::atomic::AtomicUsize,
}

async fn bind() -> (TcpListener, String) {
    let l = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let url = format!("http://{}", l.local_addr().expect("bound"));
    (l, url)
}

impl Stack {
    pub async fn start(opts: StackOptions) -> Self {
        crate::init_logging();
        let redis = RedisServer::start().expect("redis-server starts");
        let broker = Mosquitto::start().expect("mosquitto starts");
        let vllm = FakeVllm::start(opts.vllm).await;
        let shutdown = CancellationToken::new();
        let mut tasks = Vec::new();

        // inference-svc
        let model_url = opts.model_url.clone().unwrap_or_else(|| vllm.url());
        let mut inference_cfg = inference_svc::Config::openai(model_url);
        (opts.inference)(&mut inference_cfg);
        let (listener, inference_url) = bind().await;
        let server = inference_svc::Server::new(inference_cfg, &mut Registry::default())
            .expect("inference-svc config is valid");
        let sd = shutdown.clone();
        tasks.push(tokio::spawn(async move {
            server
                .serve(listener, sd)
                .await
                .expect("inference-svc serves");
        }));

        // session-svc replicas on the one Redis
        let mut session_urls = Vec::new();
        for _ in 0..opts.session_replicas.max(1) {
            let store = session_svc::RedisStore::connect(&redis.url(), KeySpace::default())
                .await
                .expect("session-svc reaches Redis");
            let mut cfg = session_svc::Config::new(inference_url.clone());
            cfg.projects = opts.projects.clone();
            let server = session_svc::Server::new(cfg, store, &mut Registry::default())
                .expect("session-svc config is valid");
            let (listener, url) = bind().await;
            let sd = shutdown.clone();
            tasks.push(tokio::spawn(async move {
                server
                    .serve(listener, sd)
                    .await
                    .expect("session-svc serves");
            }));
            session_urls.push(url);
        }

        // gateway
        let mut gw_registry = Registry::default();
        if opts.gateway_started {
            let names = opts.projects.names().map(str::to_owned).collect();
            let mut gw_cfg = crate::gateway_config(broker.port(), session_urls[0].clone(), names);
            (opts.gateway)(&mut gw_cfg);
            let gw = gateway::Gateway::new(gw_cfg, &mut gw_registry).expect("gateway config");
            let ready = gw.ready();
            let sd = shutdown.clone();
            tasks.push(tokio::spawn(async move {
                gw.run(sd).await.expect("gateway runs");
            }));
            let subscribed = tokio::time::timeout(Duration::from_secs(10), ready)
                .await
                .expect("gateway subscribed in time");
            assert!(subscribed, "gateway stopped before subscribing");
        }

        Self {
            redis,
            broker,
            vllm,
            session_urls,
            inference_url,
            shutdown,
            tasks,
            client_seq: Default::default(),
            gateway_metrics: gw_registry,
        }
    }

    /// A gRPC client of session-svc replica `i`.
    pub async fn sessions(&self, i: usize) -> SessionsClient<Channel> {
        SessionsClient::connect(self.session_urls[i].clone())
            .await
            .expect("session-svc reachable")
    }

    /// A new MQTT client on the stack's broker.
    pub async fn mqtt(&self) -> TestClient {
        let n = self
            .client_seq
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        TestClient::connect(self.broker.port(), &format!("test-client-{n}")).await
    }

    /// The sum of every sample of the gateway's metric `name` (all labels).
    pub fn gateway_metric_sum(&self, name: &str) -> f64 {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.gateway_metrics)
            .expect("metrics encode");
        text.lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .filter(|l| l[name.len()..].starts_with(['{', ' ']))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Stops the services and waits for them to drain.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        for t in self.tasks.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
