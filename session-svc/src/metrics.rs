//! session-svc's Prometheus metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabel {
    /// prepare (lock, append, trim), generate (no lock), store (lock, save).
    pub phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

/// What session-svc measures.
pub struct Metrics {
    /// Time a session lock is held: the design's one rule, measured.
    pub lock_hold: Histogram,
    /// Time from the first attempt to take a lock until it is ours.
    pub lock_wait: Histogram,
    /// Turn latency by phase.
    pub phase: Family<PhaseLabel, Histogram>,
    /// Turns by outcome (ok, replay, error).
    pub turns: Family<OutcomeLabel, Counter>,
    /// Errors by kind.
    pub errors: Family<KindLabel, Counter>,
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Self {
        // 10 µs .. ~0.3 s: lock times should sit at the low end.
        let lock_buckets = || exponential_buckets(0.000_01, 2.0, 16);
        let m = Self {
            lock_hold: Histogram::new(lock_buckets()),
            lock_wait: Histogram::new(lock_buckets()),
            phase: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.000_05, 2.0, 22))
            }),
            turns: Family::default(),
            errors: Family::default(),
        };
        let r = registry.sub_registry_with_prefix("palaver_session");
        r.register_with_unit(
            "lock_hold",
            "Time a session lock was held",
            prometheus_client::registry::Unit::Seconds,
            m.lock_hold.clone(),
        );
        r.register_with_unit(
            "lock_wait",
            "Time spent waiting for a session lock",
            prometheus_client::registry::Unit::Seconds,
            m.lock_wait.clone(),
        );
        r.register_with_unit(
            "turn_phase",
            "Turn latency by phase",
            prometheus_client::registry::Unit::Seconds,
            m.phase.clone(),
        );
        r.register("turns", "Turns by outcome", m.turns.clone());
        r.register("errors", "Failed calls by kind", m.errors.clone());
        m
    }
}
