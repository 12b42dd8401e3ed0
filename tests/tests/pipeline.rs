//! The design's core promises, end to end over MQTT: sessions do not wait
//! for each other, a session's second message does not wait for its first
//! reply, at most 8 generations reach vLLM at once, and history stays in order.
//!
//! Every timing bound is relative to the fake vLLM's latency `L`.

use std::time::Duration;

use futures::future::join_all;
use palaver_proto::session::v1::{chat_event, ChatRequest, Role, SessionRef};
use palaver_tests::{Stack, StackOptions};
use serde_json::json;
use tokio::time::Instant;

/// The fake's latency for these tests: long enough that scheduling noise on
/// a loaded 2-core CI machine is small beside it.
const L: Duration = Duration::from_millis(800);

fn slow_backend() -> StackOptions {
    StackOptions::with_backend(L, Duration::ZERO, 4)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sessions_in_different_projects_do_not_wait_for_each_other() {
    let stack = Stack::start(slow_backend()).await;
    let mut c = stack.mqtt().await;
    c.subscribe("general/assistant_response/#").await;
    c.subscribe("driving/assistant_response/#").await;

    let t0 = Instant::now();
    c.publish(
        "general/user_input",
        json!({"message": "hello from A", "sessionId": "a"}).to_string(),
    )
    .await;
    c.publish(
        "driving/user_input",
        json!({"message": "hello from B", "sessionId": "b"}).to_string(),
    )
    .await;
    let replies = c.recv_n(2, 3 * L).await;
    let mut topics: Vec<_> = replies.iter().map(|r| r.topic.as_str()).collect();
    topics.sort();
    assert_eq!(
        topics,
        [
            "driving/assistant_response/b",
            "general/assistant_response/a"
        ]
    );
    for r in &replies {
        let took = r.at - t0;
        assert!(took >= L, "faster than the backend ({took:?}): not real");
        assert!(
            took < L.mul_f64(1.5),
            "reply took {took:?}: one session waited for the other (L = {L:?})"
        );
        assert!(!r.payload.starts_with("Error"), "{}", r.payload);
    }
    assert_eq!(
        stack.vllm.max_in_flight(),
        2,
        "both generations ran at once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sessions_messages_do_not_wait_for_earlier_replies_and_history_stays_ordered() {
    let stack = Stack::start(slow_backend()).await;
    let mut c = stack.mqtt().await;
    c.subscribe("general/assistant_response/s1/#").await;

    let t0 = Instant::now();
    for i in 1..=3 {
        c.publish(
            "general/user_input",
            json!({
                "message": format!("u{i}"),
                "sessionId": "s1",
                "replyTopic": format!("general/assistant_response/s1/cli/{i}"),
                "requestId": format!("{i}"),
            })
            .to_string(),
        )
        .await;
    }
    let replies = c.recv_n(3, 4 * L).await;
    let last = replies.iter().map(|r| r.at - t0).max().unwrap();
    assert!(
        last < 2 * L,
        "three replies took {last:?}: messages waited for each other (L = {L:?})"
    );
    for r in &replies {
        let i = r.topic.rsplit('/').next().unwrap();
        assert!(
            r.payload.contains(&format!("u{i}")),
            "reply on {} answers the wrong message: {}",
            r.topic,
            r.payload
        );
    }

    let history = stack
        .sessions(0)
        .await
        .get_history(SessionRef {
            project: "general".into(),
            session_id: "s1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let roles: Vec<_> = history.messages.iter().map(|m| m.role()).collect();
    assert_eq!(
        roles,
        [
            Role::User,
            Role::Assistant,
            Role::User,
            Role::Assistant,
            Role::User,
            Role::Assistant
        ]
    );
    for (i, pair) in history.messages.chunks(2).enumerate() {
        let u = format!("u{}", i + 1);
        assert_eq!(pair[0].content, u);
        assert!(
            pair[1].content.contains(&u),
            "{} after {u}",
            pair[1].content
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_sessions_share_eight_slots() {
    let stack = Stack::start(slow_backend()).await;
    let mut c = stack.mqtt().await;
    c.subscribe("general/assistant_response/#").await;

    let t0 = Instant::now();
    for i in 0..10 {
        c.publish(
            "general/user_input",
            json!({"message": format!("m{i}"), "sessionId": format!("ten-{i}")}).to_string(),
        )
        .await;
    }
    let replies = c.recv_n(10, 5 * L).await;
    let mut times: Vec<_> = replies.iter().map(|r| r.at - t0).collect();
    times.sort();
    for r in &replies {
        assert!(
            !r.payload.starts_with("Error"),
            "{}: {}",
            r.topic,
            r.payload
        );
    }
    assert_eq!(
        stack.vllm.max_in_flight(),
        8,
        "the limit is 8 and was reached"
    );
    assert!(
        times[7] < L.mul_f64(1.5),
        "first eight at {:?}",
        &times[..8]
    );
    // The last two waited for a slot: they end about one latency later.
    let last = times[9];
    assert!(
        last >= L.mul_f64(1.9) && last < L.mul_f64(2.6),
        "last reply at {last:?}, expected about 2 x {L:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_streamed_turns_hold_their_slot_until_the_last_token() {
    // Streams that spend most of their time after the first token: a limit
    // released at the first byte would let all ten run at once. The fake
    // waits ttft, then tpot between tokens: L = ttft + (tokens - 1) * tpot.
    let (ttft, tpot, tokens) = (Duration::from_millis(30), Duration::from_millis(110), 8);
    let latency = ttft + tpot * (tokens as u32 - 1);
    let stack = Stack::start(StackOptions::with_backend(ttft, tpot, tokens)).await;
    let client = stack.sessions(0).await;
    let t0 = Instant::now();
    let turns = (0..10).map(|i| {
        let mut client = client.clone();
        async move {
            let mut stream = client
                .chat_stream(ChatRequest {
                    project: "general".into(),
                    session_id: format!("stream-{i}"),
                    message: format!("m{i}"),
                    ..Default::default()
                })
                .await
                .expect("stream starts")
                .into_inner();
            let (mut deltas, mut text) = (String::new(), None);
            while let Some(ev) = stream.message().await.expect("stream ok") {
                match ev.event {
                    Some(chat_event::Event::Delta(d)) => deltas.push_str(&d),
                    Some(chat_event::Event::Done(r)) => text = Some(r.text),
                    Some(chat_event::Event::Accepted(_)) | None => {}
                }
            }
            let text = text.expect("a final event");
            assert_eq!(deltas, text, "deltas add up to the stored reply");
            (t0.elapsed(), text)
        }
    });
    let mut done: Vec<_> = join_all(turns).await;
    done.sort_by_key(|(t, _)| *t);
    assert_eq!(stack.vllm.max_in_flight(), 8);
    assert!(
        done[7].0 < latency.mul_f64(1.5),
        "first eight at {:?}",
        &done[..8]
    );
    let last = done[9].0;
    assert!(
        last >= latency.mul_f64(1.9) && last < latency.mul_f64(2.6),
        "last stream ended at {last:?}, expected about 2 x {latency:?}"
    );
}
