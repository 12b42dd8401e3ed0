//! Identity binding with `on`, end to end through session-svc and Redis:
//! a user's session cannot be named from the shared topic, and the user's
//! sessions are stored apart. (The broker's ACL side is tested with the
//! shipped mosquitto config in palaver/tests/shipped_broker.rs.)

use std::time::Duration;

use gateway::identity::{IdentityBinding, RESERVED_ID_TEXT};
use palaver_proto::session::v1::SessionRef;
use palaver_tests::{Stack, StackOptions};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bound_users_session_cannot_be_named_from_the_shared_topic() {
    let mut opts = StackOptions::replying_after(Duration::from_millis(5));
    opts.gateway = Box::new(|c| c.identity_binding = IdentityBinding::On);
    let stack = Stack::start(opts).await;
    let mut c = stack.mqtt().await;
    c.subscribe("general/assistant_response/#").await;

    c.publish(
        "general/user_input/alice",
        json!({"sessionId": "s1", "message": "alice's secret"}).to_string(),
    )
    .await;
    let r = c
        .recv(Duration::from_secs(10))
        .await
        .expect("alice's reply");
    assert_eq!(r.topic, "general/assistant_response/alice/s1");
    assert!(r.payload.contains("alice's secret"), "{}", r.payload);

    // From the shared topic: her session id is refused, a look-alike is
    // another session, and both are answered outside her namespace.
    c.publish(
        "general/user_input",
        json!({"sessionId": "@alice/s1", "message": "mallory", "replyTopic": "general/assistant_response/m"})
            .to_string(),
    )
    .await;
    let r = c.recv(Duration::from_secs(10)).await.expect("a refusal");
    assert_eq!(
        (r.topic.as_str(), r.payload.as_str()),
        ("general/assistant_response/m", RESERVED_ID_TEXT)
    );
    c.publish(
        "general/user_input",
        json!({"sessionId": "alice/s1", "message": "mallory again"}).to_string(),
    )
    .await;
    let r = c.recv(Duration::from_secs(10)).await.expect("a reply");
    // Its default topic lands in alice's namespace: with `on` the shared
    // topic can still reach any reply topic, as documented; `only` and the
    // ACL without the shared section close that.
    assert_eq!(r.topic, "general/assistant_response/alice/s1");
    assert!(r.payload.contains("mallory again"), "{}", r.payload);

    let mut sessions = stack.sessions(0).await;
    let history = |id: &str| SessionRef {
        project: "general".into(),
        session_id: id.into(),
    };
    let alice = sessions
        .get_history(history("@alice/s1"))
        .await
        .expect("alice's history")
        .into_inner();
    let texts: Vec<&str> = alice.messages.iter().map(|m| m.content.as_str()).collect();
    assert_eq!(texts.len(), 2, "{texts:?}");
    assert_eq!(texts[0], "alice's secret");
    let other = sessions
        .get_history(history("alice/s1"))
        .await
        .expect("the look-alike's history")
        .into_inner();
    assert_eq!(other.messages[0].content, "mallory again");
    stack.stop().await;
}
