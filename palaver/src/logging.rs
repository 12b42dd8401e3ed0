//! Logs to stderr, filtered by `RUST_LOG` when it is set.
//!
//! `palaver_core::telemetry`'s logging, with a default filter per
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
    palaver_core::telemetry::init_logging_with(default_filter);
}
