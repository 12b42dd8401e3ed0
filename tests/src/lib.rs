//! Shared harness for the end-to-end tests in `tests/tests/`.
//!
//! [`Stack`] starts the real pipeline — redis-server, mosquitto, a fake vLLM
//! over HTTP, inference-svc, session-svc and the gateway — and [`TestClient`]
//! talks to it the way the old server's clients do.

pub mod cluster;
pub mod stack;

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
