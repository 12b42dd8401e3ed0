//! Prometheus metrics of inference-svc, registered into the caller's registry
//! (one registry per process, served by `palaver_core::telemetry`).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

type Labels = [(&'static str, &'static str); 1];

/// How a gRPC call ended, for `palaver_inference_requests_total{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The reply finished.
    Ok,
    /// The call failed; `errors_total{kind}` says why.
    Error,
    /// The caller went away before the reply finished.
    Cancelled,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Error => "error",
            Self::Cancelled => "cancelled",
        }
    }
}

/// All metrics of the service; clones share the same series.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// Generations holding a slot right now (at most `max_concurrent`).
    pub in_flight: Gauge,
    /// Callers waiting for a slot right now (at most `max_queue`).
    pub queue_depth: Gauge,
    /// Time from arrival to getting a slot, for admitted calls.
    pub queue_wait: Histogram,
    /// Time a generation held its slot: from admission to its last chunk.
    pub generation: Histogram,
    requests: Family<Labels, Counter>,
    errors: Family<Labels, Counter>,
}

impl Metrics {
    /// Creates the metrics and registers them as `palaver_inference_*`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            in_flight: Gauge::default(),
            queue_depth: Gauge::default(),
            // 10 µs .. ~42 s: an admitted call usually waits not at all
            // (a few µs), and the default queue timeout is 30 s.
            queue_wait: Histogram::new(exponential_buckets(0.000_01, 2.0, 23)),
            // 1 ms .. ~9 min: a fast or simulated model answers in
            // milliseconds; the default request timeout is 5 min.
            generation: Histogram::new(exponential_buckets(0.001, 2.0, 20)),
            requests: Family::default(),
            errors: Family::default(),
        };
        registry.register(
            "palaver_inference_in_flight",
            "Generations currently holding a slot",
            m.in_flight.clone(),
        );
        registry.register(
            "palaver_inference_queue_depth",
            "Calls currently waiting for a slot",
            m.queue_depth.clone(),
        );
        registry.register(
            "palaver_inference_queue_wait_seconds",
            "Time admitted calls waited for a slot",
            m.queue_wait.clone(),
        );
        registry.register(
            "palaver_inference_generation_seconds",
            "Time a generation held its slot, until its last chunk",
            m.generation.clone(),
        );
        // prometheus-client appends `_total` to counters.
        registry.register(
            "palaver_inference_requests",
            "Inference calls by outcome (ok, error, cancelled)",
            m.requests.clone(),
        );
        registry.register(
            "palaver_inference_errors",
            "Failed inference calls by error kind",
            m.errors.clone(),
        );
        m
    }

    /// Metrics that are not exported anywhere (for tests and tools).
    pub fn unregistered() -> Self {
        Self::register(&mut Registry::default())
    }

    /// Counts one finished call.
    pub fn record(&self, outcome: Outcome) {
        self.requests
            .get_or_create(&[("outcome", outcome.label())])
            .inc();
    }

    /// Counts one failure of `kind` (see `InferenceError::kind`).
    pub fn record_error(&self, kind: &'static str) {
        self.errors.get_or_create(&[("kind", kind)]).inc();
    }

    /// Calls counted with `outcome` so far.
    pub fn requests(&self, outcome: Outcome) -> u64 {
        self.requests
            .get_or_create(&[("outcome", outcome.label())])
            .get()
    }

    /// Errors counted with `kind` so far.
    pub fn errors(&self, kind: &'static str) -> u64 {
        self.errors.get_or_create(&[("kind", kind)]).get()
    }
}
