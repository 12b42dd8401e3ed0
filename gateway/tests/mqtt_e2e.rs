//! The gateway against a real mosquitto and a fake session-svc.
//!
//! The fake answers by the message text (`slow:<ms>`, `ratelimit`,
//! `invalid`, anything else is echoed), takes 300 ms over a reset of a
//! session whose id starts with `slow-`, and records every call, so these
//! tests check the MQTT side exactly: topics, payloads, error strings,
//! control acknowledgements, presence and shutdown. The full-stack tests
//! live in the workspace's `tests/` crate.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gateway::config::Protocol;
use gateway::errors::{OVERLOADED_TEXT, RATE_LIMITED_TEXT, TIMEOUT_TEXT, UNAVAILABLE_TEXT};
use gateway::{Config, Gateway};
use palaver_core::{ERROR_KIND_HEADER, ERROR_KIND_RATE_LIMITED};
use palaver_proto::session::v1::sessions_server::{Sessions, SessionsServer};
use palaver_proto::session::v1::{
    chat_event, Accepted, ChatEvent, ChatReply, ChatRequest, DeleteSessionReply, History,
    LeaseReply, LeaseRequest, ResetSessionReply, ResetSessionRequest, SessionAction, SessionRef,
    UpdateProjectReply, UpdateProjectRequest,
};
use palaver_testkit::mqtt::{Received, TestClient};
use palaver_testkit::process::{free_port, Mosquitto};
use prometheus_client::registry::Registry;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

const WAIT: Duration = Duration::from_secs(10);

// ---------- broker ----------

/// A real mosquitto of our own (testkit finds it in /usr/sbin too; the test
/// script installs it). Failing to start is a failure, never a skip.
struct Broker(Mosquitto);

impl Broker {
    fn start() -> Broker {
        Broker(Mosquitto::start().expect("mosquitto starts (scripts/test installs it)"))
    }

    fn port(&self) -> u16 {
        self.0.port()
    }

    /// Kills the broker and starts a new one on the same port (state lost).
    fn restart(mut self) -> Broker {
        self.0.stop();
        self.0.start_again().expect("mosquitto restarts");
        self
    }
}

// ---------- fake session-svc ----------

#[derive(Default)]
struct Calls {
    chats: Vec<ChatRequest>,
    resets: Vec<ResetSessionRequest>,
    deletes: Vec<SessionRef>,
    updates: Vec<UpdateProjectRequest>,
    /// Chats and resets as they reached the fake and, for resets, ended.
    log: Vec<String>,
}

/// How long the fake takes over a reset of a `slow-` session.
const SLOW_RESET: Duration = Duration::from_millis(300);

#[derive(Clone, Default)]
struct Fake {
    calls: Arc<Mutex<Calls>>,
    /// Notified when a chat call arrives (to time shutdown against it).
    chat_arrived: Arc<Notify>,
}

#[tonic::async_trait]
impl Sessions for Fake {
    async fn chat(&self, request: Request<ChatRequest>) -> Result<Response<ChatReply>, Status> {
        let req = request.into_inner();
        self.calls.lock().unwrap().chats.push(req.clone());
        self.chat_arrived.notify_waiters();
        if let Some(ms) = req.message.strip_prefix("slow:") {
            tokio::time::sleep(Duration::from_millis(ms.parse().unwrap())).await;
        }
        match req.message.as_str() {
            "ratelimit" => {
                let mut s = Status::resource_exhausted("slow down");
                s.metadata_mut()
                    .insert(ERROR_KIND_HEADER, ERROR_KIND_RATE_LIMITED.parse().unwrap());
                Err(s)
            }
            "invalid" => Err(Status::invalid_argument("message too long")),
            _ => Ok(Response::new(ChatReply {
                text: format!("echo[{}]: {}", req.session_id, req.message),
                session_id: req.session_id,
                finish_reason: "stop".into(),
                prompt_tokens: 1,
                completion_tokens: 1,
            })),
        }
    }

    type ChatStreamStream =
        Pin<Box<dyn tokio_stream::Stream<Item = Result<ChatEvent, Status>> + Send + 'static>>;

