//! Admission control on the outbound call: at most `max_concurrent`
//! generations run, at most `max_queue` callers wait for a slot, and none
//! waits longer than `queue_timeout`. Which waiter a freed slot goes to is
//! [`crate::fair_queue`]'s choice: by default the client running the fewest.
//!
//! A generation streams, so finishing the call is not finishing the work: the
//! slot moves into the returned stream and is given back with the last
//! chunk, or when the stream is dropped (the caller left).
//!
//! Unlike `tower::limit::ConcurrencyLimit`, waiting happens in `call`, not in
//! `poll_ready`: that is what makes a bounded, timed queue possible for a
//! cloned service shared by many gRPC calls.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tower::{Layer, Service};
use tracing::Instrument as _;

use crate::backend::{Chunk, GenerateParams, TokenStream};
use crate::error::InferenceError;
use crate::fair_queue::{Admit, FairQueue, Ticket};
use crate::metrics::Metrics;

/// State shared by every clone of the admission service.
struct Shared {
    /// Slots and waiters; held only for bookkeeping, never across an await.
    queue: Mutex<FairQueue<oneshot::Sender<()>>>,
    max_concurrent: usize,
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
    /// longest wait; with `fair_share` a freed slot goes to the waiting
    /// client running the fewest generations (else to the longest waiting
    /// caller). Gauges and the wait histogram go to `metrics`.
    pub fn new(
        max_concurrent: usize,
        max_queue: usize,
        queue_timeout: Duration,
        fair_share: bool,
        metrics: Metrics,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                queue: Mutex::new(FairQueue::new(max_concurrent, fair_share)),
                max_concurrent,
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
            .saturating_sub(self.shared.queue().free())
    }

    /// Callers waiting for a slot now.
    pub fn queue_depth(&self) -> usize {
        self.shared.queue().waiters()
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
            let slot = Shared::admit(&shared, req.client.clone())
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
    fn queue(&self) -> MutexGuard<'_, FairQueue<oneshot::Sender<()>>> {
        // Bookkeeping only, updated in whole steps: usable after a panic.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn admit(this: &Arc<Self>, client: String) -> Result<Slot, InferenceError> {
        let arrived = Instant::now();
        let (wake, woken) = oneshot::channel();
        let admitted = this.queue().admit(&client, this.max_queue, wake);
        match admitted {
            Admit::Now => {}
            Admit::Full => return Err(InferenceError::QueueFull),
            Admit::Queued(ticket) => {
                let mut place = Place::new(this, &client, ticket);
                match tokio::time::timeout(this.queue_timeout, woken).await {
                    Ok(Ok(())) => place.admitted = true,
                    // The queue dropped the waker without a slot: cannot
                    // happen while this caller holds the queue; fail safe.
                    Ok(Err(_)) => {
                        return Err(InferenceError::Unavailable(
                            "admission queue lost a waiter".into(),
                        ))
                    }
                    Err(_) => return Err(InferenceError::QueueTimeout(this.queue_timeout)),
                }
            }
        }
        this.metrics
            .queue_wait
            .observe(arrived.elapsed().as_secs_f64());
        this.metrics.in_flight.inc();
        Ok(Slot {
            shared: this.clone(),
            client,
            since: Instant::now(),
        })
    }

    /// `client` gives a slot back: it goes to the next waiter, if any.
    fn hand_on(&self, client: &str) {
        let next = self.queue().release(client);
        if let Some((_, wake)) = next {
            // A waiter gone meanwhile finds its place taken in `Place::drop`
            // and hands the slot on itself.
            let _ = wake.send(());
        }
    }
}

/// A place in the queue; leaving it (admitted, timed out or cancelled) frees
/// it. Left without being admitted after a slot was already given to it, it
/// passes that slot on.
struct Place<'a> {
    shared: &'a Shared,
    client: &'a str,
    ticket: Ticket,
    admitted: bool,
}

impl<'a> Place<'a> {
    fn new(shared: &'a Shared, client: &'a str, ticket: Ticket) -> Self {
        shared.metrics.queue_depth.inc();
        Self {
            shared,
            client,
            ticket,
            admitted: false,
        }
    }
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        self.shared.metrics.queue_depth.dec();
        if self.admitted {
            return;
        }
        let left = self.shared.queue().leave(self.client, self.ticket);
        if !left {
            self.shared.hand_on(self.client);
        }
    }
}

/// A running generation's slot; dropping it lets the next caller in.
struct Slot {
    shared: Arc<Shared>,
    client: String,
    since: Instant,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.shared.metrics.in_flight.dec();
        self.shared
            .metrics
            .generation
            .observe(self.since.elapsed().as_secs_f64());
        self.shared.hand_on(&self.client);
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
            client: String::new(),
        }
    }

    fn from(client: &str) -> GenerateParams {
        GenerateParams {
            client: client.into(),
            ..params()
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
                true,
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

    /// The layer with the queue: a client that runs nothing is let in before
    /// the earlier waiter of a client that runs one.
    #[tokio::test]
    async fn a_freed_slot_goes_to_the_client_running_nothing() {
        let (svc, _backend) = stack(2, 8, Duration::from_secs(10));
        let first = svc.clone().oneshot(from("flood")).await.unwrap();
        let second = svc.clone().oneshot(from("flood")).await.unwrap();
        let flood = tokio::spawn(svc.clone().oneshot(from("flood")));
        while svc.queue_depth() < 1 {
            tokio::task::yield_now().await;
        }
        let calm = tokio::spawn(svc.clone().oneshot(from("calm")));
        while svc.queue_depth() < 2 {
            tokio::task::yield_now().await;
        }
        // "flood" still runs one, "calm" none: "calm" goes first.
        drop(first);
        let calm = calm.await.unwrap().unwrap();
        assert_eq!((svc.in_flight(), svc.queue_depth()), (2, 1));
        assert!(!flood.is_finished());
        drop((second, calm));
        let flood = flood.await.unwrap().unwrap();
        drop(flood);
        assert_eq!((svc.in_flight(), svc.queue_depth()), (0, 0));
    }
}
