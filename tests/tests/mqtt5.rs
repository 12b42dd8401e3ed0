//! MQTT 5 request/response through the gateway, on a real mosquitto:
//! a Response Topic stands for `replyTopic`, Correlation Data comes back on
//! every answer, error replies name their kind, replies expire; clients of
//! MQTT 3.1.1 on the same broker see no change.

use std::time::Duration;

use gateway::config::Protocol;
use palaver_tests::v5::{topic, V5Client};
use palaver_tests::{Stack, StackOptions};
use rumqttc::v5::mqttbytes::v5::{Publish, PublishProperties};
use rumqttc::v5::MqttOptions;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(10);
const ERROR_KIND: &str = "palaver-error-kind";
const RATE_LIMITED: &str = "Error: Rate limit exceeded. Please slow down your requests.";

fn request_properties(response_topic: Option<&str>, correlation: &[u8]) -> PublishProperties {
    PublishProperties {
        response_topic: response_topic.map(str::to_owned),
        correlation_data: Some(correlation.to_vec().into()),
        user_properties: vec![(
            "traceparent".into(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
        )],
        ..Default::default()
    }
}

fn text(p: &Publish) -> String {
    String::from_utf8_lossy(&p.payload).into_owned()
}

fn correlation(p: &Publish) -> Option<Vec<u8>> {
    p.properties
        .as_ref()
        .and_then(|props| props.correlation_data.as_ref())
        .map(|c| c.to_vec())
}

fn expiry(p: &Publish) -> Option<u32> {
    p.properties
        .as_ref()
        .and_then(|props| props.message_expiry_interval)
}

fn error_kind(p: &Publish) -> Option<String> {
    p.properties.as_ref().and_then(|props| {
        props
            .user_properties
            .iter()
            .find(|(k, _)| k == ERROR_KIND)
            .map(|(_, v)| v.clone())
    })
}

/// A stack whose gateway speaks MQTT 5 whatever `PALAVER_TEST_MQTT_PROTOCOL`
/// says, replying after `ttft` and with `reply_expiry_secs`.
fn v5_stack(ttft: Duration, reply_expiry_secs: Option<u32>) -> StackOptions {
    StackOptions {
        gateway: Box::new(move |c| {
            c.mqtt_protocol = Protocol::V5;
            c.reply_expiry_secs = reply_expiry_secs;
        }),
        ..StackOptions::replying_after(ttft)
    }
}

fn fast() -> StackOptions {
    v5_stack(Duration::from_millis(20), Some(300))
}

/// (1) and (2): a v5 request without `replyTopic` is answered on its
/// Response Topic with its Correlation Data and an expiry, streamed pieces
/// too, while a reference-style 3.1.1 client on the same broker, at the same
/// time, gets exactly today's plain reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v5_request_is_answered_on_its_response_topic_beside_a_3_1_1_client() {
    let stack = Stack::start(fast()).await;
    let mut v5 = V5Client::connect(stack.broker.port(), "v5-client").await;
    v5.subscribe("general/assistant_response/v5s/#").await;
    let mut old = stack.mqtt().await;
    old.subscribe("general/assistant_response/olds/#").await;

    let response_topic = "general/assistant_response/v5s/me/1";
    v5.request(
        json!({"message": "hello five", "sessionId": "v5s"}),
        request_properties(Some(response_topic), b"\x00corr-1\xff"),
    )
    .await;
    old.publish(
        "general/user_input",
        json!({"message": "hello three", "sessionId": "olds",
               "replyTopic": "general/assistant_response/olds/me/1",
               "clientId": "me", "requestId": "1"})
        .to_string(),
    )
    .await;

    let reply = v5.answer().await;
    assert_eq!(topic(&reply), response_topic);
    assert!(text(&reply).contains("hello five"), "{}", text(&reply));
    assert_eq!(correlation(&reply).as_deref(), Some(&b"\x00corr-1\xff"[..]));
    let left = expiry(&reply).expect("a reply carries a message expiry");
    assert!(left > 0 && left <= 300, "expiry {left}");
    assert_eq!(error_kind(&reply), None, "a reply is not an error");

    let r = old.recv(WAIT).await.expect("the 3.1.1 client's reply");
    assert_eq!(r.topic, "general/assistant_response/olds/me/1");
    assert!(r.payload.contains("hello three"), "{}", r.payload);

    // A streamed v5 turn: every piece and the reply echo the correlation data.
    v5.request(
        json!({"message": "stream five", "sessionId": "v5s", "stream": true}),
        request_properties(Some("general/assistant_response/v5s/me/2"), b"corr-2"),
    )
    .await;
    let mut pieces = 0;
    loop {
        let p = v5.answer().await;
        assert_eq!(correlation(&p).as_deref(), Some(&b"corr-2"[..]), "{p:?}");
        assert!(expiry(&p).is_some(), "{p:?}");
        if topic(&p) == "general/assistant_response/v5s/me/2/stream" {
            pieces += 1;
            continue;
        }
        assert_eq!(topic(&p), "general/assistant_response/v5s/me/2");
        assert!(text(&p).contains("stream five"), "{}", text(&p));
        break;
    }
    assert!(pieces >= 2, "at least a delta and done: {pieces}");
    v5.disconnect().await;
}

