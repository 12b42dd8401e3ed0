//! A service killed mid-turn and started again within the turn's deadline:
//! clients notice nothing but time (DESIGN.md, turn integrity: delivery).

use std::net::SocketAddr;
use std::time::Duration;

use futures::future::join_all;
use palaver_core::projects::Projects;
use palaver_proto::session::v1::{Role, SessionRef};
use palaver_tests::{Stack, StackOptions};
use prometheus_client::registry::Registry;
use serde_json::json;
use session_svc::keys::KeySpace;
use tokio_util::sync::CancellationToken;

const SESSIONS: usize = 8;
const TURNS: usize = 6;

fn roomy() -> Projects {
    Projects::from_toml("[projects.general]\nrate_limit = 0\n").unwrap()
}

/// session-svc in a runtime of its own on a fixed address: dropping the
/// runtime ends its every task and connection at once, as `kill -9` would.
struct SessionSvc {
    runtime: Option<tokio::runtime::Runtime>,
}

impl SessionSvc {
    async fn start(stack: &Stack, addr: SocketAddr) -> SessionSvc {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let (redis, inference) = (stack.redis.url(), stack.inference_url.clone());
        let serving = runtime.spawn(async move {
            let store = session_svc::RedisStore::connect(&redis, KeySpace::default())
                .await
                .unwrap();
            let mut cfg = session_svc::Config::new(inference);
            cfg.projects = roomy();
            let server = session_svc::Server::new(cfg, store, &mut Registry::default()).unwrap();
            let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
            tokio::spawn(server.serve(listener, CancellationToken::new()));
        });
        serving.await.unwrap();
        SessionSvc {
            runtime: Some(runtime),
        }
    }

    fn kill(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for SessionSvc {
    fn drop(&mut self) {
        self.kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_svc_killed_mid_turn_and_restarted_costs_clients_nothing() {
    let stack = Stack::start(StackOptions {
        projects: roomy(),
        gateway_started: false,
        ..StackOptions::replying_after(Duration::from_millis(300))
    })
    .await;
    let addr: SocketAddr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let mut svc = SessionSvc::start(&stack, addr).await;

    let mut config = palaver_tests::gateway_config(
        stack.broker.port(),
        format!("http://{addr}"),
        vec!["general".into()],
    );
    config.request_timeout = Duration::from_secs(30);
    let gw = gateway::Gateway::new(config, &mut Registry::default()).unwrap();
    let ready = gw.ready();
    let shutdown = CancellationToken::new();
    tokio::spawn(gw.run(shutdown.clone()));
    assert!(ready.await);

    // Each session sends its next message when the previous one is answered.
    let sessions = (0..SESSIONS).map(|s| {
        let stack = &stack;
        async move {
            let mut c = stack.mqtt().await;
            c.subscribe(&format!("general/assistant_response/r{s}/#"))
                .await;
            let mut replies = Vec::new();
            for t in 0..TURNS {
                let text = format!("r{s}-t{t}");
                let payload = json!({"message": text, "sessionId": format!("r{s}"),
                    "clientId": "c", "requestId": text,
                    "replyTopic": format!("general/assistant_response/r{s}/c/{text}")});
                c.publish("general/user_input", payload.to_string()).await;
                let r = c.recv(Duration::from_secs(40)).await.expect("a reply");
                replies.push(r.payload);
            }
            replies
        }
    });
    let outage = async {
        tokio::time::sleep(Duration::from_millis(700)).await;
        svc.kill();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        SessionSvc::start(&stack, addr).await
    };
    let (replies, _restarted) = tokio::join!(join_all(sessions), outage);
    for (s, rs) in replies.iter().enumerate() {
        for (t, r) in rs.iter().enumerate() {
            assert!(r.contains(&format!("r{s}-t{t}")), "r{s} turn {t}: {r}");
        }
    }
    let mut client = stack.sessions(0).await;
    for s in 0..SESSIONS {
        let history = client
            .get_history(SessionRef {
                project: "general".into(),
                session_id: format!("r{s}"),
            })
            .await
            .unwrap()
            .into_inner()
            .messages;
        let users: Vec<String> = history
            .iter()
            .filter(|m| m.role() == Role::User)
            .map(|m| m.content.clone())
            .collect();
        let sent: Vec<String> = (0..TURNS).map(|t| format!("r{s}-t{t}")).collect();
        assert_eq!(users, sent, "r{s}: every message once, in order");
        assert_eq!(history.len(), 2 * TURNS, "r{s}: each answered");
    }
    shutdown.cancel();
}
