//! "Is every project subscribed (or left to another gateway)?" as a
//! watchable flag.
//!
//! Tests (and orchestration) must not publish before the broker knows the
//! gateway's subscriptions, or the message is lost; the flag turns true only
//! when every project's connection has its SubAck, and false again while any
//! of them is reconnecting. Each project's state is also a gauge
//! (`palaver_gateway_subscribed`), for the operator outside the process.

use std::sync::Mutex;

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::watch;

/// Per-project subscription state, summarised in one watch channel.
pub struct Readiness {
    /// Per project: subscribed, or standing by for another gateway's lease.
    subscribed: Mutex<Vec<bool>>,
    /// One per project, in the same order, set with `subscribed`.
    gauges: Vec<Gauge>,
    all: watch::Sender<bool>,
}

impl Readiness {
    /// One connection per gauge, none subscribed yet.
    pub fn new(gauges: Vec<Gauge>) -> Self {
        for g in &gauges {
            g.set(0);
        }
        Self {
            subscribed: Mutex::new(vec![false; gauges.len()]),
            gauges,
            all: watch::Sender::new(false),
        }
    }

    /// Records whether project number `index` is subscribed.
    pub fn set(&self, index: usize, subscribed: bool) {
        self.record(index, subscribed, subscribed);
    }

    /// Project number `index` is another gateway's to consume, and this one
    /// stands by to take it over: ready, but not subscribed.
    pub fn standby(&self, index: usize) {
        self.record(index, true, false);
    }

    fn record(&self, index: usize, ready: bool, subscribed: bool) {
        let mut state = self.subscribed.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = state.get_mut(index) {
            *slot = ready;
            self.gauges[index].set(i64::from(subscribed));
        }
        let all = !state.is_empty() && state.iter().all(|s| *s);
        self.all.send_if_modified(|current| {
            let changed = *current != all;
            *current = all;
            changed
        });
    }

    /// Marks every project unsubscribed (shutdown).
    pub fn clear(&self) {
        let len = self
            .subscribed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len();
        for i in 0..len {
            self.set(i, false);
        }
    }

    /// A receiver of the summary flag.
    pub fn watch(&self) -> watch::Receiver<bool> {
        self.all.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn true_only_when_all_are_subscribed() {
        let gauges = vec![Gauge::default(), Gauge::default()];
        let r = Readiness::new(gauges.clone());
        let rx = r.watch();
        r.set(0, true);
        assert!(!*rx.borrow());
        assert_eq!((gauges[0].get(), gauges[1].get()), (1, 0));
        r.set(1, true);
        assert!(*rx.borrow());
        r.set(0, false);
        assert!(!*rx.borrow());
        r.set(0, true);
        assert!(*rx.borrow());
        r.clear();
        assert!(!*rx.borrow());
        assert_eq!((gauges[0].get(), gauges[1].get()), (0, 0));
        r.set(7, true); // out of range: ignored, no panic
        assert!(!*rx.borrow());
    }
}
