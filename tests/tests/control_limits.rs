//! Control topics held to the chat limits: a template over the prompt limit
//! stores nothing, and control messages are rate-limited per session and
//! per project.

use std::time::Duration;

use gateway::control_rate::ControlLimits;
use palaver_tests::{Stack, StackOptions};
use serde_json::json;

/// redis-server's `used_memory` (INFO memory), in bytes.
async fn used_memory(stack: &Stack) -> i64 {
    let redis = redis::Client::open(stack.redis.url()).unwrap();
    let mut conn = redis.get_multiplexed_async_connection().await.unwrap();
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(&mut conn)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("used_memory in INFO memory")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_200_kb_templates_is_refused_and_redis_stays_flat() {
    let mut opts = StackOptions::replying_after(Duration::from_millis(5));
    // Only the size limit is under test: no rate limit hides the flood.
    opts.gateway = Box::new(|c| {
        c.control_limits = ControlLimits {
            per_session: 0,
            per_project: 0,
        }
    });
    let stack = Stack::start(opts).await;
    let mut c = stack.mqtt().await;
    c.subscribe("general/hint/#").await;
    let before = used_memory(&stack).await;

    let big = "x".repeat(200 * 1024);
    for i in 0..150 {
        c.publish(&format!("general/template/flood-{i}"), big.clone())
            .await;
    }
    // Messages of one connection are handled in order: once the small
    // template after the flood is acknowledged, the flood has been read.
    c.publish("general/template/after", "Be brief.").await;
    let hints = c.drain(Duration::from_secs(3)).await;
    let topics: Vec<&str> = hints.iter().map(|h| h.topic.as_str()).collect();
    assert!(topics.contains(&"general/hint/after"), "{topics:?}");
    assert!(
        topics.iter().all(|t| !t.contains("flood")),
        "a 200 KB template was applied: {topics:?}"
    );

    let after = used_memory(&stack).await;
    // 150 x 200 KB would be 30 MB; one small session and allocator noise
    // stay far below 1 MB.
    assert!(
        after - before < 1024 * 1024,
        "used_memory grew from {before} to {after}"
    );
    assert_eq!(
        stack.gateway_metric_sum("palaver_gateway_dropped_total"),
        150.0
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_messages_are_rate_limited_per_session_and_per_project() {
    let mut opts = StackOptions::replying_after(Duration::from_millis(5));
    opts.gateway = Box::new(|c| {
        c.control_limits = ControlLimits {
            per_session: 3,
            per_project: 10,
        }
    });
    let stack = Stack::start(opts).await;
    let mut c = stack.mqtt().await;
    c.subscribe("general/hint/#").await;

    // One session rewriting its prompt in a loop: three get through.
    for i in 0..10 {
        let payload = json!({"template": format!("prompt {i}")}).to_string();
        c.publish("general/template/loop", payload).await;
    }
    let hints = c.drain(Duration::from_secs(2)).await;
    assert_eq!(hints.len(), 3, "{hints:?}");
    assert!(hints.iter().all(|h| h.topic == "general/hint/loop"));

    // Fresh session ids: the project's allowance (10, 3 already used) holds.
    for i in 0..20 {
        c.publish(&format!("general/clear_history/fresh-{i}"), "")
            .await;
    }
    let hints = c.drain(Duration::from_secs(2)).await;
    assert_eq!(hints.len(), 7, "{hints:?}");

    // Another project has its own allowance.
    c.subscribe("tutor/hint/#").await;
    c.publish("tutor/clear_history/s1", "").await;
    let hint = c.recv(Duration::from_secs(5)).await.expect("tutor's hint");
    assert_eq!(hint.topic, "tutor/hint/s1");
    assert_eq!(
        stack.gateway_metric_sum("palaver_gateway_dropped_total"),
        20.0
    );
    stack.stop().await;
}
