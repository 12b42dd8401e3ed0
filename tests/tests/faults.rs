//! vLLM failing in each way it really fails: every turn ends in an
//! `Error: …` reply within the configured timeout, and the session's next
//! message works.

use std::time::Duration;

use palaver_testkit::fake_vllm::Fault;
use palaver_tests::{Stack, StackOptions, TestClient};
use serde_json::json;
use tokio::time::Instant;

/// inference-svc's first-token and idle timeouts in these tests.
const TIMEOUT: Duration = Duration::from_millis(1500);

async fn stack() -> Stack {
    Stack::start(StackOptions {
        inference: Box::new(|c| {
            c.first_token_timeout = TIMEOUT;
            c.idle_timeout = TIMEOUT;
            c.request_timeout = TIMEOUT * 4;
        }),
        ..StackOptions::with_backend(Duration::from_millis(20), Duration::from_millis(5), 6)
    })
    .await
}

async fn ask(c: &mut TestClient, sid: &str, text: &str) -> (String, Duration) {
    let t0 = Instant::now();
    c.publish(
        "general/user_input",
        json!({"sessionId": sid, "message": text}).to_string(),
    )
    .await;
    let r = c
        .recv(TIMEOUT * 4)
        .await
        .unwrap_or_else(|| panic!("no reply to {text:?}"));
    assert_eq!(r.topic, format!("general/assistant_response/{sid}"));
    (r.payload, t0.elapsed())
}

async fn check_recovers(stack: &Stack, c: &mut TestClient, sid: &str) {
    stack.vllm.set_fault(Fault::None);
    let (reply, _) = ask(c, sid, "are you back?").await;
    assert!(reply.contains("are you back?"), "after the fault: {reply}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_backend_fault_ends_in_an_error_reply_and_the_session_recovers() {
    let stack = stack().await;
    let mut c = stack.mqtt().await;
    c.subscribe("general/assistant_response/#").await;

    let faults: Vec<(&str, Fault, &str)> = vec![
        (
            "context too long",
            Fault::ContextTooLong,
            "Error: The conversation is too long",
        ),
        (
            "500",
            Fault::Status(
                500,
                r#"{"error":{"message":"engine died","type":"InternalServerError","code":500}}"#
                    .into(),
            ),
            "Error: The model is unavailable",
        ),
        (
            "503 past vLLM's queue limit",
            Fault::Status(
                503,
                r#"{"error":{"message":"too many waiting requests","code":503}}"#.into(),
            ),
            "Server is overloaded. Please try again in a moment.",
        ),
        ("error mid-stream", Fault::ErrorMidStream, "Error: "),
        (
            "abort mid-stream",
            Fault::AbortMidStream,
            "Error: The model is unavailable",
        ),
        ("hang", Fault::Hang, "Error: The request timed out"),
    ];
    for (i, (name, fault, want)) in faults.into_iter().enumerate() {
        let sid = format!("fault-{i}");
        stack.vllm.set_fault(fault);
        let (reply, took) = ask(&mut c, &sid, "hello").await;
        assert!(reply.starts_with(want), "{name}: got {reply:?}");
        assert!(took < TIMEOUT * 2, "{name}: error took {took:?}");
        check_recovers(&stack, &mut c, &sid).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_refuses_connections_gives_an_error_then_recovers() {
    let stack = stack().await;
    let mut c = stack.mqtt().await;
    c.subscribe("general/assistant_response/#").await;
    let (reply, _) = ask(&mut c, "down", "first").await;
    assert!(reply.contains("first"), "{reply}");

    stack.vllm.stop_listening().await;
    let (reply, took) = ask(&mut c, "down", "anyone?").await;
    assert!(
        reply.starts_with("Error: The model is unavailable"),
        "{reply}"
    );
    assert!(
        took < TIMEOUT,
        "refused connections fail fast, took {took:?}"
    );

    stack.vllm.listen_again().await;
    check_recovers(&stack, &mut c, "down").await;
    // The failed turn left nothing behind.
    let history = stack
        .sessions(0)
        .await
        .get_history(palaver_proto::session::v1::SessionRef {
            project: "general".into(),
            session_id: "down".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let texts: Vec<_> = history
        .messages
        .iter()
        .map(|m| m.content.as_str())
        .collect();
    assert_eq!(texts.len(), 4, "{texts:?}");
    assert_eq!(texts[0], "first");
    assert_eq!(texts[2], "are you back?");
}