    /// What the gateway calls: `accepted` at once (like session-svc after
    /// storing the message), then the same outcome as `chat`.
    async fn chat_stream(
        &self,
        request: Request<ChatRequest>,
    ) -> Result<Response<Self::ChatStreamStream>, Status> {
        // Logged before it is accepted: whatever the gateway does once it
        // is accepted comes later.
        let message = &request.get_ref().message;
        self.calls
            .lock()
            .unwrap()
            .log
            .push(format!("chat {message}"));
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let this = self.clone();
        tokio::spawn(async move {
            let accepted = ChatEvent {
                event: Some(chat_event::Event::Accepted(Accepted {})),
            };
            let _ = tx.send(Ok(accepted)).await;
            let done = this.chat(request).await.map(|r| ChatEvent {
                event: Some(chat_event::Event::Done(r.into_inner())),
            });
            let _ = tx.send(done).await;
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn get_history(&self, _: Request<SessionRef>) -> Result<Response<History>, Status> {
        Err(Status::unimplemented("not used by the gateway"))
    }

    async fn reset_session(
        &self,
        request: Request<ResetSessionRequest>,
    ) -> Result<Response<ResetSessionReply>, Status> {
        let req = request.into_inner();
        let slow = req.session_id.starts_with("slow-");
        {
            let mut calls = self.calls.lock().unwrap();
            calls.log.push(format!("reset {} began", req.session_id));
            calls.resets.push(req.clone());
        }
        if slow {
            tokio::time::sleep(SLOW_RESET).await;
        }
        let mut calls = self.calls.lock().unwrap();
        calls.log.push(format!("reset {} ended", req.session_id));
        Ok(Response::new(ResetSessionReply {}))
    }

    async fn delete_session(
        &self,
        request: Request<SessionRef>,
    ) -> Result<Response<DeleteSessionReply>, Status> {
        self.calls
            .lock()
            .unwrap()
            .deletes
            .push(request.into_inner());
        Ok(Response::new(DeleteSessionReply { existed: true }))
    }

    async fn update_project(
        &self,
        request: Request<UpdateProjectRequest>,
    ) -> Result<Response<UpdateProjectReply>, Status> {
        self.calls
            .lock()
            .unwrap()
            .updates
            .push(request.into_inner());
        Ok(Response::new(UpdateProjectReply { sessions: 3 }))
    }

    async fn cancel_turn(
        &self,
        _request: Request<palaver_proto::session::v1::CancelTurnRequest>,
    ) -> Result<Response<palaver_proto::session::v1::CancelTurnReply>, Status> {
        Ok(Response::new(Default::default()))
    }

    /// One gateway per test: its lease is always granted.
    async fn hold_lease(
        &self,
        request: Request<LeaseRequest>,
    ) -> Result<Response<LeaseReply>, Status> {
        let r = request.into_inner();
        Ok(Response::new(LeaseReply {
            held: r.ttl_ms > 0,
            epoch: 1,
            holder: r.holder,
        }))
    }
}

async fn start_fake(fake: Fake) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(SessionsServer::new(fake))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    addr
}

// ---------- gateway + test client ----------

struct Running {
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), gateway::GatewayError>>,
    registry: Registry,
}

async fn start_gateway(config: Config) -> Running {
    let mut registry = Registry::default();
    let gw = Gateway::new(config, &mut registry).expect("valid config");
    let ready = gw.ready();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(gw.run(shutdown.clone()));
    assert!(
        tokio::time::timeout(WAIT, ready)
            .await
            .expect("subscribed in time"),
        "gateway stopped before it was ready"
    );
    Running {
        shutdown,
        task,
        registry,
    }
}

fn config(broker: &Broker, session: SocketAddr, projects: &[&str]) -> Config {
    let mut c = Config::new(
        "127.0.0.1",
        broker.port(),
        format!("http://{session}"),
        projects.iter().map(|p| p.to_string()).collect(),
    );
    c.service_name = "gw-test".into();
    c.max_payload_bytes = 4096;
    c
}

/// A broker, a recording fake session-svc, a gateway serving `projects`
/// (its config changed by `tweak`) and a client that sees every message.
/// The broker lives as long as the first value.
async fn start_all(
    projects: &[&str],
    tweak: impl FnOnce(&mut Config),
) -> (Broker, Fake, Running, Client) {
    let broker = Broker::start();
    let fake = Fake::default();
    let session = start_fake(fake.clone()).await;
    let mut cfg = config(&broker, session, projects);
    tweak(&mut cfg);
    let gw = start_gateway(cfg).await;
    let c = Client::connect(broker.port()).await;
    (broker, fake, gw, c)
}

/// A client that sees every message on the broker.
/// The shared test client, subscribed to everything.
struct Client(TestClient);

impl Client {
    async fn connect(port: u16) -> Client {
        let id = format!("test-{:08x}", rand::random::<u32>());
        let mut c = TestClient::connect(port, &id).await;
        c.subscribe("#").await;
        Client(c)
    }

