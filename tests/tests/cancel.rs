//! A caller that goes away mid-turn must not keep using a GPU slot, nor
//! leave its message in the history without a reply.

use std::time::Duration;

use palaver_proto::session::v1::{ChatRequest, SessionRef};
use palaver_tests::{Stack, StackOptions};
use tokio::time::Instant;

async fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "{what} within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_leaving_mid_generation_frees_the_slot_and_takes_the_message_back() {
    let stack = Stack::start(StackOptions::with_backend(
        Duration::from_secs(30),
        Duration::from_millis(5),
        16,
    ))
    .await;
    let mut client = stack.sessions(0).await;
    let request = ChatRequest {
        project: "general".into(),
        session_id: "leaver".into(),
        message: "never mind".into(),
        final_only: true,
        ..Default::default()
    };
    let mut events = client.chat_stream(request).await.unwrap().into_inner();
    events.message().await.unwrap().expect("accepted");
    wait_until(
        "the generation reaches vLLM",
        Duration::from_secs(5),
        || stack.vllm.in_flight() == 1,
    )
    .await;

    drop(events);
    wait_until("vLLM's request is aborted", Duration::from_secs(3), || {
        stack.vllm.in_flight() == 0
    })
    .await;

    let history = || {
        let mut c = client.clone();
        async move {
            c.get_history(SessionRef {
                project: "general".into(),
                session_id: "leaver".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .messages
        }
    };
    let deadline = Instant::now() + Duration::from_secs(3);
    while !history().await.is_empty() {
        assert!(Instant::now() < deadline, "the message was not taken back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
