//! Several gateways on one broker keep each session's messages in the order
//! the broker delivered them — also when the consuming gateway dies
//! mid-burst — and lose none (DESIGN.md, turn integrity: order).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use palaver_core::projects::Projects;
use palaver_proto::session::v1::{Role, SessionRef};
use palaver_tests::{Stack, StackOptions, TestClient};
use prometheus_client::registry::Registry;
use serde_json::json;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Short, so that a takeover after a crash is quick to test.
const LEASE: Duration = Duration::from_millis(1000);
const SESSIONS: usize = 4;
const BURSTS: usize = 20;
const BURST: usize = 8;

/// A gateway in its own runtime: dropping the runtime ends every task and
/// socket of it at once, as `kill -9` would the process.
struct Gw {
    runtime: Option<tokio::runtime::Runtime>,
    registry: Registry,
    shutdown: CancellationToken,
}

impl Gw {
    async fn start(stack: &Stack) -> Gw {
        let mut config = palaver_tests::gateway_config(
            stack.broker.port(),
            stack.session_urls[0].clone(),
            vec!["general".into()],
        );
        // One deployment: one client id (the project's persistent session).
        config.client_id = "gw-deployment".into();
        config.consumer_lease = Some(LEASE);
        let mut registry = Registry::default();
        let gw = gateway::Gateway::new(config, &mut registry).unwrap();
        let ready = gw.ready();
        let shutdown = CancellationToken::new();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        runtime.spawn(gw.run(shutdown.clone()));
        let ready = runtime.spawn(ready);
        assert!(tokio::time::timeout(Duration::from_secs(10), ready)
            .await
            .expect("ready or standing by in time")
            .unwrap());
        Gw {
            runtime: Some(runtime),
            registry,
            shutdown,
        }
    }

    /// Whether this gateway consumes the project now.
    fn consuming(&self) -> bool {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).unwrap();
        text.contains("palaver_gateway_subscribed{project=\"general\"} 1")
    }

    fn kill(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for Gw {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.kill();
    }
}

fn roomy() -> Projects {
    Projects::from_toml(
        "[projects.general]\nrate_limit = 0\nmax_history_messages = 1000\nmax_history_tokens = 1000000\n",
    )
    .unwrap()
}

fn message(session: usize, burst: usize, i: usize) -> String {
    format!("s{session}-b{burst:02}-m{i}")
}

/// Publishes every burst to every session, waits for each burst's replies,
/// kills the consuming gateway halfway through burst `kill_at`, and checks
/// each session's history: every message once, in the order sent.
async fn bursts_keep_order(gateways: usize, kill_at: Option<usize>) {
    let stack = Stack::start(StackOptions {
        projects: roomy(),
        gateway_started: false,
        ..StackOptions::with_backend(Duration::from_millis(40), Duration::from_millis(2), 4)
    })
    .await;
    let mut gws = Vec::new();
    for _ in 0..gateways {
        gws.push(Gw::start(&stack).await);
    }
    let mut c: TestClient = stack.mqtt().await;
    c.subscribe("general/assistant_response/#").await;
    let mut answered: HashSet<String> = HashSet::new();
    for burst in 0..BURSTS {
        let mut expected = HashSet::new();
        // One session's burst back to back, as a user typing fast: with
        // `$share` consecutive messages would go to different gateways.
        for s in 0..SESSIONS {
            for i in 0..BURST {
                if kill_at == Some(burst) && s == SESSIONS / 2 && i == BURST / 2 {
                    let active = gws.iter_mut().find(|g| g.consuming()).expect("a consumer");
                    active.kill();
                }
                let text = message(s, burst, i);
                let payload = json!({"message": text, "sessionId": format!("s{s}"),
                    "clientId": "c", "requestId": text,
                    "replyTopic": format!("general/assistant_response/s{s}/c/{text}")});
                c.publish("general/user_input", payload.to_string()).await;
                expected.insert(text);
            }
        }
        // Within the takeover (one lease TTL) plus the turns themselves.
        let deadline = Instant::now() + LEASE * 3 + Duration::from_secs(10);
        while !expected.iter().all(|m| answered.contains(m)) {
            let left = deadline.saturating_duration_since(Instant::now());
            let r = c.recv(left).await.unwrap_or_else(|| {
                let missing: Vec<_> = expected.difference(&answered).collect();
                panic!("burst {burst}: no reply to {missing:?}")
            });
            assert!(
                !r.payload.starts_with("Error"),
                "{}: {}",
                r.topic,
                r.payload
            );
            let request = r.topic.rsplit('/').next().unwrap_or_default().to_owned();
            answered.insert(request);
        }
    }

    let mut sessions = stack.sessions(0).await;
    for s in 0..SESSIONS {
        let history = sessions
            .get_history(SessionRef {
                project: "general".into(),
                session_id: format!("s{s}"),
            })
            .await
            .unwrap()
            .into_inner()
            .messages;
        let users: Vec<&str> = history
            .iter()
            .filter(|m| m.role() == Role::User)
            .map(|m| m.content.as_str())
            .collect();
        let sent: Vec<String> = (0..BURSTS)
            .flat_map(|b| (0..BURST).map(move |i| message(s, b, i)))
            .collect();
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for u in &users {
            *counts.entry(u).or_default() += 1;
        }
        assert!(counts.values().all(|n| *n == 1), "s{s}: a message twice");
        assert_eq!(users, sent, "s{s}: every message once, in order");
        assert_eq!(history.len(), 2 * sent.len(), "s{s}: each answered");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_keep_each_sessions_order() {
    bursts_keep_order(2, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_gateways_keep_each_sessions_order() {
    bursts_keep_order(3, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consuming_gateway_killed_mid_burst_loses_and_reorders_nothing() {
    bursts_keep_order(2, Some(BURSTS / 2)).await;
}
