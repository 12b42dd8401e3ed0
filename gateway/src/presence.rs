//! Presence on `<project>/status`: "online" on every (re)connect, a heartbeat
//! while connected, "offline" on clean shutdown and, through the broker's
//! last will, on a crash or lost connection.
//!
//! MQTT allows one last will per connection, and the design wants an
//! "offline" on every project's status topic; hence one connection per
//! project (see `link.rs`).
//!
//! Presence messages are **not retained**. With `--shared-group` several
//! gateways announce on the same topic with the same service name; a
//! retained "offline" from one replica (its will, or its clean shutdown)
//! would then tell every later subscriber the project is down while other
//! replicas still serve it. Non-retained, a newcomer learns the state from the
//! next heartbeat (at most one interval away), which is what a heartbeat is for.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::json;
use tokio::time::{interval_at, Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::metrics::OutKind;
use crate::publish::Publisher;
use crate::topics;

/// Whether presence messages are retained; see the module docs for why not.
pub const RETAIN: bool = false;

/// `{"service":..,"status":"online"}`.
pub fn online(service: &str) -> Vec<u8> {
    json!({"service": service, "status": "online"})
        .to_string()
        .into_bytes()
}

/// `{"service":..,"status":"offline"}`: the last will and the clean-shutdown message.
pub fn offline(service: &str) -> Vec<u8> {
    json!({"service": service, "status": "offline"})
        .to_string()
        .into_bytes()
}

/// `{"service":..,"status":"online","heartbeat":true,"ts":<unix seconds>}`.
pub fn heartbeat(service: &str, now: SystemTime) -> Vec<u8> {
    let ts = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    json!({"service": service, "status": "online", "heartbeat": true, "ts": ts})
        .to_string()
        .into_bytes()
}

/// The last will of `project`'s connection: "offline" on its status topic.
/// Its topic and payload; `mqtt.rs` makes it the will of either protocol
/// (at QoS 1, retained as [`RETAIN`] says).
pub fn last_will(project: &str, service: &str) -> (String, Vec<u8>) {
    (topics::status_topic(project), offline(service))
}

/// Publishes a heartbeat every `every` while `connected`, until `stop`.
///
/// Heartbeats are skipped while disconnected: queued ones would arrive in a
/// burst of stale "online" messages after the reconnect.
pub async fn heartbeats(
    publisher: Publisher,
    service: Arc<str>,
    every: Duration,
    connected: Arc<AtomicBool>,
    stop: CancellationToken,
) {
    let topic = topics::status_topic(publisher.project());
    let mut tick = interval_at(Instant::now() + every, every);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if !connected.load(Ordering::Relaxed) {
            continue;
        }
        let payload = heartbeat(&service, SystemTime::now());
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = publisher.publish(OutKind::Status, &topic, payload) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn payloads() {
        assert_eq!(online("svc"), br#"{"service":"svc","status":"online"}"#);
        assert_eq!(offline("svc"), br#"{"service":"svc","status":"offline"}"#);
        let hb: Value =
            serde_json::from_slice(&heartbeat("svc", UNIX_EPOCH + Duration::from_secs(42)))
                .unwrap();
        assert_eq!(
            hb,
            json!({"service": "svc", "status": "online", "heartbeat": true, "ts": 42})
        );
        // A name needing escapes still gives valid JSON.
        let odd: Value = serde_json::from_slice(&online("a\"b")).unwrap();
        assert_eq!(odd["service"], "a\"b");
    }

    #[test]
    fn will_is_offline_on_the_status_topic() {
        let (topic, payload) = last_will("p", "svc");
        assert_eq!(topic, "p/status");
        assert_eq!(payload, offline("svc"));
    }
}
