//! Every payload rule of the wire protocol, table-driven, with a sniffer on
//! `#` proving the gateway never publishes outside the allowed topics.

use std::time::Duration;

use palaver_tests::{Received, Stack, StackOptions};
use serde_json::json;

/// What a payload must lead to.
enum Expect {
    /// A reply on exactly this topic whose text starts with the prefix.
    Reply {
        topic: &'static str,
        starts: &'static str,
    },
    /// A normal (non-error) reply on a topic starting with this prefix.
    OkUnder(&'static str),
    /// Nothing at all (a counted drop).
    Nothing,
}

struct Case {
    name: &'static str,
    topic: &'static str,
    payload: Vec<u8>,
    expect: Expect,
}

fn case(name: &'static str, payload: impl Into<Vec<u8>>, expect: Expect) -> Case {
    Case {
        name,
        topic: "general/user_input",
        payload: payload.into(),
        expect,
    }
}

fn j(v: serde_json::Value) -> Vec<u8> {
    v.to_string().into_bytes()
}

fn cases() -> Vec<Case> {
    use Expect::*;
    vec![
        case(
            "plain text is the message of a fresh session",
            "hello as plain text",
            OkUnder("general/assistant_response/default-"),
        ),
        case("empty payload", "", Nothing),
        case("invalid utf-8", vec![0xff, 0xfe, 0x00, 0x81], Nothing),
        case("json array", "[1, 2]", Nothing),
        case("json string", "\"just a string\"", Nothing),
        case("json number", "42", Nothing),
        case(
            "missing message",
            j(json!({"sessionId": "bi-1"})),
            Reply {
                topic: "general/assistant_response/bi-1",
                starts: "Error: ",
            },
        ),
        case(
            "blank message",
            j(json!({"sessionId": "bi-2", "message": "  \n "})),
            Reply {
                topic: "general/assistant_response/bi-2",
                starts: "Error: ",
            },
        ),
        case(
            "message not a string",
            j(json!({"sessionId": "bi-3", "message": {"text": "hi"}})),
            Reply {
                topic: "general/assistant_response/bi-3",
                starts: "Error: ",
            },
        ),
        case(
            "message too long",
            j(json!({"sessionId": "bi-4", "message": "x".repeat(9000)})),
            Reply {
                topic: "general/assistant_response/bi-4",
                starts: "Error: Message is too long",
            },
        ),
        case(
            "oversize payload",
            j(json!({"sessionId": "bi-5", "message": "y".repeat(300 * 1024)})),
            Nothing,
        ),
        case(
            "wildcard reply topic falls back to the default",
            j(
                json!({"sessionId": "bi-6", "message": "hi", "replyTopic": "general/assistant_response/#"}),
            ),
            OkUnder("general/assistant_response/bi-6"),
        ),
        case(
            "plus wildcard reply topic falls back",
            j(
                json!({"sessionId": "bi-7", "message": "hi", "replyTopic": "general/assistant_response/+/x"}),
            ),
            OkUnder("general/assistant_response/bi-7"),
        ),
        case(
            "foreign reply topic falls back",
            j(
                json!({"sessionId": "bi-8", "message": "hi", "replyTopic": "driving/assistant_response/bi-8"}),
            ),
            OkUnder("general/assistant_response/bi-8"),
        ),
        case(
            "bare prefix reply topic falls back",
            j(
                json!({"sessionId": "bi-9", "message": "hi", "replyTopic": "general/assistant_response/"}),
            ),
            OkUnder("general/assistant_response/bi-9"),
        ),
        case(
            "a valid reply topic is used",
            j(
                json!({"sessionId": "bi-10", "message": "hi", "replyTopic": " general/assistant_response/bi-10/cli/r1 "}),
            ),
            OkUnder("general/assistant_response/bi-10/cli/r1"),
        ),
        case(
            "temperature not a number",
            j(json!({"sessionId": "bi-11", "message": "hi", "temperature": "hot"})),
            Reply {
                topic: "general/assistant_response/bi-11",
                starts: "Error: ",
            },
        ),
        case(
            "temperature out of range",
            j(json!({"sessionId": "bi-12", "message": "hi", "temperature": 7})),
            Reply {
                topic: "general/assistant_response/bi-12",
                starts: "Error: ",
            },
        ),
        case(
            "top_p zero",
            j(json!({"sessionId": "bi-13", "message": "hi", "topP": 0})),
            Reply {
                topic: "general/assistant_response/bi-13",
                starts: "Error: ",
            },
        ),
        case(
            "negative max tokens",
            j(json!({"sessionId": "bi-14", "message": "hi", "maxTokens": -5})),
            Reply {
                topic: "general/assistant_response/bi-14",
                starts: "Error: ",
            },
        ),
        case(
            "numeric session id and unknown fields",
            j(json!({"sessionId": 4242, "message": "hi", "images": ["aGk="]})),
            OkUnder("general/assistant_response/4242"),
        ),
        case(
            "session id with topic characters stays under the prefix",
            j(json!({"sessionId": "a/+/#", "message": "hi"})),
            OkUnder("general/assistant_response/"),
        ),
        Case {
            name: "unconfigured project",
            topic: "nosuchproject/user_input",
            payload: j(json!({"sessionId": "bi-15", "message": "hi"})),
            expect: Nothing,
        },
    ]
}

fn allowed(topic: &str) -> bool {
    ["general", "driving", "tutor", "npc"].iter().any(|p| {
        topic.starts_with(&format!("{p}/assistant_response/"))
            || topic.starts_with(&format!("{p}/hint/"))
            || topic == format!("{p}/status")
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_the_right_answer_or_a_counted_drop_and_nothing_escapes() {
    let stack = Stack::start(StackOptions::replying_after(Duration::from_millis(5))).await;
    let mut sniffer = stack.mqtt().await;
    sniffer.subscribe("#").await;
    let sender = stack.mqtt().await;
    let mut everything: Vec<Received> = Vec::new();
    let mut drops_expected = 0;

    for c in cases() {
        sender.publish(c.topic, c.payload.clone()).await;
        // The request itself comes back to the sniffer first.
        let seen = sniffer.drain(Duration::from_millis(700)).await;
        let answers: Vec<_> = seen
            .iter()
            .filter(|m| !m.topic.ends_with("/user_input") && !m.topic.ends_with("/status"))
            .collect();
        match c.expect {
            Expect::Nothing => {
                drops_expected += usize::from(c.topic.starts_with("general/"));
                assert!(
                    answers.is_empty(),
                    "{}: expected silence, got {answers:?}",
                    c.name
                );
            }
            Expect::Reply { topic, starts } => {
                assert_eq!(answers.len(), 1, "{}: {answers:?}", c.name);
                assert_eq!(answers[0].topic, topic, "{}", c.name);
                assert!(
                    answers[0].payload.starts_with(starts),
                    "{}: {:?}",
                    c.name,
                    answers[0].payload
                );
            }
            Expect::OkUnder(prefix) => {
                assert_eq!(answers.len(), 1, "{}: {answers:?}", c.name);
                assert!(
                    answers[0].topic.starts_with(prefix),
                    "{}: {}",
                    c.name,
                    answers[0].topic
                );
                assert!(!answers[0].topic.contains(['+', '#']), "{}", c.name);
                assert!(
                    !answers[0].payload.starts_with("Error"),
                    "{}: {}",
                    c.name,
                    answers[0].payload
                );
            }
        }
        everything.extend(seen);
    }

    for m in &everything {
        if m.topic.ends_with("/user_input") {
            continue; // our own requests
        }
        assert!(allowed(&m.topic), "gateway published on {}", m.topic);
    }
    let dropped = stack.gateway_metric_sum("palaver_gateway_dropped_total");
    assert_eq!(dropped as usize, drops_expected, "every drop is counted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temperature_zero_means_zero() {
    let stack = Stack::start(StackOptions::default()).await;
    let mut c = stack.mqtt().await;
    c.subscribe("general/assistant_response/t0").await;
    c.publish(
        "general/user_input",
        j(json!({"sessionId": "t0", "message": "be exact", "temperature": 0, "maxTokens": 33})),
    )
    .await;
    let r = c.recv(Duration::from_secs(10)).await.expect("a reply");
    assert!(!r.payload.starts_with("Error"), "{}", r.payload);
    let sent = stack.vllm.last_request().expect("the fake saw the request");
    assert_eq!(sent["temperature"], json!(0.0));
    assert_eq!(sent["max_tokens"], json!(33));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_max_tokens_above_the_projects_is_lowered_to_it() {
    let options = StackOptions::default();
    let ceiling = options.projects.get("general").unwrap().max_tokens;
    let stack = Stack::start(options).await;
    let mut c = stack.mqtt().await;
    c.subscribe("general/assistant_response/mt").await;
    c.publish(
        "general/user_input",
        j(json!({"sessionId": "mt", "message": "go on forever", "maxTokens": 100_000})),
    )
    .await;
    let r = c.recv(Duration::from_secs(10)).await.expect("a reply");
    assert!(!r.payload.starts_with("Error"), "{}", r.payload);
    let sent = stack.vllm.last_request().expect("the fake saw the request");
    assert_eq!(sent["max_tokens"], json!(ceiling));
}
