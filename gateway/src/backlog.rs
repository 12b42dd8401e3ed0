//! The bound on requests in progress (`max-pending`), shared by every
//! project, and the way shutdown waits for them.
//!
//! A permit is taken without waiting when a request arrives; when none is
//! left the client is told "Server is overloaded" at once instead of queueing
//! without limit. Shutdown waits until every permit is back.

use std::sync::Arc;

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::metrics::Metrics;

/// The shared bound; clones share the same permits.
#[derive(Clone)]
pub struct Backlog {
    permits: Arc<Semaphore>,
    size: u32,
    pending: Gauge,
}

/// One admitted request; dropping it frees its place (and moves the gauge).
pub struct Permit {
    _permit: OwnedSemaphorePermit,
    pending: Gauge,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.pending.dec();
    }
}

impl Backlog {
    /// A backlog of `size` places, reported through `metrics`' pending gauge.
    ///
    /// `size` is clamped to `1..=u32::MAX`; `Config::validate` keeps it far below.
    pub fn new(size: usize, metrics: &Metrics) -> Self {
        let size = u32::try_from(size.max(1)).unwrap_or(u32::MAX);
        Self {
            permits: Arc::new(Semaphore::new(size as usize)),
            size,
            pending: metrics.pending().clone(),
        }
    }

    /// A place for one request, if any is free right now.
    pub fn try_admit(&self) -> Option<Permit> {
        let permit = self.permits.clone().try_acquire_owned().ok()?;
        self.pending.inc();
        Some(Permit {
            _permit: permit,
            pending: self.pending.clone(),
        })
    }

    /// Requests currently admitted.
    pub fn in_use(&self) -> usize {
        (self.size as usize).saturating_sub(self.permits.available_permits())
    }

    /// Resolves once every admitted request has finished.
    pub async fn drained(&self) {
        // Taking every permit proves none is held; they go back at once.
        let _all = self.permits.acquire_many(self.size).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::registry::Registry;
    use std::time::Duration;

    #[tokio::test]
    async fn bounded_and_drains() {
        let metrics = Metrics::register(&mut Registry::default());
        let backlog = Backlog::new(2, &metrics);
        let a = backlog.try_admit().expect("first");
        let b = backlog.try_admit().expect("second");
        assert!(backlog.try_admit().is_none(), "third must be refused");
        assert_eq!(backlog.in_use(), 2);
        assert_eq!(metrics.pending().get(), 2);

        let waiter = {
            let backlog = backlog.clone();
            tokio::spawn(async move { backlog.drained().await })
        };
        drop(a);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            !waiter.is_finished(),
            "drained while a request is still held"
        );
        drop(b);
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("drained after the last permit")
            .unwrap();
        assert_eq!(metrics.pending().get(), 0);
        assert!(
            backlog.try_admit().is_some(),
            "permits are back after draining"
        );
    }
}
