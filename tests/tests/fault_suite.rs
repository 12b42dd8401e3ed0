//! The fault suite (issue 19, DESIGN.md turn integrity: delivery): the real
//! pieces — redis-server with AOF, a persistent mosquitto, the three services
//! (each in a runtime of its own, or, for the rows that kill one, as the real
//! binaries killed with SIGKILL), the fake model server — under a steady load
//! of 16 sessions, one fault at a time. Every request is accounted for (answered, error text, no reply) and
//! every stored dialog checked (doubled, orphaned, misplaced messages).
//! The table goes to stderr and to target/fault-suite.md.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use palaver_core::projects::Projects;
use palaver_proto::session::v1::sessions_client::SessionsClient;
use palaver_proto::session::v1::{Role, SessionRef};
use palaver_testkit::fake_vllm::{FakeVllm, FakeVllmConfig, Fault};
use palaver_testkit::link::Link;
use palaver_testkit::process::{Mosquitto, RedisServer};
use prometheus_client::registry::Registry;
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use serde_json::json;
use session_svc::keys::KeySpace;
use tokio::runtime::Runtime;
use tokio::sync::mpsc;
use tokio::time::{sleep, Instant};
use tokio_util::sync::CancellationToken;

const SESSIONS: usize = 16;
/// A turn's deadline at the gateway: long enough to ride through every
/// outage below, including session-svc's takeover after its heartbeat expires.
const TURN_DEADLINE: Duration = Duration::from_secs(15);
/// How long a client waits for a reply before re-sending the same request id.
const CLIENT_PATIENCE: Duration = Duration::from_secs(18);
/// The projects file the separate binaries read (the same as [`projects`]).
const PROJECTS_TOML: &str =
    "[projects.general]\nrate_limit = 0\nmax_history_messages = 10000\nmax_history_tokens = 10000000\n";
const LEASE: Duration = Duration::from_secs(2);
/// The long broker outage: longer than a client's patience and than a turn's
/// deadline, so only persistent sessions on both sides carry it.
const MOSQUITTO_DOWN: Duration = Duration::from_secs(30);
/// What the gateway logs once it consumes a project (as scripts/soak waits for).
const SUBSCRIBED: &str = "subscribed project=";
const OVERLOADED: &str = "Server is overloaded. Please try again in a moment.";

fn projects() -> Projects {
    Projects::from_toml(PROJECTS_TOML).unwrap()
}

fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

/// A running service: in a runtime of its own, whose drop ends its every
/// task and socket at once; or the real binary, killed with SIGKILL.
enum Running {
    Runtime(Runtime),
    Process(Child),
}

/// A service that may be running; dropping it kills it.
struct Proc(Option<Running>);

