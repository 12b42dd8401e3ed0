//! The old clients' rate limit: 20 messages per 60 s per session.

use std::time::Duration;

use palaver_proto::session::v1::{chat_event, ChatRequest};
use palaver_tests::{Stack, StackOptions};
use serde_json::json;

const RATE_LIMITED: &str = "Error: Rate limit exceeded. Please slow down your requests.";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_21st_message_in_a_minute_is_refused_and_other_sessions_are_not() {
    let stack = Stack::start(StackOptions::replying_after(Duration::from_millis(5))).await;
    let mut c = stack.mqtt().await;
    c.subscribe("general/assistant_response/#").await;
    let send = |sid: &'static str, i: usize| {
        json!({"message": format!("m{i}"), "sessionId": sid}).to_string()
    };
    for i in 1..=20 {
        c.publish("general/user_input", send("busy", i)).await;
        let r = c.recv(Duration::from_secs(10)).await.expect("a reply");
        assert_eq!(r.topic, "general/assistant_response/busy");
        assert!(
            r.payload.contains(&format!("m{i}")),
            "message {i}: {}",
            r.payload
        );
    }
    c.publish("general/user_input", send("busy", 21)).await;
    let r = c.recv(Duration::from_secs(10)).await.expect("a reply");
    assert_eq!(r.payload, RATE_LIMITED);
    assert_eq!(
        stack.vllm.requests(),
        20,
        "the refused message never reached the model"
    );

    c.publish("general/user_input", send("calm", 1)).await;
    let r = c.recv(Duration::from_secs(10)).await.expect("a reply");
    assert_eq!(r.topic, "general/assistant_response/calm");
    assert!(r.payload.contains("m1"), "{}", r.payload);
}

/// Over gRPC: a streamed turn answers with `accepted` first, and one the
/// rate limit refuses fails the call itself, before any stream exists, with
/// the same status a unary turn gets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_turn_refused_at_the_door_fails_the_call() {
    let stack = Stack::start(StackOptions::replying_after(Duration::from_millis(5))).await;
    let mut client = stack.sessions(0).await;
    let request = |i: usize| ChatRequest {
        project: "general".into(),
        session_id: "door".into(),
        message: format!("m{i}"),
        final_only: true,
        ..Default::default()
    };
    for i in 1..=20 {
        let mut events = client
            .chat_stream(request(i))
            .await
            .unwrap_or_else(|e| panic!("turn {i} refused: {e}"))
            .into_inner();
        let first = events.message().await.unwrap().expect("a first event");
        assert!(
            matches!(first.event, Some(chat_event::Event::Accepted(_))),
            "turn {i} began with {first:?}"
        );
        let last = events.message().await.unwrap().expect("a second event");
        assert!(
            matches!(last.event, Some(chat_event::Event::Done(ref r)) if r.text.contains(&format!("m{i}"))),
            "turn {i} ended with {last:?}"
        );
    }
    let refused = client
        .chat_stream(request(21))
        .await
        .expect_err("the 21st turn fails the call");
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    assert_eq!(
        stack.vllm.requests(),
        20,
        "the refused turn never reached the model"
    );
}

/// `general` with a per-session limit of `per_session`; the per-client limit
/// is its default, three times that.
fn limited(per_session: u32) -> palaver_core::projects::Projects {
    palaver_core::projects::Projects::from_toml(&format!(
        "[projects.general]\nrate_limit = {per_session}\n"
    ))
    .expect("test projects parse")
}

/// The reply to `payload`, sent on `general/user_input`.
async fn ask(c: &mut palaver_testkit::mqtt::TestClient, payload: serde_json::Value) -> String {
    c.publish("general/user_input", payload.to_string()).await;
    let r = c.recv(Duration::from_secs(10)).await.expect("a reply");
    assert!(r.topic.starts_with("general/assistant_response/"), "{r:?}");
    r.payload
}

/// An abuser cannot reset a session's window: clearing its history or
/// deleting it (both over the control topics anyone may use) leaves the
/// count as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clearing_or_deleting_a_session_does_not_reset_its_limit() {
    let stack = Stack::start(StackOptions {
        projects: limited(3),
        ..StackOptions::replying_after(Duration::from_millis(5))
    })
    .await;
    let mut c = stack.mqtt().await;
    c.subscribe("general/assistant_response/#").await;
    c.subscribe("general/hint/#").await;
    let msg = |i: usize| json!({"message": format!("m{i}"), "sessionId": "again"});
    for i in 1..=3 {
        let reply = ask(&mut c, msg(i)).await;
        assert!(reply.contains(&format!("m{i}")), "message {i}: {reply}");
    }
    c.publish("general/clear_history/again", "").await;
    let hint = c.recv(Duration::from_secs(10)).await.expect("an ack");
    assert_eq!(hint.payload, r#"{"hint":"History cleared"}"#);
    assert_eq!(ask(&mut c, msg(4)).await, RATE_LIMITED, "after a clear");
    c.publish("general/delete_session/again", "").await;
    let hint = c.recv(Duration::from_secs(10)).await.expect("an ack");
    assert_eq!(hint.payload, r#"{"hint":"Session deleted"}"#);
    assert_eq!(ask(&mut c, msg(5)).await, RATE_LIMITED, "after a delete");
    assert_eq!(stack.vllm.requests(), 3);
}

/// One client (clientId) gets three sessions' worth of requests a window,
/// however many session ids it makes up; other clients and anonymous
/// requests are not held back by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_limit_holds_across_fresh_session_ids() {
    let stack = Stack::start(StackOptions {
        projects: limited(2),
        ..StackOptions::replying_after(Duration::from_millis(5))
    })
    .await;
    let mut c = stack.mqtt().await;
    c.subscribe("general/assistant_response/#").await;
    let fresh = |client: Option<&str>, i: usize| {
        let mut m = json!({"message": format!("m{i}"), "sessionId": format!("fresh-{i}")});
        if let Some(client) = client {
            m["clientId"] = json!(client);
        }
        m
    };
    for i in 1..=6 {
        let reply = ask(&mut c, fresh(Some("greedy"), i)).await;
        assert!(reply.contains(&format!("m{i}")), "message {i}: {reply}");
    }
    assert_eq!(ask(&mut c, fresh(Some("greedy"), 7)).await, RATE_LIMITED);
    let other = ask(&mut c, fresh(Some("other"), 8)).await;
    assert!(other.contains("m8"), "{other}");
    let anonymous = ask(&mut c, fresh(None, 9)).await;
    assert!(anonymous.contains("m9"), "{anonymous}");
    assert_eq!(stack.vllm.requests(), 8);
}
