//! Logs to stderr, filtered by `RUST_LOG` when it is set.
//!
//! Like `palaver_core::telemetry::init_logging`, but with a default per
//! subcommand: `up` logs at info and silences rumqttd, which reports every
//! routine disconnect as an error (refused logins are logged by
//! [`crate::broker`] itself); the clients log only warnings, so that what
//! they print is the conversation.

/// Default filter of `palaver up`.
pub const UP_FILTER: &str = "info,rumqttd=off";
/// Default filter of `palaver chat` and `palaver send`.
pub const CLIENT_FILTER: &str = "warn";

/// Starts logging to stderr with `RUST_LOG`, else `default_filter`.
pub fn init(default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
