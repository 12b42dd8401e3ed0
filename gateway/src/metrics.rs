//! The gateway's Prometheus metrics.
//!
//! Registered into a registry the caller owns, so `main` can expose them and a
//! test can read them back.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// `{project}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProjectLabel {
    project: String,
}

/// `{project, kind}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutLabels {
    project: String,
    kind: String,
}

/// `{reason}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

/// `{kind}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

/// What a published message was, for `messages_out_total{kind}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutKind {
    /// A model reply.
    Reply,
    /// An error reply (plain text starting with `Error: ` or the overload string).
    Error,
    /// A piece of a streamed reply, on `<replyTopic>/stream`.
    Piece,
    /// A control acknowledgement.
    Hint,
    /// Presence: online, offline or heartbeat.
    Status,
}

impl OutKind {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            OutKind::Reply => "reply",
            OutKind::Error => "error",
            OutKind::Piece => "piece",
            OutKind::Hint => "hint",
            OutKind::Status => "status",
        }
    }
}

/// Handles to every gateway metric; cheap to clone (shared counters).
#[derive(Clone)]
pub struct Metrics {
    messages_in: Family<ProjectLabel, Counter>,
    messages_out: Family<OutLabels, Counter>,
    dropped: Family<ReasonLabel, Counter>,
    pending: Gauge,
    turn_seconds: Histogram,
    errors: Family<KindLabel, Counter>,
    retries: Counter,
    subscribed: Family<ProjectLabel, Gauge>,
}

impl Metrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            messages_in: Family::default(),
            messages_out: Family::default(),
            dropped: Family::default(),
            pending: Gauge::default(),
            // 0.5 ms .. ~260 s: a turn against a fast model takes about a
            // millisecond; the default deadline is 120 s.
            turn_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 20)),
            errors: Family::default(),
            retries: Counter::default(),
            subscribed: Family::default(),
        };
        // prometheus-client appends `_total` to counters.
        registry.register(
            "palaver_gateway_mqtt_messages_in",
            "MQTT messages received on subscribed topics",
            m.messages_in.clone(),
        );
        registry.register(
            "palaver_gateway_mqtt_messages_out",
            "MQTT messages published, by kind (reply, error, hint, status)",
            m.messages_out.clone(),
        );
        registry.register(
            "palaver_gateway_dropped",
            "Received messages (or replies) dropped without an answer, by reason",
            m.dropped.clone(),
        );
        registry.register(
            "palaver_gateway_pending",
            "Requests accepted and not yet finished (bounded by max-pending)",
            m.pending.clone(),
        );
        registry.register(
            "palaver_gateway_turn_seconds",
            "Time from receiving a chat request to having its reply or error",
            m.turn_seconds.clone(),
        );
        registry.register(
            "palaver_gateway_errors",
            "Requests answered with an error, by kind",
            m.errors.clone(),
        );
        registry.register(
            "palaver_gateway_turn_retries",
            "Attempts at a turn repeated (same request id) because session-svc was unreachable",
            m.retries.clone(),
        );
        registry.register(
            "palaver_gateway_subscribed",
            "1 while the project's broker connection is up with every subscription granted, else 0",
            m.subscribed.clone(),
        );
        m
    }

    /// The gauge of whether `project` is connected with all its
    /// subscriptions granted, for [`crate::readiness::Readiness`] to set: a
    /// broker that refuses some (an ACL, no shared subscriptions) leaves the
    /// gateway connected and heartbeating while it serves nothing.
    pub fn subscribed(&self, project: &str) -> Gauge {
        self.subscribed
            .get_or_create(&ProjectLabel {
                project: project.to_owned(),
            })
            .clone()
    }

    /// One message arrived for `project`.
    pub fn message_in(&self, project: &str) {
        self.messages_in
            .get_or_create(&ProjectLabel {
                project: project.to_owned(),
            })
            .inc();
    }

    /// One message was handed to the MQTT client for `project`.
    pub fn message_out(&self, project: &str, kind: OutKind) {
        self.messages_out
            .get_or_create(&OutLabels {
                project: project.to_owned(),
                kind: kind.as_str().to_owned(),
            })
            .inc();
    }

    /// Something was dropped for `reason`.
    pub fn dropped(&self, reason: &str) {
        self.dropped
            .get_or_create(&ReasonLabel {
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// A turn is tried again after session-svc was unreachable.
    pub fn retried(&self) {
        self.retries.inc();
    }

    /// A request ended in an error of `kind`.
    pub fn error(&self, kind: &str) {
        self.errors
            .get_or_create(&KindLabel {
                kind: kind.to_owned(),
            })
            .inc();
    }

    /// A turn took `seconds` from arrival to outcome.
    pub fn observe_turn(&self, seconds: f64) {
        self.turn_seconds.observe(seconds);
    }

    /// The pending gauge, moved by [`crate::backlog`]'s permits.
    pub(crate) fn pending(&self) -> &Gauge {
        &self.pending
    }
}
