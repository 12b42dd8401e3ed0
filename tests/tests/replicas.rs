//! Several session-svc replicas on one Redis: the lock, not luck, keeps the
//! history whole.

use std::collections::HashSet;
use std::time::Duration;

use futures::future::join_all;
use palaver_core::projects::Projects;
use palaver_proto::session::v1::{ChatRequest, Role, SessionRef};
use palaver_tests::{Stack, StackOptions};
use session_svc::keys::KeySpace;
use tokio::time::Instant;

/// One project with no rate limit and room for the whole history.
fn roomy_projects() -> Projects {
    Projects::from_toml(
        "[projects.general]\nrate_limit = 0\nmax_history_messages = 1000\nmax_history_tokens = 1000000\n",
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_turns_on_one_session_across_two_replicas_lose_nothing() {
    let stack = Stack::start(StackOptions {
        projects: roomy_projects(),
        session_replicas: 2,
        ..StackOptions::with_backend(Duration::from_millis(30), Duration::from_millis(2), 3)
    })
    .await;
    let clients = [stack.sessions(0).await, stack.sessions(1).await];
    let turns = (0..50).map(|i| {
        let mut c = clients[i % 2].clone();
        async move {
            c.chat(ChatRequest {
                project: "general".into(),
                session_id: "shared".into(),
                message: format!("msg-{i:02}"),
                request_id: format!("req-{i}"),
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner().text)
        }
    });
    for (i, r) in join_all(turns).await.into_iter().enumerate() {
        let text = r.unwrap_or_else(|s| panic!("turn {i} failed: {s:?}"));
        assert!(text.contains(&format!("msg-{i:02}")), "turn {i} got {text}");
    }

    let history = clients[1]
        .clone()
        .get_history(SessionRef {
            project: "general".into(),
            session_id: "shared".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .messages;
    assert_eq!(history.len(), 100, "50 messages and 50 replies");
    let mut seen = HashSet::new();
    for pair in history.chunks(2) {
        assert_eq!(pair[0].role(), Role::User);
        assert_eq!(pair[1].role(), Role::Assistant);
        assert!(
            pair[1].content.contains(&pair[0].content),
            "reply {:?} is not after its message {:?}",
            pair[1].content,
            pair[0].content
        );
        assert!(
            seen.insert(pair[0].content.clone()),
            "{} twice",
            pair[0].content
        );
    }
    assert_eq!(seen.len(), 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_left_by_a_dead_holder_frees_itself_after_its_ttl() {
    let stack = Stack::start(StackOptions::replying_after(Duration::from_millis(10))).await;
    // A replica took the lock and died: nobody will ever release it.
    let ttl = Duration::from_millis(1000);
    let lock = KeySpace::default().session("general", "orphan").lock;
    let redis = redis::Client::open(stack.redis.url()).unwrap();
    let mut conn = redis.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("SET")
        .arg(&lock)
        .arg("token-of-a-dead-replica")
        .arg("PX")
        .arg(ttl.as_millis() as u64)
        .query_async(&mut conn)
        .await
        .unwrap();

    let t0 = Instant::now();
    let reply = stack
        .sessions(0)
        .await
        .chat(ChatRequest {
            project: "general".into(),
            session_id: "orphan".into(),
            message: "anyone there?".into(),
            ..Default::default()
        })
        .await
        .expect("the turn succeeds once the lock expires")
        .into_inner();
    let took = t0.elapsed();
    assert!(reply.text.contains("anyone there?"));
    assert!(
        took >= ttl.mul_f64(0.9),
        "finished in {took:?}: the dead holder's lock was ignored"
    );
    assert!(took < ttl * 3, "took {took:?} for a {ttl:?} lock");
}
