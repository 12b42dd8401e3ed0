//! session-svc's Prometheus metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabel {
    /// prepare (append, trim: one atomic step), generate (nothing held),
    /// store (save the reply: one atomic step).
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
    /// Time a session is held exclusively: the design's one rule, measured.
    /// For a turn's one-step changes, the compare-and-set's run inside the
    /// store (by Redis's clock); for two-step changes, the lock from taken
    /// to released.
    pub lock_hold: Histogram,
    /// Time from the first attempt at a change until it got through (one
    /// round trip when the session is free).
    pub lock_wait: Histogram,
    /// Swaps that lost to another change of the same session and were
    /// tried again: contention on one session.
    pub swap_retries: Counter,
    /// Turn latency by phase.
    pub phase: Family<PhaseLabel, Histogram>,
    /// Turns by outcome (ok, replay, error, cancelled).
    pub turns: Family<OutcomeLabel, Counter>,
    /// Errors by kind.
    pub errors: Family<KindLabel, Counter>,
    /// Chat turns being handled right now (any phase).
    pub in_flight: Gauge,
}

/// Lock-time buckets: half octaves from 15.6 µs to 0.5 s, with 1 ms
/// exactly among the bounds. Lock times should sit at the low end; the
/// bound at 1 ms makes "what share of holds took at most 1 ms" exact rather
/// than interpolated, and the half octaves keep a percentile read from the
/// buckets within a factor of 1.41 of the true value.
fn lock_buckets() -> impl Iterator<Item = f64> {
    (0..=30).map(|i| 1e-3 * 2f64.powf(f64::from(i - 12) / 2.0))
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            lock_hold: Histogram::new(lock_buckets()),
            lock_wait: Histogram::new(lock_buckets()),
            phase: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.000_05, 2.0, 22))
            }),
            swap_retries: Counter::default(),
            turns: Family::default(),
            errors: Family::default(),
            in_flight: Gauge::default(),
        };
        let r = registry.sub_registry_with_prefix("palaver_session");
        r.register_with_unit(
            "lock_hold",
            "Time a session was held exclusively by one change",
            prometheus_client::registry::Unit::Seconds,
            m.lock_hold.clone(),
        );
        r.register_with_unit(
            "lock_wait",
            "Time from the first attempt at a session change until it got through",
            prometheus_client::registry::Unit::Seconds,
            m.lock_wait.clone(),
        );
        r.register_with_unit(
            "turn_phase",
            "Turn latency by phase",
            prometheus_client::registry::Unit::Seconds,
            m.phase.clone(),
        );
        r.register(
            "swap_retries",
            "Swaps of a turn that lost to another change of the session and were tried again",
            m.swap_retries.clone(),
        );
        r.register("turns", "Turns by outcome", m.turns.clone());
        r.register("errors", "Failed calls by kind", m.errors.clone());
        r.register(
            "turns_in_flight",
            "Chat turns being handled right now",
            m.in_flight.clone(),
        );
        m
    }

    /// Counts a turn in flight until the returned guard is dropped.
    pub fn turn_started(&self) -> InFlight {
        self.in_flight.inc();
        InFlight(self.in_flight.clone())
    }
}

/// One turn in [`Metrics::in_flight`]; leaving (however the turn ends) counts it out.
pub struct InFlight(Gauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_buckets_have_one_millisecond_exactly() {
        let b: Vec<f64> = lock_buckets().collect();
        assert!(b.contains(&0.001), "{b:?}");
        assert!(b[0] < 0.000_02 && *b.last().unwrap() > 0.4);
        assert!(b.windows(2).all(|w| w[0] < w[1]));
    }
}
