//! Shared harness for the end-to-end tests in `tests/tests/`.
//!
//! [`Stack`] starts the real pipeline — redis-server, mosquitto, a fake vLLM
//! over HTTP, inference-svc, session-svc and the gateway — and [`TestClient`]
//! talks to it the way the old server's clients do.

pub mod cluster;
pub mod stack;
pub mod v5;

pub use palaver_testkit::mqtt::{Received, TestClient};
pub use stack::{Stack, StackOptions};

/// Logs to the test's output when `RUST_LOG` is set.
pub fn init_logging() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

/// A gateway config for the tests, in the MQTT version that
/// `PALAVER_TEST_MQTT_PROTOCOL` names (`5` or `3.1.1`; the gateway's
/// default, 5, when unset), so that any test file can be run against a
/// gateway speaking 3.1.1.
pub fn gateway_config(
    mqtt_port: u16,
    session_url: impl Into<String>,
    projects: Vec<String>,
) -> gateway::Config {
    let mut config = gateway::Config::new("127.0.0.1", mqtt_port, session_url, projects);
    if let Ok(name) = std::env::var("PALAVER_TEST_MQTT_PROTOCOL") {
        config.mqtt_protocol = match name.as_str() {
            "5" => gateway::config::Protocol::V5,
            "3.1.1" => gateway::config::Protocol::V311,
            other => panic!("PALAVER_TEST_MQTT_PROTOCOL={other:?}: expected 5 or 3.1.1"),
        };
    }
    config
}
