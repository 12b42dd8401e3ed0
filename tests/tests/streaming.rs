//! Replies as they are written, and cancel: opt-in pieces on
//! `<replyTopic>/stream`, `<project>/cancel/<sid>` over MQTT, and
//! `Sessions/CancelTurn` over gRPC, against a real mosquitto and a fake vLLM
//! streaming at a set pace.

use std::time::Duration;

use palaver_proto::session::v1::{chat_event, CancelTurnRequest, ChatRequest, Role, SessionRef};
use palaver_testkit::fake_vllm::{FakeVllmConfig, Reply};
use palaver_testkit::mqtt::{Received, TestClient};
use palaver_tests::{Stack, StackOptions};
use serde_json::{json, Value};
use tokio::time::Instant;

/// The gateway's least gap between two pieces of one turn.
const GAP: Duration = Duration::from_millis(50);

fn backend(ttft: Duration, tpot: Duration, reply: Reply) -> StackOptions {
    StackOptions {
        vllm: FakeVllmConfig {
            ttft,
            tpot,
            tokens: 200,
            reply,
            ..FakeVllmConfig::default()
        },
        ..StackOptions::default()
    }
}

fn words(n: usize) -> String {
    (0..n).map(|i| format!("w{i} ")).collect::<String>() + "end."
}

fn request(session: &str, request_id: &str, stream: bool) -> (String, String) {
    let reply_topic = format!("general/assistant_response/{session}/c1/{request_id}");
    let mut body = json!({
        "message": "tell me", "sessionId": session, "replyTopic": reply_topic,
        "clientId": "c1", "requestId": request_id,
    });
    if stream {
        body["stream"] = json!(true);
    }
    (reply_topic, body.to_string())
}

/// Everything up to and including the message on `reply_topic`.
async fn until_reply(c: &mut TestClient, reply_topic: &str, timeout: Duration) -> Vec<Received> {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let m = c
            .recv(left)
            .await
            .unwrap_or_else(|| panic!("no reply on {reply_topic} within {timeout:?}: {out:#?}"));
        let done = m.topic == reply_topic;
        out.push(m);
        if done {
            return out;
        }
    }
}

/// The stream's pieces, parsed, checked to be numbered 0, 1, 2, ….
fn pieces(messages: &[Received], reply_topic: &str) -> Vec<(Value, Instant)> {
    let topic = format!("{reply_topic}/stream");
    let pieces: Vec<(Value, Instant)> = messages
        .iter()
        .filter(|m| m.topic == topic)
        .map(|m| {
            (
                serde_json::from_str(&m.payload).expect("a piece is JSON"),
                m.at,
            )
        })
        .collect();
    for (i, (p, _)) in pieces.iter().enumerate() {
        assert_eq!(p["seq"], json!(i), "pieces in order: {pieces:#?}");
    }
    pieces
}

fn deltas(pieces: &[(Value, Instant)]) -> String {
    pieces
        .iter()
        .filter_map(|(p, _)| p["delta"].as_str())
        .collect()
}

