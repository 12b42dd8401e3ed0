//! Admission control on the outbound call: at most `max_concurrent`
//! generations run, at most `max_queue` callers wait for a slot, and none
//! waits longer than `queue_timeout`.
//!
//! A generation streams, so finishing the call is not finishing the work: the
//! slot (a semaphore permit) moves into the returned stream and is given back
//! with the last chunk, or when the stream is dropped (the caller left).
//!
//! Unlike `tower::limit::ConcurrencyLimit`, waiting happens in `call`, not in
//! `poll_ready`: that is what makes a bounded, timed queue possible for a
//! cloned service shared by many gRPC calls.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};
use tokio::time::Instant;
use tower::{Layer, Service};
use tracing::Instrument as _;

use crate::backend::{Chunk, GenerateParams, TokenStream};
use crate::error::InferenceError;
use crate::metrics::Metrics;

/// State shared by every clone of the admission service.
struct Shared {
    slots: Arc<Semaphore>,
    max_concurrent: usize,
    waiting: AtomicUsize,
    max_queue: usize,
    queue_timeout: Duration,
    metrics: Metrics,
}

/// Layer that puts [`Admission`] in front of a backend.
#[derive(Clone)]
pub struct AdmissionLayer {
    shared: Arc<Shared>,
}

impl AdmissionLayer {
    /// `max_concurrent` slots, `max_queue` waiting callers, `queue_timeout`
    /// longest wait; gauges and the wait histogram go to `metrics`.
    pub fn new(
        max_concurrent: usize,
        max_queue: usize,
        queue_timeout: Duration,
        metrics: Metrics,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                slots: Arc::new(Semaphore::new(max_concurrent)),
                max_concurrent,
                waiting: AtomicUsize::new(0),
                max_queue,
                queue_timeout,
                metrics,
            }),
        }
    }
}

impl<S> Layer<S> for AdmissionLayer {
    type Service = Admission<S>;

    fn layer(&self, inner: S) -> Admission<S> {
        Admission {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// The admission service; see the module docs.
#[derive(Clone)]
pub struct Admission<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> Admission<S> {
    /// Generations holding a slot now.
    pub fn in_flight(&self) -> usize {
        self.shared
            .max_concurrent
            .saturating_sub(self.shared.slots.available_permits())
    }

    /// Callers waiting for a slot now.
    pub fn queue_depth(&self) -> usize {
        self.shared.waiting.load(Ordering::Acquire)
    }
}

impl<S> Service<GenerateParams> for Admission<S>
where
    S: Service<GenerateParams, Response = TokenStream, Error = InferenceError>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = TokenStream;
    type Error = InferenceError;
    type Future = Pin<Box<dyn Future<Output = Result<TokenStream, InferenceError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: GenerateParams) -> Self::Future {
        // The inner service was made ready in `poll_ready`; keep that one for
        // this call and leave a fresh clone behind (tower's usual dance).
        let fresh = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, fresh);
        let shared = self.shared.clone();
        Box::pin(async move {
            // The wait for a slot, as a span of the turn's trace.
            let slot = Shared::admit(&shared)
                .instrument(tracing::debug_span!("queue"))
                .await?;
            // A failure before streaming drops `slot` here: the slot frees.
            let stream = inner.call(req).await?;
            Ok(Box::pin(HoldSlot {
                inner: stream,
                slot: Some(slot),
            }) as TokenStream)
        })
    }
}

impl Shared {
    async fn admit(this: &Arc<Self>) -> Result<Slot, InferenceError> {
        let arrived = Instant::now();
        let permit = match this.slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(TryAcquireError::Closed) => return Err(closed()),
            Err(TryAcquireError::NoPermits) => {
                let _queued = Queued::enter(this)?;
                match tokio::time::timeout(this.queue_timeout, this.slots.clone().acquire_owned())
                    .await
                {
                    Ok(Ok(p)) => p,
                    Ok(Err(_)) => return Err(closed()),
                    Err(_) => return Err(InferenceError::QueueTimeout(this.queue_timeout)),
                }
            }
        };
        this.metrics
            .queue_wait
            .observe(arrived.elapsed().as_secs_f64());
        this.metrics.in_flight.inc();
        Ok(Slot {
            _permit: permit,
            shared: this.clone(),
            since: Instant::now(),
        })
    }
}

fn closed() -> InferenceError {
    InferenceError::Unavailable("inference-svc is shutting down".into())
}

/// A place in the queue; leaving it (admitted, timed out or cancelled) frees it.
struct Queued {
    shared: Arc<Shared>,
}

impl Queued {
    fn enter(shared: &Arc<Shared>) -> Result<Self, InferenceError> {
        shared
            .waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < shared.max_queue).then_some(n + 1)
            })
            .map_err(|_| InferenceError::QueueFull)?;
        shared.metrics.queue_depth.inc();
        Ok(Self {
            shared: shared.clone(),
        })
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        self.shared.waiting.fetch_sub(1, Ordering::AcqRel);
        self.shared.metrics.queue_depth.dec();
    }
}

/// A running generation's slot; dropping it lets the next caller in.
struct Slot {
    _permit: OwnedSemaphorePermit,
    shared: Arc<Shared>,
    since: Instant,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.shared.metrics.in_flight.dec();
        self.shared
            .metrics
            .generation
            .observe(self.since.elapsed().as_secs_f64());
    }
}

/// A token stream that owns its slot until its last chunk, an error, its end
/// or its drop, whichever comes first.
struct HoldSlot {
    inner: TokenStream,
    slot: Option<Slot>,
}