/// (3): a Response Topic outside `<project>/assistant_response/` is ignored
/// like a bad `replyTopic`: the answer goes to the session's own topic and
/// nothing is published where the request pointed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_topic_outside_the_reply_space_is_refused() {
    let stack = Stack::start(fast()).await;
    let mut v5 = V5Client::connect(stack.broker.port(), "v5-outside").await;
    v5.subscribe("#").await;
    for (i, outside) in [
        "general/hint/evil",
        "npc/assistant_response/evil",
        "elsewhere/evil",
        "general/assistant_response",
    ]
    .into_iter()
    .enumerate()
    {
        let sid = format!("out{i}");
        v5.request(
            json!({"message": "where to?", "sessionId": sid}),
            request_properties(Some(outside), b"c"),
        )
        .await;
        let reply = loop {
            let p = v5.answer().await;
            if topic(&p) != "general/user_input" {
                break p;
            }
        };
        assert_eq!(
            topic(&reply),
            format!("general/assistant_response/{sid}"),
            "Response Topic {outside}"
        );
        assert!(text(&reply).contains("where to?"), "{}", text(&reply));
        assert_eq!(correlation(&reply).as_deref(), Some(&b"c"[..]));
    }
    // Nothing else arrives (status heartbeats aside).
    while let Some(p) = v5.recv(Duration::from_millis(300)).await {
        assert!(topic(&p).ends_with("/status"), "unexpected {p:?}");
    }
}

/// (4): error replies carry `palaver-error-kind`, whether the gateway
/// refuses the request itself or session-svc does (the rate limit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_replies_name_their_kind() {
    let stack = Stack::start(v5_stack(Duration::from_millis(5), Some(300))).await;
    let mut v5 = V5Client::connect(stack.broker.port(), "v5-errors").await;
    v5.subscribe("general/assistant_response/#").await;

    v5.request(
        json!({"message": "  ", "sessionId": "bad"}),
        request_properties(Some("general/assistant_response/bad/me"), b"e1"),
    )
    .await;
    let refused = v5.answer().await;
    assert_eq!(topic(&refused), "general/assistant_response/bad/me");
    assert_eq!(text(&refused), "Error: Message is empty.");
    assert_eq!(error_kind(&refused).as_deref(), Some("invalid_argument"));
    assert_eq!(correlation(&refused).as_deref(), Some(&b"e1"[..]));
    assert!(expiry(&refused).is_some());

    for i in 1..=20 {
        v5.request(
            json!({"message": format!("m{i}"), "sessionId": "busy"}),
            request_properties(None, b"ok"),
        )
        .await;
        let r = v5.answer().await;
        assert!(text(&r).contains(&format!("m{i}")), "{}", text(&r));
        assert_eq!(error_kind(&r), None);
    }
    v5.request(
        json!({"message": "m21", "sessionId": "busy"}),
        request_properties(None, b"limited"),
    )
    .await;
    let limited = v5.answer().await;
    assert_eq!(topic(&limited), "general/assistant_response/busy");
    assert_eq!(text(&limited), RATE_LIMITED);
    assert_eq!(error_kind(&limited).as_deref(), Some("rate_limited"));
    assert_eq!(correlation(&limited).as_deref(), Some(&b"limited"[..]));
}

