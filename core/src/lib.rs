//! Pieces every palaver service needs and none of them owns.
//!
//! - [`projects`]: the projects file (system prompts, history limits, rate
//!   limits, sampling defaults per project);
//! - [`runtime`]: the tokio runtime of every binary (one worker by default);
//! - [`shutdown`]: one cancellation token tripped by SIGINT/SIGTERM;
//! - [`telemetry`]: logging, OTLP trace export, the Prometheus `/metrics` endpoint;
//! - [`trace_context`]: W3C `traceparent` across gRPC, HTTP and MQTT;
//! - [`tls`]: rustls configurations from PEM files, for every link;
//! - [`auth`]: gRPC bearer tokens, checked by servers and sent by clients.

pub mod auth;
pub mod cancel;
pub mod projects;
pub mod runtime;
pub mod shutdown;
pub mod telemetry;
pub mod tls;
pub mod trace_context;

/// gRPC metadata key naming why a call failed, beyond its status code.
///
/// The gateway needs to tell a rate limit from a full queue (both are
/// RESOURCE_EXHAUSTED) because old clients know a distinct reply string for
/// each. Values are the `ERROR_KIND_*` constants.
pub const ERROR_KIND_HEADER: &str = "palaver-error-kind";
/// The session sent too many requests in its window.
pub const ERROR_KIND_RATE_LIMITED: &str = "rate_limited";
/// Every inference slot is busy and the queue is full (or the wait timed out).
pub const ERROR_KIND_OVERLOADED: &str = "overloaded";
/// The turn was cancelled (`Sessions/CancelTurn`) while it ran.
pub const ERROR_KIND_CANCELLED: &str = "cancelled";