impl Proc {
    fn kill(&mut self) {
        match self.0.take() {
            None => {}
            Some(Running::Runtime(rt)) => rt.shutdown_background(),
            Some(Running::Process(mut child)) => {
                // Child::kill sends SIGKILL: no drain, no destructor runs.
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// How a rig runs the three services.
#[derive(Clone, Copy, PartialEq)]
enum Services {
    /// In this test process, each in a runtime of its own.
    InProcess,
    /// As the `gateway`, `session-svc` and `inference-svc` binaries.
    Binaries,
}

/// The path of one of the workspace's service binaries. The three are built
/// once per run first: a binary left from an older build would test old code.
fn binary(name: &str) -> PathBuf {
    static BUILT: std::sync::Once = std::sync::Once::new();
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/fault_suite-<hash> → target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).unwrap();
    BUILT.call_once(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        build.args([
            "build",
            "--quiet",
            "--bins",
            "-p",
            "gateway",
            "-p",
            "session-svc",
        ]);
        build.args(["-p", "inference-svc"]);
        if dir.ends_with("release") {
            build.arg("--release");
        }
        assert!(
            build.status().unwrap().success(),
            "cannot build the services"
        );
    });
    dir.join(name)
}

fn log_path(tag: &str, name: &str) -> PathBuf {
    let logs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/fault-suite-logs");
    std::fs::create_dir_all(&logs).unwrap();
    logs.join(format!("{tag}-{name}.log"))
}

/// Starts a service binary, its log in target/fault-suite-logs.
fn spawn(name: &str, tag: &str, args: &[String]) -> Child {
    // Appended to: a restarted service's log follows its killed predecessor's.
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path(tag, name))
        .unwrap();
    palaver_testkit::process::palaver_command(binary(name))
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {name}: {e}"))
}

/// Everything a fault is injected into. Services reach Redis, the broker
/// and the model server through [`Link`]s, so a test can cut those too.
struct Rig {
    redis: RedisServer,
    broker: Mosquitto,
    vllm: FakeVllm,
    redis_link: Link,
    broker_link: Link,
    vllm_link: Link,
    inference_addr: SocketAddr,
    session_addr: SocketAddr,
    inference: Proc,
    session: Proc,
    gateway: Proc,
    services: Services,
    /// Names the binaries' log files.
    tag: String,
    /// The projects file the binaries read.
    projects_file: PathBuf,
}

impl Rig {
    async fn start(services: Services, tag: &str) -> Rig {
        palaver_tests::init_logging();
        let redis = RedisServer::start_with_aof().unwrap();
        let broker = Mosquitto::start_persistent().unwrap();
        // Long enough that 16 sessions keep the 8 slots busy.
        let vllm = FakeVllm::start(FakeVllmConfig {
            ttft: Duration::from_millis(120),
            tpot: Duration::from_millis(10),
            tokens: 8,
            ..FakeVllmConfig::default()
        })
        .await;
        let redis_link = Link::start(SocketAddr::from(([127, 0, 0, 1], redis.port())))
            .await
            .unwrap();
        let broker_link = Link::start(SocketAddr::from(([127, 0, 0, 1], broker.port())))
            .await
            .unwrap();
        let vllm_link = Link::start(vllm.addr()).await.unwrap();
        let mut rig = Rig {
            redis,
            broker,
            vllm,
            redis_link,
            broker_link,
            vllm_link,
            inference_addr: free_addr(),
            session_addr: free_addr(),
            inference: Proc(None),
            session: Proc(None),
            gateway: Proc(None),
            services,
            tag: tag.to_owned(),
            projects_file: std::env::temp_dir().join(format!("palaver-fault-suite-{tag}.toml")),
        };
        std::fs::write(&rig.projects_file, PROJECTS_TOML).unwrap();
        rig.inference = rig.start_inference().await;
        rig.session = rig.start_session().await;
        rig.gateway = rig.start_gateway().await;
        rig
    }

    async fn start_inference(&self) -> Proc {
        if self.services == Services::Binaries {
            let child = spawn(
                "inference-svc",
                &self.tag,
                &[
                    "--listen".into(),
                    self.inference_addr.to_string(),
                    "--vllm-url".into(),
                    format!("http://{}", self.vllm_link.addr()),
                    "--first-token-timeout-ms".into(),
                    "3000".into(),
                    "--idle-timeout-ms".into(),
                    "3000".into(),
                ],
            );
            wait_listening(self.inference_addr).await;
            return Proc(Some(Running::Process(child)));
        }
        let rt = runtime();
        let mut cfg = inference_svc::Config::openai(format!("http://{}", self.vllm_link.addr()));
        // A hung model fails its turns well within the turn's deadline.
        cfg.first_token_timeout = Duration::from_secs(3);
        cfg.idle_timeout = Duration::from_secs(3);
        let addr = self.inference_addr;
        rt.spawn(async move {
            let server = inference_svc::Server::new(cfg, &mut Registry::default()).unwrap();
            let listener = bind_again(addr).await;
            server.serve(listener, CancellationToken::new()).await
        });
        wait_listening(addr).await;
        Proc(Some(Running::Runtime(rt)))
    }