/// Expiry does what it is for: an answer to a client that left is gone
/// when it comes back after the expiry, and `0` turns expiry off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_expires_for_a_client_that_left() {
    let stack = Stack::start(v5_stack(Duration::from_millis(500), Some(1))).await;
    let port = stack.broker.port();
    let persistent = |o: &mut MqttOptions| {
        o.set_clean_start(false);
        o.set_session_expiry_interval(Some(600));
    };
    let mut leaving = V5Client::connect_with(port, "v5-leaving", persistent).await;
    leaving.subscribe("general/assistant_response/gone/#").await;
    leaving
        .request(
            json!({"message": "late", "sessionId": "gone"}),
            request_properties(None, b"x"),
        )
        .await;
    // Wait for the request to reach the broker, then leave before the reply.
    tokio::time::sleep(Duration::from_millis(100)).await;
    leaving.disconnect().await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let mut back = V5Client::connect_with(port, "v5-leaving", persistent).await;
    let stale = back.recv(Duration::from_millis(500)).await;
    assert!(stale.is_none(), "an expired reply was delivered: {stale:?}");
    back.disconnect().await;
}

/// The same, with expiry off: the queued reply is still there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_expiry_a_reply_waits_for_a_client_that_left() {
    let stack = Stack::start(v5_stack(Duration::from_millis(500), None)).await;
    let port = stack.broker.port();
    let persistent = |o: &mut MqttOptions| {
        o.set_clean_start(false);
        o.set_session_expiry_interval(Some(600));
    };
    let mut leaving = V5Client::connect_with(port, "v5-leaving", persistent).await;
    leaving.subscribe("general/assistant_response/gone/#").await;
    leaving
        .request(
            json!({"message": "late", "sessionId": "gone"}),
            request_properties(None, b"x"),
        )
        .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    leaving.disconnect().await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let mut back = V5Client::connect_with(port, "v5-leaving", persistent).await;
    let kept = back.answer().await;
    assert_eq!(topic(&kept), "general/assistant_response/gone");
    assert!(text(&kept).contains("late"), "{}", text(&kept));
    assert_eq!(expiry(&kept), None);
    back.disconnect().await;
}

/// (5): a gateway speaking 3.1.1 serves both kinds of client as before; a
/// v5 request's properties never reach it, so its Response Topic is not
/// seen and the answer goes to the session's own topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_speaking_3_1_1_serves_both_kinds_of_client() {
    let stack = Stack::start(StackOptions {
        gateway: Box::new(|c| c.mqtt_protocol = Protocol::V311),
        ..fast()
    })
    .await;
    let mut old = stack.mqtt().await;
    old.subscribe("general/assistant_response/olds/#").await;
    old.publish(
        "general/user_input",
        json!({"message": "hello three", "sessionId": "olds", "stream": true,
               "replyTopic": "general/assistant_response/olds/me/1"})
        .to_string(),
    )
    .await;
    let mut pieces = 0;
    loop {
        let r = old.recv(WAIT).await.expect("the 3.1.1 client's answers");
        if r.topic == "general/assistant_response/olds/me/1/stream" {
            pieces += 1;
            continue;
        }
        assert_eq!(r.topic, "general/assistant_response/olds/me/1");
        assert!(r.payload.contains("hello three"), "{}", r.payload);
        break;
    }
    assert!(pieces >= 2, "at least a delta and done: {pieces}");

    let mut v5 = V5Client::connect(stack.broker.port(), "v5-on-311").await;
    v5.subscribe("general/assistant_response/v5s/#").await;
    v5.request(
        json!({"message": "hello five", "sessionId": "v5s"}),
        request_properties(Some("general/assistant_response/v5s/me/1"), b"c"),
    )
    .await;
    let reply = v5.answer().await;
    assert_eq!(topic(&reply), "general/assistant_response/v5s");
    assert!(text(&reply).contains("hello five"), "{}", text(&reply));
    assert_eq!(correlation(&reply), None);
    v5.disconnect().await;
}