async fn history(stack: &Stack, session: &str) -> Vec<(i32, String)> {
    stack
        .sessions(0)
        .await
        .get_history(SessionRef {
            project: "general".into(),
            session_id: session.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .messages
        .into_iter()
        .map(|m| (m.role, m.content))
        .collect()
}

async fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !check() {
        assert!(t0.elapsed() < timeout, "{what} within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    t0.elapsed()
}

/// The message is taken back: the session's history ends up empty.
async fn wait_taken_back(stack: &Stack, session: &str) {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let h = history(stack, session).await;
        if h.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the message was not taken back: {h:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_turn_comes_in_order_and_adds_up_to_the_reply_and_the_stored_reply() {
    let ttft = Duration::from_millis(100);
    let tpot = Duration::from_millis(10);
    let stack = Stack::start(backend(ttft, tpot, Reply::Fixed(words(60)))).await;
    let mut c = stack.mqtt().await;
    c.subscribe("general/assistant_response/st/#").await;

    let (reply_topic, body) = request("st", "r1", true);
    let t0 = Instant::now();
    c.publish("general/user_input", body).await;
    let got = until_reply(&mut c, &reply_topic, Duration::from_secs(10)).await;
    let reply = &got.last().unwrap().payload;
    let pieces = pieces(&got, &reply_topic);

    let (last, _) = pieces.last().expect("pieces");
    assert_eq!(last["done"], json!(true), "{pieces:#?}");
    assert_eq!(last["finishReason"], json!("stop"));
    assert_eq!(&deltas(&pieces), reply, "the pieces add up to the reply");
    assert_eq!(reply, &words(60));
    let h = history(&stack, "st").await;
    assert_eq!(h.last().unwrap(), &(Role::Assistant as i32, reply.clone()));

    // Streamed: the first piece comes with the first token, long before
    // the last (60 tokens of 10 ms after it).
    let first_at = pieces[0].1 - t0;
    let reply_at = got.last().unwrap().at - t0;
    assert!(first_at >= ttft, "faster than the backend: {first_at:?}");
    assert!(
        first_at < ttft + Duration::from_millis(200),
        "first piece at {first_at:?}"
    );
    assert!(reply_at > first_at + 40 * tpot, "reply at {reply_at:?}");
    let n = pieces
        .iter()
        .filter(|(p, _)| p.get("delta").is_some())
        .count();
    assert!(n >= 3, "streamed in {n} pieces");
    println!("{n} delta pieces, first at {first_at:?}, reply at {reply_at:?}");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pieces_are_coalesced_to_twenty_a_second() {
    // 300 tokens 2 ms apart: 500 a second from the model.
    let tpot = Duration::from_millis(2);
    let stack = Stack::start(backend(
        Duration::from_millis(20),
        tpot,
        Reply::Fixed(words(300)),
    ))
    .await;
    let mut c = stack.mqtt().await;
    c.subscribe("general/assistant_response/fast/#").await;
    let (reply_topic, body) = request("fast", "r1", true);
    c.publish("general/user_input", body).await;
    let got = until_reply(&mut c, &reply_topic, Duration::from_secs(10)).await;
    let pieces = pieces(&got, &reply_topic);
    assert_eq!(&deltas(&pieces), &got.last().unwrap().payload);
    let delta_times: Vec<Instant> = pieces
        .iter()
        .filter(|(p, _)| p.get("delta").is_some())
        .map(|(_, at)| *at)
        .collect();
    let span = *delta_times.last().unwrap() - delta_times[0];
    // One at once, then at most one per gap; the last (`done`'s catch-up)
    // goes at once, and arrival jitter may shorten one gap as seen here.
    let bound = (span.as_secs_f64() / GAP.as_secs_f64()).floor() as usize + 3;
    println!(
        "{} delta pieces over {span:?} for 301 tokens (bound {bound})",
        delta_times.len()
    );
    assert!(
        delta_times.len() <= bound,
        "{} pieces over {span:?}",
        delta_times.len()
    );
    assert!(delta_times.len() >= 3, "streamed, not one block");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_stream_sees_exactly_the_reply() {
    let stack = Stack::start(backend(
        Duration::from_millis(20),
        Duration::from_millis(5),
        Reply::Fixed(words(20)),
    ))
    .await;
    let mut c = stack.mqtt().await;
    c.subscribe("general/assistant_response/#").await;
    let (reply_topic, body) = request("plain", "r1", false);
    c.publish("general/user_input", body).await;
    let got = until_reply(&mut c, &reply_topic, Duration::from_secs(10)).await;
    let later = c.drain(Duration::from_millis(300)).await;
    assert_eq!(got.len(), 1, "only the reply: {got:#?}");
    assert!(later.is_empty(), "nothing after the reply: {later:#?}");
    assert_eq!(got[0].payload, words(20));
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_byte_text_arrives_intact_across_chunks() {
    let chunks: Vec<String> = [
        "Café ",
        "naïve ",
        "👨‍",
        "👩‍👧",
        " 👍🏽",
        " 日本",
        "語の",
        "テキスト",
        " ñ",
        "ü",
        "ß",
        " ok",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    let whole: String = chunks.concat();
    let stack = Stack::start(backend(
        Duration::from_millis(20),
        Duration::from_millis(30),
        Reply::Chunks(chunks),
    ))
    .await;
    let mut c = stack.mqtt().await;
    c.subscribe("general/assistant_response/mb/#").await;
    let (reply_topic, body) = request("mb", "r1", true);
    c.publish("general/user_input", body).await;
    let got = until_reply(&mut c, &reply_topic, Duration::from_secs(10)).await;
    let pieces = pieces(&got, &reply_topic);
    assert_eq!(deltas(&pieces), whole);
    assert_eq!(got.last().unwrap().payload, whole);
    assert!(pieces.len() >= 3, "{pieces:#?}");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_from_the_same_client_stops_the_generation_and_stores_nothing() {
    let tpot = Duration::from_millis(50);
    let stack = Stack::start(backend(
        Duration::from_millis(50),
        tpot,
        Reply::Fixed(words(200)),
    ))
    .await;
    let mut c = stack.mqtt().await;
    c.subscribe("general/assistant_response/cx/#").await;
    let (reply_topic, body) = request("cx", "r1", true);
    c.publish("general/user_input", body).await;
    let first = c.recv(Duration::from_secs(5)).await.expect("a first piece");
    assert_eq!(first.topic, format!("{reply_topic}/stream"));
    assert_eq!(stack.vllm.in_flight(), 1);

    // Another client naming the same request, and an unknown request: nothing.
    c.publish(
        "general/cancel/cx",
        json!({"requestId": "r1", "clientId": "someone-else"}).to_string(),
    )
    .await;
    c.publish(
        "general/cancel/cx",
        json!({"requestId": "r2", "clientId": "c1"}).to_string(),
    )
    .await;
    let meanwhile = c.drain(Duration::from_millis(300)).await;
    assert!(
        meanwhile.iter().all(|m| m.topic != reply_topic),
        "still generating: {meanwhile:#?}"
    );
    assert_eq!(stack.vllm.in_flight(), 1, "a stranger's cancel did nothing");

    c.publish(
        "general/cancel/cx",
        json!({"requestId": "r1", "clientId": "c1"}).to_string(),
    )
    .await;
    let took = wait_until(
        "the model server's request is dropped",
        Duration::from_secs(3),
        || stack.vllm.in_flight() == 0,
    )
    .await;
    println!("generation dropped {took:?} after the cancel was published");
    assert!(
        took <= Duration::from_millis(100) + tpot,
        "dropped after {took:?}"
    );
    let got = until_reply(&mut c, &reply_topic, Duration::from_secs(3)).await;
    assert_eq!(got.last().unwrap().payload, "Error: Cancelled.");
    let stream: Vec<&Received> = got
        .iter()
        .filter(|m| m.topic.ends_with("/stream"))
        .collect();
    let last: Value =
        serde_json::from_str(&stream.last().expect("an error piece").payload).unwrap();
    assert_eq!(last["error"], json!("Error: Cancelled."));
    wait_taken_back(&stack, "cx").await;
    assert_eq!(stack.vllm.requests(), 1, "not retried");

    // A cancel of the finished turn is a no-op, and the session goes on.
    c.publish(
        "general/cancel/cx",
        json!({"requestId": "r1", "clientId": "c1"}).to_string(),
    )
    .await;
    assert!(c.drain(Duration::from_millis(200)).await.is_empty());
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_without_stream_is_cancelled_too() {
    let tpot = Duration::from_millis(50);
    let stack = Stack::start(backend(
        Duration::from_millis(50),
        tpot,
        Reply::Fixed(words(200)),
    ))
    .await;
    let mut c = stack.mqtt().await;
    c.subscribe("general/assistant_response/cp/#").await;
    let (reply_topic, body) = request("cp", "r1", false);
    c.publish("general/user_input", body).await;
    wait_until(
        "the generation reaches the model server",
        Duration::from_secs(5),
        || stack.vllm.in_flight() == 1,
    )
    .await;
    c.publish(
        "general/cancel/cp",
        json!({"requestId": "r1", "clientId": "c1"}).to_string(),
    )
    .await;
    let took = wait_until("the request is dropped", Duration::from_secs(3), || {
        stack.vllm.in_flight() == 0
    })
    .await;
    assert!(
        took <= Duration::from_millis(100) + tpot,
        "dropped after {took:?}"
    );
    let got = until_reply(&mut c, &reply_topic, Duration::from_secs(3)).await;
    assert_eq!(got.len(), 1, "no stream asked for: {got:#?}");
    assert_eq!(got[0].payload, "Error: Cancelled.");
    wait_taken_back(&stack, "cp").await;
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_turn_over_grpc_stops_a_chat_stream_caller() {
    let tpot = Duration::from_millis(50);
    let stack = Stack::start(backend(
        Duration::from_millis(50),
        tpot,
        Reply::Fixed(words(200)),
    ))
    .await;
    let mut client = stack.sessions(0).await;
    let request = ChatRequest {
        project: "general".into(),
        session_id: "g".into(),
        message: "tell me".into(),
        request_id: "g1".into(),
        ..Default::default()
    };
    let mut events = client.chat_stream(request).await.unwrap().into_inner();
    let mut saw_delta = false;
    while !saw_delta {
        match events.message().await.unwrap().expect("events").event {
            Some(chat_event::Event::Delta(_)) => saw_delta = true,
            Some(chat_event::Event::Accepted(_)) => {}
            other => panic!("{other:?}"),
        }
    }
    let name = |request_id: &str| CancelTurnRequest {
        project: "general".into(),
        session_id: "g".into(),
        request_id: request_id.into(),
    };
    let other = client.cancel_turn(name("g2")).await.unwrap().into_inner();
    assert!(!other.cancelled, "another request id: nothing");
    assert_eq!(stack.vllm.in_flight(), 1);

    let t0 = Instant::now();
    let r = client.cancel_turn(name("g1")).await.unwrap().into_inner();
    assert!(r.cancelled);
    let status = loop {
        match events.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stream ended without a status"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), tonic::Code::Cancelled, "{status:?}");
    assert_eq!(
        status.metadata().get("palaver-error-kind").unwrap(),
        "cancelled"
    );
    wait_until("vLLM's request is dropped", Duration::from_secs(3), || {
        stack.vllm.in_flight() == 0
    })
    .await;
    let took = t0.elapsed();
    assert!(
        took <= Duration::from_millis(100) + tpot,
        "dropped after {took:?}"
    );
    wait_taken_back(&stack, "g").await;
    let again = client.cancel_turn(name("g1")).await.unwrap().into_inner();
    assert!(!again.cancelled, "a finished turn: no-op");
    stack.stop().await;
}