    async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.0.publish(topic, payload).await;
    }

    /// The next message whose topic satisfies `pick` (others are skipped).
    async fn next_on(&mut self, pick: impl Fn(&str) -> bool) -> (String, String) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let msg = self
                .0
                .recv(left)
                .await
                .expect("expected message did not arrive");
            if pick(&msg.topic) {
                return (msg.topic, msg.payload);
            }
        }
    }

    async fn reply_on(&mut self, topic: &str) -> String {
        self.next_on(|t| t == topic).await.1
    }

    /// Asserts that no message whose topic satisfies `pick` arrives for `wait`.
    async fn nothing_on(&mut self, pick: impl Fn(&str) -> bool, wait: Duration) {
        for Received { topic, payload, .. } in self.0.drain(wait).await {
            assert!(!pick(&topic), "unexpected {payload:?} on {topic}");
        }
    }
}

fn metrics_text(registry: &Registry) -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry).unwrap();
    out
}

fn is_reply(t: &str) -> bool {
    t.contains("/assistant_response/")
}

// ---------- tests ----------

#[tokio::test]
async fn chat_turns_follow_the_wire_protocol() {
    let (_broker, fake, gw, mut c) = start_all(&["p", "q"], |_| {}).await;

    // Default reply topic, temperature 0 forwarded as 0.
    c.publish(
        "p/user_input",
        r#"{"sessionId":"s1","message":"hi","temperature":0,"maxTokens":"64"}"#,
    )
    .await;
    assert_eq!(c.reply_on("p/assistant_response/s1").await, "echo[s1]: hi");
    {
        let calls = fake.calls.lock().unwrap();
        let req = calls.chats.last().unwrap();
        assert_eq!(req.project, "p");
        assert_eq!(req.temperature, Some(0.0));
        assert_eq!(req.max_tokens, Some(64));
        assert_eq!(req.top_p, None);
        assert_eq!(req.request_id, "");
    }

    // The reference client's reply topic and request id.
    c.publish(
        "p/user_input",
        r#"{"sessionId":7,"message":"yo","clientId":"c1","requestId":"r1","replyTopic":"p/assistant_response/7/c1/r1","images":[]}"#,
    )
    .await;
    assert_eq!(
        c.reply_on("p/assistant_response/7/c1/r1").await,
        "echo[7]: yo"
    );
    assert_eq!(
        fake.calls.lock().unwrap().chats.last().unwrap().request_id,
        "2:c1:r1",
        "request ids are scoped by client id"
    );

    // A replyTopic outside the project falls back to the default topic.
    c.publish(
        "p/user_input",
        r#"{"sessionId":"s1","message":"x","replyTopic":"q/assistant_response/s1"}"#,
    )
    .await;
    let (topic, _) = c.next_on(is_reply).await;
    assert_eq!(topic, "p/assistant_response/s1");

    // Bare text: a fresh default session.
    c.publish("p/user_input", "  hello there ").await;
    let (topic, text) = c.next_on(is_reply).await;
    let sid = topic.strip_prefix("p/assistant_response/").unwrap();
    assert!(sid.starts_with("default-") && sid.len() == 16, "{topic}");
    assert_eq!(text, format!("echo[{sid}]: hello there"));

    // Errors: empty message, bad temperature, rate limit, invalid argument.
    c.publish("p/user_input", r#"{"sessionId":"s2","message":"  "}"#)
        .await;
    assert_eq!(
        c.reply_on("p/assistant_response/s2").await,
        "Error: Message is empty."
    );
    c.publish(
        "p/user_input",
        r#"{"sessionId":"s2","message":"m","temperature":3}"#,
    )
    .await;
    assert_eq!(
        c.reply_on("p/assistant_response/s2").await,
        "Error: temperature must be a number between 0 and 2."
    );
    c.publish(
        "p/user_input",
        r#"{"sessionId":"s2","message":"ratelimit"}"#,
    )
    .await;
    assert_eq!(
        c.reply_on("p/assistant_response/s2").await,
        RATE_LIMITED_TEXT
    );
    c.publish("p/user_input", r#"{"sessionId":"s2","message":"invalid"}"#)
        .await;
    assert_eq!(
        c.reply_on("p/assistant_response/s2").await,
        "Error: Message too long."
    );

    // Session ids that would break a topic: sanitised, and the broker keeps
    // the gateway connected (mosquitto drops clients publishing to such topics).
    c.publish(
        "p/user_input",
        "{\"sessionId\":\"a/+/b\\u0001\",\"message\":\"m\"}",
    )
    .await;
    assert_eq!(
        c.reply_on("p/assistant_response/a/_/b_").await,
        "echo[a/+/b\u{1}]: m"
    );

    // Drops: JSON that is not an object, invalid UTF-8, too large (but under
    // the packet limit). None is answered; the next request still is.
    c.publish("p/user_input", "[1,2]").await;
    c.publish("p/user_input", vec![0xff, 0xfe, 0x00]).await;
    c.publish(
        "p/user_input",
        format!(r#"{{"sessionId":"big","message":"{}"}}"#, "x".repeat(5000)),
    )
    .await;
    c.publish(
        "p/user_input",
        r#"{"sessionId":"after","message":"still here"}"#,
    )
    .await;
    let (topic, text) = c.next_on(is_reply).await;
    assert_eq!(
        (topic.as_str(), text.as_str()),
        ("p/assistant_response/after", "echo[after]: still here")
    );

    // The second project is served by its own connection.
    c.publish("q/user_input", r#"{"sessionId":"s1","message":"to q"}"#)
        .await;
    assert_eq!(
        c.reply_on("q/assistant_response/s1").await,
        "echo[s1]: to q"
    );

    let metrics = metrics_text(&gw.registry);
    for needle in [
        r#"palaver_gateway_dropped_total{reason="not_an_object"} 1"#,
        r#"palaver_gateway_dropped_total{reason="invalid_utf8"} 1"#,
        r#"palaver_gateway_dropped_total{reason="too_large"} 1"#,
        r#"palaver_gateway_errors_total{kind="rate_limited"} 1"#,
        r#"palaver_gateway_mqtt_messages_in_total{project="q"} 1"#,
        r#"palaver_gateway_pending 0"#,
        r#"palaver_gateway_subscribed{project="p"} 1"#,
        r#"palaver_gateway_subscribed{project="q"} 1"#,
    ] {
        assert!(metrics.contains(needle), "missing {needle} in\n{metrics}");
    }

    gw.shutdown.cancel();
    gw.task.await.unwrap().unwrap();
}

/// A session's control action and its chat messages reach session-svc in
/// the order they were published: a message right behind a template waits
/// for the template to be applied (else it would be answered with the old
/// prompt, and stored only to be cleared by the reset), and a message right
/// before a clear is stored before the clear runs.
#[tokio::test]
async fn a_sessions_control_actions_and_messages_keep_their_order() {
    let (_broker, fake, gw, mut c) = start_all(&["p"], |_| {}).await;

    c.publish(
        "p/template",
        r#"{"sessionId":"slow-1","systemPrompt":"New","reset":true}"#,
    )
    .await;
    c.publish(
        "p/user_input",
        r#"{"sessionId":"slow-1","message":"after the template"}"#,
    )
    .await;
    c.reply_on("p/assistant_response/slow-1").await;
    c.publish(
        "p/user_input",
        r#"{"sessionId":"slow-2","message":"before the clear"}"#,
    )
    .await;
    c.publish("p/clear_history/slow-2", "").await;
    assert_eq!(
        c.reply_on("p/hint/slow-2").await,
        r#"{"hint":"History cleared"}"#
    );
    assert_eq!(
        fake.calls.lock().unwrap().log,
        [
            "reset slow-1 began",
            "reset slow-1 ended",
            "chat after the template",
            "chat before the clear",
            "reset slow-2 began",
            "reset slow-2 ended",
        ]
    );
    gw.shutdown.cancel();
    gw.task.await.unwrap().unwrap();
}

#[tokio::test]
async fn control_topics_map_to_the_sessions_api() {
    let (_broker, fake, gw, mut c) = start_all(&["p"], |_| {}).await;

    c.publish(
        "p/template",
        r#"{"sessionId":"s1","systemPrompt":"ignored","template":{"content":"T"},"reset":true}"#,
    )
    .await;
    assert_eq!(
        c.reply_on("p/hint/s1").await,
        r#"{"hint":"Template updated"}"#
    );
    c.publish("p/template", "Project prompt").await;
    assert_eq!(
        c.reply_on("p/hint/all").await,
        r#"{"hint":"Template updated"}"#
    );
    c.publish("p/clear_history/s2", "").await;
    assert_eq!(
        c.reply_on("p/hint/s2").await,
        r#"{"hint":"History cleared"}"#
    );
    c.publish("p/clear_history", r#"{"target":"all"}"#).await;
    assert_eq!(
        c.reply_on("p/hint/all").await,
        r#"{"hint":"History cleared"}"#
    );
    c.publish("p/delete_session/s3", "").await;
    assert_eq!(
        c.reply_on("p/hint/s3").await,
        r#"{"hint":"Session deleted"}"#
    );

    {
        let calls = fake.calls.lock().unwrap();
        assert_eq!(calls.resets.len(), 2);
        assert_eq!(
            (
                calls.resets[0].session_id.as_str(),
                calls.resets[0].system_prompt.as_deref()
            ),
            ("s1", Some("T"))
        );
        assert_eq!(
            (
                calls.resets[1].session_id.as_str(),
                calls.resets[1].system_prompt.as_deref()
            ),
            ("s2", None)
        );
        assert_eq!(calls.updates.len(), 2);
        assert_eq!(
            calls.updates[0].system_prompt.as_deref(),
            Some("Project prompt")
        );
        assert_eq!(calls.updates[0].sessions, i32::from(SessionAction::Clear));
        assert_eq!(calls.updates[1].system_prompt, None);
        assert_eq!(calls.updates[1].sessions, i32::from(SessionAction::Clear));
        assert_eq!(calls.deletes.len(), 1);
        assert_eq!(calls.deletes[0].session_id, "s3");
    }

    gw.shutdown.cancel();
    gw.task.await.unwrap().unwrap();
}

#[tokio::test]
async fn retained_requests_are_not_replayed() {
    let broker = Broker::start();
    let fake = Fake::default();
    let session = start_fake(fake.clone()).await;
    let mut c = Client::connect(broker.port()).await;
    // Retained before the gateway subscribes: the broker replays it on SUBSCRIBE.
    c.0.publish_retained("p/clear_history", r#"{"target":"all"}"#)
        .await;
    let _ = c.next_on(|t| t == "p/clear_history").await;
    let gw = start_gateway(config(&broker, session, &["p"])).await;
    c.nothing_on(|t| t.starts_with("p/hint/"), Duration::from_millis(500))
        .await;
    assert!(fake.calls.lock().unwrap().updates.is_empty());
    assert!(metrics_text(&gw.registry)
        .contains(r#"palaver_gateway_dropped_total{reason="retained"} 1"#));
    gw.shutdown.cancel();
    gw.task.await.unwrap().unwrap();
}

#[tokio::test]
async fn full_backlog_answers_overloaded_at_once() {
    let broker = Broker::start();
    let session = start_fake(Fake::default()).await;
    let mut cfg = config(&broker, session, &["p"]);
    cfg.max_pending = 1;
    let gw = start_gateway(cfg).await;
    let mut c = Client::connect(broker.port()).await;

    c.publish("p/user_input", r#"{"sessionId":"a","message":"slow:800"}"#)
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    c.publish("p/user_input", r#"{"sessionId":"b","message":"second"}"#)
        .await;
    let (topic, text) = c.next_on(is_reply).await;
    assert_eq!(
        (topic.as_str(), text.as_str()),
        ("p/assistant_response/b", OVERLOADED_TEXT)
    );
    let (topic, text) = c.next_on(is_reply).await;
    assert_eq!(
        (topic.as_str(), text.as_str()),
        ("p/assistant_response/a", "echo[a]: slow:800")
    );
    assert!(metrics_text(&gw.registry)
        .contains(r#"palaver_gateway_errors_total{kind="backlog_full"} 1"#));

    gw.shutdown.cancel();
    gw.task.await.unwrap().unwrap();
}

/// Under MQTT 5 the gateway bounds what the broker may have in flight to
/// it (Receive Maximum, twice max-pending): with one turn admitted and one
/// request answered "overloaded", both unacknowledged behind the slow turn,
/// a third request waits at the broker until the slow turn is answered,
/// and is then served.
#[tokio::test]
async fn under_mqtt_5_the_broker_holds_requests_past_the_receive_maximum() {
    let broker = Broker::start();
    let session = start_fake(Fake::default()).await;
    let mut cfg = config(&broker, session, &["p"]);
    cfg.max_pending = 1;
    assert_eq!(cfg.mqtt_protocol, Protocol::V5);
    assert!(cfg.consumer_lease.is_some(), "acknowledged once answered");
    let gw = start_gateway(cfg).await;
    let mut c = Client::connect(broker.port()).await;

    c.publish("p/user_input", r#"{"sessionId":"a","message":"slow:800"}"#)
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    c.publish("p/user_input", r#"{"sessionId":"b","message":"second"}"#)
        .await;
    let (topic, text) = c.next_on(is_reply).await;
    assert_eq!(
        (topic.as_str(), text.as_str()),
        ("p/assistant_response/b", OVERLOADED_TEXT)
    );
    c.publish("p/user_input", r#"{"sessionId":"c","message":"third"}"#)
        .await;
    let (topic, text) = c.next_on(is_reply).await;
    assert_eq!(
        (topic.as_str(), text.as_str()),
        ("p/assistant_response/a", "echo[a]: slow:800"),
        "the third request was held back, not refused"
    );
    let (topic, text) = c.next_on(is_reply).await;
    assert_eq!(
        (topic.as_str(), text.as_str()),
        ("p/assistant_response/c", "echo[c]: third")
    );
    gw.shutdown.cancel();
    gw.task.await.unwrap().unwrap();
}

#[tokio::test]
async fn deadlines_and_a_missing_session_svc() {
    let broker = Broker::start();
    let session = start_fake(Fake::default()).await;
    let mut cfg = config(&broker, session, &["p"]);
    cfg.request_timeout = Duration::from_millis(300);
    let gw = start_gateway(cfg).await;
    let mut c = Client::connect(broker.port()).await;
    c.publish("p/user_input", r#"{"sessionId":"t","message":"slow:3000"}"#)
        .await;
    assert_eq!(c.reply_on("p/assistant_response/t").await, TIMEOUT_TEXT);
    gw.shutdown.cancel();
    gw.task.await.unwrap().unwrap();

    // Nothing listens on this port: without the consumer lease (which needs
    // session-svc to be held) the gateway still starts (lazy connect) and
    // answers with the "unavailable" error.
    let nobody: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut cfg = config(&broker, nobody, &["p"]);
    cfg.consumer_lease = None;
    let gw = start_gateway(cfg).await;
    c.publish("p/user_input", r#"{"sessionId":"u","message":"anyone?"}"#)
        .await;
    assert_eq!(c.reply_on("p/assistant_response/u").await, UNAVAILABLE_TEXT);
    gw.shutdown.cancel();
    gw.task.await.unwrap().unwrap();
}

/// Publishes a turn of session `sid` that the fake takes `ms` over, starts
/// the gateway's shutdown once the turn has reached the fake, and returns the
/// first reply or status message after that.
async fn shut_down_mid_turn(
    c: &mut Client,
    fake: &Fake,
    gw: &Running,
    sid: &str,
    ms: u64,
) -> (String, String) {
    let arrived = fake.chat_arrived.notified();
    let request = serde_json::json!({"sessionId": sid, "message": format!("slow:{ms}")});
    c.publish("p/user_input", request.to_string()).await;
    tokio::time::timeout(WAIT, arrived).await.unwrap();
    gw.shutdown.cancel();
    c.next_on(|t| is_reply(t) || t.ends_with("/status")).await
}

#[tokio::test]
async fn shutdown_drains_then_goes_offline() {
    let (_broker, fake, gw, mut c) = start_all(&["p", "q"], |_| {}).await;

    // The turn in flight is still answered, and only then "offline".
    let (topic, text) = shut_down_mid_turn(&mut c, &fake, &gw, "d", 700).await;
    assert_eq!(
        (topic.as_str(), text.as_str()),
        ("p/assistant_response/d", "echo[d]: slow:700")
    );
    let mut offline = Vec::new();
    while offline.len() < 2 {
        let (topic, text) = c.next_on(|t| t.ends_with("/status")).await;
        if text.contains("offline") {
            assert_eq!(text, r#"{"service":"gw-test","status":"offline"}"#);
            offline.push(topic);
        }
    }
    offline.sort();
    assert_eq!(offline, ["p/status", "q/status"]);
    tokio::time::timeout(WAIT, gw.task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();

    // No longer subscribed: nothing answers. And the DISCONNECT was clean:
    // no last will follows the "offline" already sent.
    c.publish("p/user_input", r#"{"sessionId":"late","message":"hello?"}"#)
        .await;
    c.nothing_on(
        |t| is_reply(t) || t.ends_with("/status"),
        Duration::from_millis(300),
    )
    .await;
}

/// A turn still running when the shutdown grace is over is answered with
/// the overloaded text (clients retry on it) before the gateway goes offline.
#[tokio::test]
async fn a_turn_abandoned_at_shutdown_is_told_to_retry() {
    // Without the consumer lease nobody would get the request again; with
    // it, see tests/tests/gateways.rs (it is left to the next consumer).
    let (_broker, fake, gw, mut c) = start_all(&["p"], |c| {
        c.shutdown_grace = Duration::from_millis(200);
        c.consumer_lease = None;
    })
    .await;

    let (topic, text) = shut_down_mid_turn(&mut c, &fake, &gw, "a", 5000).await;
    assert_eq!(
        (topic.as_str(), text.as_str()),
        ("p/assistant_response/a", OVERLOADED_TEXT)
    );
    let (_, status) = c.next_on(|t| t == "p/status").await;
    assert!(status.contains("offline"), "{status}");
    tokio::time::timeout(WAIT, gw.task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn last_will_and_heartbeat() {
    let broker = Broker::start();
    let session = start_fake(Fake::default()).await;
    let mut c = Client::connect(broker.port()).await;
    let mut cfg = config(&broker, session, &["p"]);
    cfg.heartbeat = Duration::from_millis(200);
    let gw = start_gateway(cfg).await;

    assert_eq!(
        c.reply_on("p/status").await,
        r#"{"service":"gw-test","status":"online"}"#
    );
    let beat: serde_json::Value = serde_json::from_str(&c.reply_on("p/status").await).unwrap();
    assert_eq!(beat["heartbeat"], true);
    assert_eq!(beat["status"], "online");

    // Dropping `run` (as a crash would) closes the connection without a
    // DISCONNECT: the broker publishes the will.
    gw.task.abort();
    loop {
        let text = c.reply_on("p/status").await;
        if text.contains("offline") {
            assert_eq!(text, r#"{"service":"gw-test","status":"offline"}"#);
            break;
        }
    }
}

#[tokio::test]
async fn oversize_packet_costs_a_reconnect_not_the_gateway() {
    let broker = Broker::start();
    let session = start_fake(Fake::default()).await;
    let mut registry = Registry::default();
    let mut cfg = config(&broker, session, &["p"]);
    cfg.max_packet_bytes = 32 * 1024;
    // A persistent session would have the broker deliver the oversize
    // request again at every reconnect: with the consumer lease the broker's
    // message_size_limit must stay below max-packet-bytes (README).
    cfg.consumer_lease = None;
    // Under MQTT 5 the broker knows the limit and drops the packet itself
    // (the next test); under 3.1.1 it sends it.
    cfg.mqtt_protocol = Protocol::V311;
    let gw = Gateway::new(cfg, &mut registry).unwrap();
    let mut ready = gw.ready_watch();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(gw.run(shutdown.clone()));
    tokio::time::timeout(WAIT, ready.wait_for(|r| *r))
        .await
        .unwrap()
        .unwrap();
    let mut c = Client::connect(broker.port()).await;

    // Over max-payload-bytes (4 KiB here), within max-packet-bytes (32 KiB):
    // read, dropped and counted, the connection kept.
    c.publish("p/user_input", vec![b'x'; 24 * 1024]).await;
    c.publish(
        "p/user_input",
        r#"{"sessionId":"ok","message":"still here"}"#,
    )
    .await;
    assert_eq!(
        c.reply_on("p/assistant_response/ok").await,
        "echo[ok]: still here"
    );
    assert!(*ready.borrow(), "the connection was kept");
    assert!(
        metrics_text(&registry).contains(r#"palaver_gateway_dropped_total{reason="too_large"} 1"#),
        "{}",
        metrics_text(&registry)
    );

    // Over max-packet-bytes: rumqttc refuses the packet and the connection
    // is re-established.
    c.publish("p/user_input", vec![b'x'; 64 * 1024]).await;
    tokio::time::timeout(WAIT, ready.wait_for(|r| !*r))
        .await
        .unwrap()
        .unwrap();
    tokio::time::timeout(WAIT, ready.wait_for(|r| *r))
        .await
        .unwrap()
        .unwrap();
    c.publish("p/user_input", r#"{"sessionId":"ok","message":"back"}"#)
        .await;
    assert_eq!(
        c.reply_on("p/assistant_response/ok").await,
        "echo[ok]: back"
    );

    shutdown.cancel();
    task.await.unwrap().unwrap();
}

/// Under MQTT 5 the gateway tells the broker its largest packet: a larger
/// request is dropped by the broker, and the connection stays up.
#[tokio::test]
async fn under_mqtt_5_the_broker_drops_an_oversize_packet() {
    let broker = Broker::start();
    let session = start_fake(Fake::default()).await;
    let mut registry = Registry::default();
    let mut cfg = config(&broker, session, &["p"]);
    cfg.max_packet_bytes = 32 * 1024;
    assert_eq!(cfg.mqtt_protocol, Protocol::V5);
    let gw = Gateway::new(cfg, &mut registry).unwrap();
    let mut ready = gw.ready_watch();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(gw.run(shutdown.clone()));
    tokio::time::timeout(WAIT, ready.wait_for(|r| *r))
        .await
        .unwrap()
        .unwrap();
    let mut c = Client::connect(broker.port()).await;
    let kept = ready.clone();
    c.publish("p/user_input", vec![b'x'; 64 * 1024]).await;
    c.publish(
        "p/user_input",
        r#"{"sessionId":"ok","message":"still here"}"#,
    )
    .await;
    assert_eq!(
        c.reply_on("p/assistant_response/ok").await,
        "echo[ok]: still here"
    );
    assert!(
        !kept.has_changed().unwrap(),
        "the connection never went down"
    );
    shutdown.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn resubscribes_after_a_broker_restart() {
    let broker = Broker::start();
    let session = start_fake(Fake::default()).await;
    let mut registry = Registry::default();
    let gw = Gateway::new(config(&broker, session, &["p", "q"]), &mut registry).unwrap();
    let mut ready = gw.ready_watch();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(gw.run(shutdown.clone()));
    tokio::time::timeout(WAIT, ready.wait_for(|r| *r))
        .await
        .unwrap()
        .unwrap();

    let broker = broker.restart();
    tokio::time::timeout(WAIT, ready.wait_for(|r| !*r))
        .await
        .unwrap()
        .unwrap();
    tokio::time::timeout(WAIT, ready.wait_for(|r| *r))
        .await
        .unwrap()
        .unwrap();
    let mut c = Client::connect(broker.port()).await;
    c.publish("q/user_input", r#"{"sessionId":"r","message":"again"}"#)
        .await;
    assert_eq!(c.reply_on("q/assistant_response/r").await, "echo[r]: again");

    shutdown.cancel();
    task.await.unwrap().unwrap();
}

/// The link to the broker breaks while a turn runs: the broker delivers the
/// unacknowledged request again on the new connection (persistent session),
/// and the gateway, still answering it, neither runs it a second time nor
/// answers it twice; the answer acknowledges it on the new connection.
#[tokio::test]
async fn a_request_delivered_again_while_answered_runs_once() {
    let broker = Broker::start();
    let fake = Fake::default();
    let session = start_fake(fake.clone()).await;
    let link = palaver_testkit::link::Link::start(([127, 0, 0, 1], broker.port()).into())
        .await
        .unwrap();
    let mut cfg = config(&broker, session, &["p"]);
    cfg.mqtt_port = link.addr().port();
    cfg.keep_alive = gateway::mqtt::MIN_V5_KEEP_ALIVE;
    let gw = start_gateway(cfg).await;
    let mut c = Client::connect(broker.port()).await;

    let arrived = fake.chat_arrived.notified();
    c.publish(
        "p/user_input",
        r#"{"sessionId":"d","message":"slow:1500","clientId":"c","requestId":"r1"}"#,
    )
    .await;
    tokio::time::timeout(WAIT, arrived).await.unwrap();
    link.cut();
    tokio::time::sleep(Duration::from_millis(300)).await;
    link.restore();

    assert_eq!(
        c.reply_on("p/assistant_response/d").await,
        "echo[d]: slow:1500"
    );
    c.nothing_on(is_reply, Duration::from_secs(2)).await;
    assert_eq!(fake.calls.lock().unwrap().chats.len(), 1, "run once");
    gw.shutdown.cancel();
    gw.task.await.unwrap().unwrap();
}