    async fn start_session(&self) -> Proc {
        if self.services == Services::Binaries {
            let child = spawn(
                "session-svc",
                &self.tag,
                &[
                    "--listen".into(),
                    self.session_addr.to_string(),
                    "--redis-url".into(),
                    format!("redis://{}/", self.redis_link.addr()),
                    "--inference-url".into(),
                    format!("http://{}", self.inference_addr),
                    "--projects-file".into(),
                    self.projects_file.display().to_string(),
                ],
            );
            wait_listening(self.session_addr).await;
            return Proc(Some(Running::Process(child)));
        }
        let rt = runtime();
        let redis = format!("redis://{}/", self.redis_link.addr());
        let inference = format!("http://{}", self.inference_addr);
        let addr = self.session_addr;
        rt.spawn(async move {
            let store = session_svc::RedisStore::connect(&redis, KeySpace::default())
                .await
                .unwrap();
            let mut cfg = session_svc::Config::new(inference);
            cfg.projects = projects();
            let server = session_svc::Server::new(cfg, store, &mut Registry::default()).unwrap();
            let listener = bind_again(addr).await;
            server.serve(listener, CancellationToken::new()).await
        });
        wait_listening(addr).await;
        Proc(Some(Running::Runtime(rt)))
    }

    async fn start_gateway(&self) -> Proc {
        if self.services == Services::Binaries {
            let log = log_path(&self.tag, "gateway");
            let subscribed = || {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                text.matches(SUBSCRIBED).count()
            };
            let before = subscribed();
            let child = spawn(
                "gateway",
                &self.tag,
                &[
                    "--mqtt-url".into(),
                    format!("mqtt://{}", self.broker_link.addr()),
                    "--session-url".into(),
                    format!("http://{}", self.session_addr),
                    "--projects-file".into(),
                    self.projects_file.display().to_string(),
                    "--client-id".into(),
                    "fault-suite-gateway".into(),
                    "--consumer-lease-ms".into(),
                    LEASE.as_millis().to_string(),
                    "--request-timeout-ms".into(),
                    TURN_DEADLINE.as_millis().to_string(),
                ],
            );
            // A restarted gateway may stand by until the dead one's lease expires.
            let until = Instant::now() + Duration::from_secs(10);
            while subscribed() == before && Instant::now() < until {
                sleep(Duration::from_millis(50)).await;
            }
            return Proc(Some(Running::Process(child)));
        }
        let rt = runtime();
        let mut cfg = palaver_tests::gateway_config(
            self.broker_link.addr().port(),
            format!("http://{}", self.session_addr),
            vec!["general".into()],
        );
        cfg.client_id = "fault-suite-gateway".into();
        cfg.consumer_lease = Some(LEASE);
        cfg.request_timeout = TURN_DEADLINE;
        cfg.keep_alive = Duration::from_secs(5);
        let gw = gateway::Gateway::new(cfg, &mut Registry::default()).unwrap();
        let ready = rt.spawn(gw.ready());
        rt.spawn(gw.run(CancellationToken::new()));
        // A restarted gateway may stand by until the dead one's lease expires.
        let _ = tokio::time::timeout(Duration::from_secs(10), ready).await;
        Proc(Some(Running::Runtime(rt)))
    }

    async fn sessions(&self) -> SessionsClient<tonic::transport::Channel> {
        SessionsClient::connect(format!("http://{}", self.session_addr))
            .await
            .unwrap()
    }
}

/// Binds `addr`, retrying while the killed predecessor's socket lingers.
async fn bind_again(addr: SocketAddr) -> tokio::net::TcpListener {
    for _ in 0..200 {
        if let Ok(l) = tokio::net::TcpListener::bind(addr).await {
            return l;
        }
        sleep(Duration::from_millis(25)).await;
    }
    panic!("cannot bind {addr} again");
}

async fn wait_listening(addr: SocketAddr) {
    for _ in 0..400 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return;
        }
        sleep(Duration::from_millis(25)).await;
    }
    panic!("nothing listens on {addr}");
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Outcome {
    Answered,
    Error,
    Lost,
}

/// What one session saw.
#[derive(Default)]
struct SessionLog {
    /// Request id (= message text) and final outcome, in send order.
    requests: Vec<(String, Outcome)>,
    /// When each answer arrived.
    answers: Vec<Instant>,
    /// Replies whose text was not for their request.
    wrong_replies: usize,
    /// Re-sends after waiting in vain for a reply (a persistent-session
    /// client should never need one).
    resent: usize,
    /// Requests published again after a reconnect because the broker had
    /// not acknowledged them when the connection broke.
    republished: usize,
}

