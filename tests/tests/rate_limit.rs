//! The old clients' rate limit: 20 messages per 60 s per session.

use std::time::Duration;

use palaver_tests::{Stack, StackOptions};
use serde_json::json;

const RATE_LIMITED: &str = "Error: Rate limit exceeded. Please slow down your requests.";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_21st_message_in_a_minute_is_refused_and_other_sessions_are_not() {
    let stack = Stack::start(StackOptions::with_backend(
        Duration::from_millis(5),
        Duration::ZERO,
        2,
    ))
    .await;
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