impl Stream for HoldSlot {
    type Item = Result<Chunk, InferenceError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let item = std::task::ready!(self.inner.as_mut().poll_next(cx));
        let last = match &item {
            Some(Ok(chunk)) => chunk.finish_reason.is_some(),
            Some(Err(_)) | None => true,
        };
        if last {
            self.slot = None;
        }
        Poll::Ready(item)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use tokio::sync::mpsc;
    use tower::{ServiceBuilder, ServiceExt};

    /// A backend whose streams yield what the test sends through a channel.
    #[derive(Clone)]
    struct Manual {
        streams: Arc<std::sync::Mutex<Vec<mpsc::UnboundedSender<Chunk>>>>,
    }

    impl Manual {
        fn new() -> Self {
            Self {
                streams: Arc::default(),
            }
        }
    }

    impl Service<GenerateParams> for Manual {
        type Response = TokenStream;
        type Error = InferenceError;
        type Future = futures::future::Ready<Result<TokenStream, InferenceError>>;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), InferenceError>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _req: GenerateParams) -> Self::Future {
            let (tx, rx) = mpsc::unbounded_channel();
            self.streams.lock().unwrap().push(tx);
            let stream = tokio_stream::wrappers::UnboundedReceiverStream::new(rx).map(Ok);
            futures::future::ready(Ok(Box::pin(stream) as TokenStream))
        }
    }

    fn params() -> GenerateParams {
        GenerateParams {
            messages: Vec::new(),
            temperature: 0.0,
            top_p: 1.0,
            max_tokens: 1,
            request_id: String::new(),
            affinity_key: String::new(),
        }
    }

    fn stack(
        max_concurrent: usize,
        max_queue: usize,
        queue_timeout: Duration,
    ) -> (Admission<Manual>, Manual) {
        let backend = Manual::new();
        let svc = ServiceBuilder::new()
            .layer(AdmissionLayer::new(
                max_concurrent,
                max_queue,
                queue_timeout,
                Metrics::unregistered(),
            ))
            .service(backend.clone());
        (svc, backend)
    }

    #[tokio::test]
    async fn fourth_caller_is_refused_when_two_run_and_one_waits() {
        let (svc, _backend) = stack(2, 1, Duration::from_secs(10));
        let a = svc.clone().oneshot(params()).await.unwrap();
        let b = svc.clone().oneshot(params()).await.unwrap();
        assert_eq!(svc.in_flight(), 2);
        let waiter = tokio::spawn(svc.clone().oneshot(params()));
        while svc.queue_depth() < 1 {
            tokio::task::yield_now().await;
        }
        let fourth = svc.clone().oneshot(params()).await;
        assert_eq!(fourth.err(), Some(InferenceError::QueueFull));
        // Dropping a running stream lets the waiter in.
        drop(a);
        let c = waiter.await.unwrap().unwrap();
        assert_eq!((svc.in_flight(), svc.queue_depth()), (2, 0));
        drop((b, c));
        assert_eq!(svc.in_flight(), 0);
    }

    #[tokio::test]
    async fn waiting_longer_than_the_queue_timeout_fails() {
        let timeout = Duration::from_millis(100);
        let (svc, _backend) = stack(1, 4, timeout);
        let _running = svc.clone().oneshot(params()).await.unwrap();
        let started = std::time::Instant::now();
        let err = svc.clone().oneshot(params()).await.err();
        let waited = started.elapsed();
        assert_eq!(err, Some(InferenceError::QueueTimeout(timeout)));
        assert!(waited >= timeout, "gave up after {waited:?}");
        assert!(waited < timeout * 10, "gave up after {waited:?}");
        assert_eq!(svc.queue_depth(), 0);
    }

    #[tokio::test]
    async fn a_stream_holds_its_slot_until_the_last_chunk() {
        let (svc, backend) = stack(1, 0, Duration::from_secs(10));
        let mut running = svc.clone().oneshot(params()).await.unwrap();
        let tx = backend.streams.lock().unwrap()[0].clone();
        tx.send(Chunk {
            delta: "a".into(),
            ..Chunk::default()
        })
        .unwrap();
        assert_eq!(running.next().await.unwrap().unwrap().delta, "a");
        // Still generating: the slot is taken and the queue is empty (0).
        assert_eq!(svc.in_flight(), 1);
        assert_eq!(
            svc.clone().oneshot(params()).await.err(),
            Some(InferenceError::QueueFull)
        );
        tx.send(Chunk {
            finish_reason: Some("stop".into()),
            ..Chunk::default()
        })
        .unwrap();
        running.next().await.unwrap().unwrap();
        // The last chunk gave the slot back, though the stream still exists.
        assert_eq!(svc.in_flight(), 0);
        let again = svc.clone().oneshot(params()).await;
        assert!(again.is_ok());
    }

    #[tokio::test]
    async fn cancelled_waiters_leave_the_queue() {
        let (svc, _backend) = stack(1, 1, Duration::from_secs(10));
        let _running = svc.clone().oneshot(params()).await.unwrap();
        let waiter = tokio::spawn(svc.clone().oneshot(params()));
        while svc.queue_depth() < 1 {
            tokio::task::yield_now().await;
        }
        waiter.abort();
        let _ = waiter.await;
        assert_eq!(svc.queue_depth(), 0);
        // The place is free again: the next caller waits instead of failing.
        let next =
            tokio::time::timeout(Duration::from_millis(50), svc.clone().oneshot(params())).await;
        assert!(next.is_err(), "should still be waiting for the slot");
    }
}