/// One client session: QoS 1, a persistent MQTT session, re-subscribing on
/// every connect; sends its next message once the previous one is settled,
/// re-sending (same request id) only what got no reply or the overloaded text.
async fn run_session(
    broker_port: u16,
    run: String,
    s: usize,
    stop_sending: Arc<Mutex<Instant>>,
    patience: Duration,
) -> SessionLog {
    let stop = || *stop_sending.lock().unwrap();
    let session = format!("{run}-s{s:02}");
    let mut opts = MqttOptions::new(format!("{session}-client"), "127.0.0.1", broker_port);
    opts.set_keep_alive(Duration::from_secs(5));
    opts.set_clean_session(false);
    let (client, mut eventloop) = AsyncClient::new(opts, 256);
    let filter = format!("general/assistant_response/{session}/#");
    let (tx, mut replies) = mpsc::unbounded_channel::<(String, String)>();
    let (republish_tx, mut republish) = mpsc::unbounded_channel::<()>();
    let sub = client.clone();
    let poller = tokio::spawn(async move {
        // The request on the wire without its PUBACK, and whether the
        // connection broke since: rumqttc does not send such a publish
        // again after reconnecting, which a QoS 1 client must.
        let mut unacked = None;
        let mut broke = false;
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = sub.subscribe(filter.clone(), QoS::AtLeastOnce).await;
                    if broke && unacked.take().is_some() {
                        let _ = republish_tx.send(());
                    }
                    broke = false;
                }
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => unacked = Some(pkid),
                Ok(Event::Incoming(Packet::PubAck(a))) if unacked == Some(a.pkid) => unacked = None,
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let rid = p.topic.rsplit('/').next().unwrap_or_default().to_owned();
                    let _ = tx.send((rid, String::from_utf8_lossy(&p.payload).into_owned()));
                }
                Ok(_) => {}
                Err(_) => {
                    broke = true;
                    sleep(Duration::from_millis(100)).await
                }
            }
        }
    });
    // Let the subscription land before the first request.
    sleep(Duration::from_millis(300)).await;
    let mut log = SessionLog::default();
    let mut t = 0;
    while Instant::now() < stop() {
        // Well after every turn's deadline and a client's re-send.
        let give_up = stop() + patience + Duration::from_secs(27);
        let rid = format!("{session}-t{t:03}");
        t += 1;
        let payload = json!({"message": rid, "sessionId": session, "clientId": "c",
            "requestId": rid, "replyTopic": format!("general/assistant_response/{session}/{rid}")})
        .to_string();
        let mut outcome = Outcome::Lost;
        'attempts: while Instant::now() < give_up {
            let _ = client
                .publish(
                    "general/user_input",
                    QoS::AtLeastOnce,
                    false,
                    payload.clone(),
                )
                .await;
            let wait_until = (Instant::now() + patience).min(give_up);
            loop {
                let left = wait_until.saturating_duration_since(Instant::now());
                let got = tokio::select! {
                    got = tokio::time::timeout(left, replies.recv()) => got,
                    Some(()) = republish.recv() => {
                        log.republished += 1;
                        continue 'attempts; // the broker never acknowledged it
                    }
                };
                let Ok(Some((got, text))) = got else {
                    log.resent += 1;
                    eprintln!("fault suite: no reply to {rid} within {patience:?}; re-sent");
                    continue 'attempts; // no reply: re-send
                };
                if got != rid {
                    continue; // a late extra reply to an earlier request
                }
                if text == OVERLOADED {
                    sleep(Duration::from_millis(250)).await;
                    continue 'attempts;
                }
                if text.starts_with("Error") {
                    outcome = Outcome::Error;
                } else {
                    if !text.contains(&rid) {
                        log.wrong_replies += 1;
                    }
                    outcome = Outcome::Answered;
                    log.answers.push(Instant::now());
                }
                break 'attempts;
            }
        }
        log.requests.push((rid, outcome));
        if outcome == Outcome::Lost {
            break;
        }
    }
    poller.abort();
    log
}

#[derive(Default, Debug)]
struct Row {
    fault: &'static str,
    requests: usize,
    answered: usize,
    errors: usize,
    lost: usize,
    resent: usize,
    republished: usize,
    doubled: usize,
    orphans: usize,
    misplaced: usize,
    /// Messages stored for requests the client was told had failed.
    ghosts: usize,
    recovery: Option<Duration>,
    slots_after: usize,
    passed: bool,
}

type Inject =
    for<'a> fn(&'a mut Rig) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>>;

/// One row of the suite.
struct Spec {
    fault: &'static str,
    inject: Inject,
    /// The model's own faults may end a turn with an error text.
    expect_errors: bool,
    services: Services,
    /// How long the clients wait for a reply before re-sending; longer than
    /// the outage for the one fault that outlasts [`CLIENT_PATIENCE`].
    patience: Duration,
}

impl Spec {
    fn new(fault: &'static str, inject: Inject) -> Spec {
        Spec {
            fault,
            inject,
            expect_errors: false,
            services: Services::InProcess,
            patience: CLIENT_PATIENCE,
        }
    }

    fn model_fault(mut self) -> Spec {
        self.expect_errors = true;
        self
    }

    fn binaries(mut self) -> Spec {
        self.services = Services::Binaries;
        self
    }
}

/// Load, inject, heal, settle, check.
async fn run_fault(spec: Spec) -> Row {
    let Spec {
        fault,
        inject,
        expect_errors,
        services,
        patience,
    } = spec;
    let run = format!("f{:04x}", rand_tag());
    let mut rig = Rig::start(services, &run).await;
    let start = Instant::now();
    // Sending stops a few seconds after the fault is healed; give up only
    // well after every turn's deadline.
    let stop_sending = Arc::new(Mutex::new(start + Duration::from_secs(60)));
    let port = rig.broker.port();
    let clients: Vec<_> = (0..SESSIONS)
        .map(|s| {
            let run = run.clone();
            let stop = stop_sending.clone();
            tokio::spawn(run_session(port, run, s, stop, patience))
        })
        .collect();
    sleep(Duration::from_millis(1500)).await;
    inject(&mut rig).await;
    let healed = Instant::now();
    // Requests keep coming after the heal so that recovery shows.
    *stop_sending.lock().unwrap() = healed + Duration::from_secs(3);
    let logs: Vec<SessionLog> = futures::future::join_all(clients)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();

    let mut row = Row {
        fault,
        ..Row::default()
    };
    let mut client = rig.sessions().await;
    let mut last_answers = Vec::new();
    for (s, log) in logs.iter().enumerate() {
        let outcomes: HashMap<&str, Outcome> =
            log.requests.iter().map(|(r, o)| (r.as_str(), *o)).collect();
        row.requests += log.requests.len();
        row.answered += outcomes
            .values()
            .filter(|o| **o == Outcome::Answered)
            .count();
        row.errors += outcomes.values().filter(|o| **o == Outcome::Error).count();
        row.lost += outcomes.values().filter(|o| **o == Outcome::Lost).count();
        row.misplaced += log.wrong_replies;
        row.resent += log.resent;
        row.republished += log.republished;
        if let Some(first) = log.answers.iter().find(|a| **a > healed) {
            last_answers.push(*first - healed);
        } else {
            last_answers.push(Duration::MAX);
        }
        let history = client
            .get_history(SessionRef {
                project: "general".into(),
                session_id: format!("{run}-s{s:02}"),
            })
            .await
            .unwrap()
            .into_inner()
            .messages;
        let mut seen: HashMap<&str, usize> = HashMap::new();
        let mut last_index = None;
        for (i, m) in history.iter().enumerate() {
            if m.role() != Role::User {
                continue;
            }
            let text = m.content.as_str();
            *seen.entry(text).or_default() += 1;
            if seen[text] > 1 {
                row.doubled += 1;
                continue;
            }
            match history.get(i + 1) {
                Some(r) if r.role() == Role::Assistant && r.content.contains(text) => {}
                Some(r) if r.role() == Role::Assistant => row.misplaced += 1,
                _ => row.orphans += 1,
            }
            if outcomes.get(text) != Some(&Outcome::Answered) {
                row.ghosts += 1;
            }
            // Out of send order counts as misplaced.
            let index = log.requests.iter().position(|(r, _)| r == text);
            if index < last_index {
                row.misplaced += 1;
            }
            last_index = index.max(last_index);
        }
    }
    row.recovery = last_answers
        .into_iter()
        .max()
        .filter(|d| *d != Duration::MAX);
    // No slot leaked: 8 generations at once again.
    rig.vllm.set_fault(Fault::None);
    row.slots_after = slots_in_use(&rig).await;
    // Persistent-session clients get every reply without re-sending.
    row.passed = row.lost == 0
        && row.resent == 0
        && row.doubled == 0
        && row.orphans == 0
        && row.misplaced == 0
        && row.ghosts == 0
        // Back within a client's re-send and its turn, whatever the fault.
        && row.recovery.is_some_and(|d| d < patience + Duration::from_secs(5))
        && row.slots_after == 8
        && (expect_errors || row.errors == 0);
    row
}

fn rand_tag() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u8(0);
    h.finish() as u16
}

/// How many generations run at once when 12 are asked for directly of
/// inference-svc (its limit is 8).
async fn slots_in_use(rig: &Rig) -> usize {
    use palaver_proto::inference::v1::inference_client::InferenceClient;
    use palaver_proto::inference::v1::{ChatMessage, GenerateRequest};
    rig.vllm.reset_stats();
    let url = format!("http://{}", rig.inference_addr);
    let calls = (0..12).map(|i| {
        let url = url.clone();
        async move {
            let mut c = InferenceClient::connect(url).await.ok()?;
            c.generate(GenerateRequest {
                messages: vec![ChatMessage {
                    role: "user".into(),
                    content: format!("slot probe {i}"),
                }],
                ..Default::default()
            })
            .await
            .ok()?;
            Some(())
        }
    });
    futures::future::join_all(calls).await;
    rig.vllm.max_in_flight()
}

fn fault<F>(f: F) -> F
where
    F: for<'a> Fn(
        &'a mut Rig,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>>,
{
    f
}

fn table(rows: &[Row]) -> String {
    let mut t = String::from(
        "| fault | requests | answered | errors | lost | re-sent | unacked re-published | doubled | orphans | misplaced | ghosts | recovery s | slots after | ok |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for r in rows {
        let rec = r
            .recovery
            .map_or("never".to_owned(), |d| format!("{:.1}", d.as_secs_f64()));
        let _ = writeln!(
            t,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.fault,
            r.requests,
            r.answered,
            r.errors,
            r.lost,
            r.resent,
            r.republished,
            r.doubled,
            r.orphans,
            r.misplaced,
            r.ghosts,
            rec,
            r.slots_after,
            if r.passed { "yes" } else { "NO" }
        );
    }
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_gets_one_reply_and_every_dialog_stays_whole_under_each_fault() {
    let faults: Vec<Spec> = vec![
        Spec::new("none (baseline)", fault(|_| Box::pin(async {}))),
        Spec::new(
            "mosquitto restarted (stop, 3 s, start)",
            fault(|rig| {
                Box::pin(async move {
                    rig.broker.stop();
                    sleep(Duration::from_secs(3)).await;
                    rig.broker.start_again().unwrap();
                })
            }),
        ),
        Spec {
            // Clients cannot even publish while the broker is gone, so
            // their patience must outlast the outage: 30 s + the usual 18 s.
            patience: CLIENT_PATIENCE + MOSQUITTO_DOWN,
            ..Spec::new(
                "mosquitto down 30 s",
                fault(|rig| {
                    Box::pin(async move {
                        rig.broker.stop();
                        sleep(MOSQUITTO_DOWN).await;
                        rig.broker.start_again().unwrap();
                    })
                }),
            )
        },
        Spec::new(
            "Redis restarted (AOF)",
            fault(|rig| {
                Box::pin(async move {
                    rig.redis.stop();
                    rig.redis.start_again().unwrap();
                })
            }),
        ),
        Spec::new(
            "Redis down 4 s (AOF)",
            fault(|rig| {
                Box::pin(async move {
                    rig.redis.stop();
                    sleep(Duration::from_secs(4)).await;
                    rig.redis.start_again().unwrap();
                })
            }),
        ),
        Spec::new(
            "Redis down 10 s (AOF)",
            fault(|rig| {
                Box::pin(async move {
                    rig.redis.stop();
                    sleep(Duration::from_secs(10)).await;
                    rig.redis.start_again().unwrap();
                })
            }),
        ),
        Spec::new(
            "gateway process SIGKILL, restarted",
            fault(|rig| {
                Box::pin(async move {
                    rig.gateway.kill();
                    sleep(Duration::from_millis(500)).await;
                    rig.gateway = rig.start_gateway().await;
                })
            }),
        )
        .binaries(),
        Spec::new(
            "session-svc process SIGKILL mid-turn, restarted",
            fault(|rig| {
                Box::pin(async move {
                    rig.session.kill();
                    sleep(Duration::from_secs(1)).await;
                    rig.session = rig.start_session().await;
                })
            }),
        )
        .binaries(),
        Spec::new(
            "inference-svc process SIGKILL with 8 generating, restarted",
            fault(|rig| {
                Box::pin(async move {
                    let until = Instant::now() + Duration::from_secs(5);
                    while rig.vllm.in_flight() < 8 && Instant::now() < until {
                        sleep(Duration::from_millis(5)).await;
                    }
                    rig.inference.kill();
                    sleep(Duration::from_secs(1)).await;
                    rig.inference = rig.start_inference().await;
                })
            }),
        )
        .binaries(),
        Spec::new(
            "model: 500 on every other request",
            fault(|rig| {
                Box::pin(async move {
                    rig.vllm.set_fault(Fault::EveryOther(Box::new(Fault::Status(
                        500,
                        "{\"error\":\"boom\"}".into(),
                    ))));
                    sleep(Duration::from_secs(3)).await;
                    rig.vllm.set_fault(Fault::None);
                })
            }),
        )
        .model_fault(),
        Spec::new(
            "model: hang",
            fault(|rig| {
                Box::pin(async move {
                    rig.vllm.set_fault(Fault::Hang);
                    sleep(Duration::from_secs(3)).await;
                    rig.vllm.set_fault(Fault::None);
                })
            }),
        )
        .model_fault(),
        Spec::new(
            "model: connections refused",
            fault(|rig| {
                Box::pin(async move {
                    rig.vllm.stop_listening().await;
                    sleep(Duration::from_secs(3)).await;
                    rig.vllm.listen_again().await;
                })
            }),
        )
        .model_fault(),
        Spec::new(
            "model: stream cut mid-reply",
            fault(|rig| {
                Box::pin(async move {
                    rig.vllm.set_fault(Fault::ErrorMidStream);
                    sleep(Duration::from_secs(3)).await;
                    rig.vllm.set_fault(Fault::None);
                })
            }),
        )
        .model_fault(),
        Spec::new(
            "link cut 3 s: gateway-broker",
            fault(|rig| {
                Box::pin(async move {
                    rig.broker_link.cut();
                    sleep(Duration::from_secs(3)).await;
                    rig.broker_link.restore();
                })
            }),
        ),
        Spec::new(
            "link cut 3 s: session-svc-Redis",
            fault(|rig| {
                Box::pin(async move {
                    rig.redis_link.cut();
                    sleep(Duration::from_secs(3)).await;
                    rig.redis_link.restore();
                })
            }),
        ),
        Spec::new(
            "link cut 3 s: inference-svc-model",
            fault(|rig| {
                Box::pin(async move {
                    rig.vllm_link.cut();
                    sleep(Duration::from_secs(3)).await;
                    rig.vllm_link.restore();
                })
            }),
        )
        .model_fault(),
    ];
    let only = std::env::var("FAULT_SUITE_ONLY").ok();
    let suite_started = Instant::now();
    let mut rows = Vec::new();
    for spec in faults {
        if only.as_deref().is_some_and(|o| !spec.fault.contains(o)) {
            continue;
        }
        let row = run_fault(spec).await;
        eprintln!("fault suite: {row:?}");
        rows.push(row);
    }
    let text = format!(
        "{}\n{} sessions, suite took {:.0} s\n",
        table(&rows),
        SESSIONS,
        suite_started.elapsed().as_secs_f64()
    );
    eprintln!("\n{text}");
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/fault-suite.md");
    let _ = std::fs::write(out, &text);
    assert!(
        rows.iter().all(|r| r.passed),
        "a fault broke a promise:\n{text}"
    );
}
