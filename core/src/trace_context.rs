//! W3C trace context (`traceparent`) between palaver's hops: injected into
//! every gRPC call (by the client interceptor, [`crate::auth::Bearer`]) and
//! into the model server's HTTP request, extracted by every gRPC server
//! ([`TraceContextLayer`]) and from an MQTT request.
//!
//! Everything here is a no-op while tracing is off (no `--otlp-endpoint`):
//! one atomic load, no header parsed or written, nothing allocated.

use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context as TaskContext, Poll};

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt as _;
use opentelemetry::Context;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// The header (and gRPC metadata key, and MQTT 5 user property) carrying
/// the caller's trace context.
pub const TRACEPARENT: &str = "traceparent";

/// Set once an OTLP exporter is running in this process.
static ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported from this process.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

pub(crate) fn set_enabled() {
    ENABLED.store(true, Ordering::Relaxed);
}

/// The parent a turn's first span takes from a W3C `traceparent` sent with
/// the request (an MQTT 5 user property); an empty context (a new trace)
/// without one or when it does not parse.
pub fn parent_from_traceparent(traceparent: Option<&str>) -> Context {
    match traceparent {
        Some(value) if enabled() => TraceContextPropagator::new().extract(&One(value)),
        _ => Context::new(),
    }
}

/// Makes `span` (the first span of a turn in this service) a child of
/// `parent`, a root when `parent` is empty, and records its trace id in its
/// `trace_id` field so that log lines inside it name their trace. Nothing
/// while tracing is off.
pub fn adopt(span: &tracing::Span, parent: Context) {
    if !enabled() || span.is_disabled() {
        return;
    }
    // Without a parent, an explicit empty one: a turn never joins whatever
    // span happened to be current where its task was spawned.
    let _ = span.set_parent(parent);
    let cx = span.context();
    let otel = cx.span();
    let ids = otel.span_context();
    if ids.is_valid() {
        span.record("trace_id", tracing::field::display(ids.trace_id()));
    }
}

/// The caller's trace context of a gRPC request, put there by
/// [`TraceContextLayer`]; empty when there was none.
pub fn remote_parent(extensions: &http::Extensions) -> Context {
    extensions
        .get::<RemoteParent>()
        .map(|p| p.0.clone())
        .unwrap_or_default()
}

/// The current span's context as a `traceparent` value, for an HTTP request
/// to the model server; `None` while tracing is off or outside a traced span.
pub fn current_traceparent() -> Option<String> {
    if !enabled() {
        return None;
    }
    let mut out = None;
    TraceContextPropagator::new()
        .inject_context(&tracing::Span::current().context(), &mut Collect(&mut out));
    out
}

/// Adds the current span's `traceparent` to a gRPC call's metadata.
pub(crate) fn inject(metadata: &mut tonic::metadata::MetadataMap) {
    if !enabled() {
        return;
    }
    TraceContextPropagator::new()
        .inject_context(&tracing::Span::current().context(), &mut Metadata(metadata));
}

/// A request extension: the trace context its caller sent.
#[derive(Clone)]
struct RemoteParent(Context);

/// A tower layer for gRPC servers: reads the caller's `traceparent` into a
/// request extension, for [`remote_parent`].
#[derive(Debug, Clone, Copy, Default)]
pub struct TraceContextLayer;

impl<S> tower::Layer<S> for TraceContextLayer {
    type Service = TraceContextService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TraceContextService { inner }
    }
}

/// The service [`TraceContextLayer`] makes.
#[derive(Debug, Clone)]
pub struct TraceContextService<S> {
    inner: S,
}

impl<S, B> tower::Service<http::Request<B>> for TraceContextService<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        if enabled() && req.headers().contains_key(TRACEPARENT) {
            let parent = TraceContextPropagator::new().extract(&Headers(req.headers()));
            req.extensions_mut().insert(RemoteParent(parent));
        }
        self.inner.call(req)
    }
}

/// A single `traceparent` value as a carrier.
struct One<'a>(&'a str);

impl Extractor for One<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        (key == TRACEPARENT).then_some(self.0)
    }

    fn keys(&self) -> Vec<&str> {
        vec![TRACEPARENT]
    }
}

/// Keeps only the `traceparent` the propagator writes.
struct Collect<'a>(&'a mut Option<String>);

impl Injector for Collect<'_> {
    fn set(&mut self, key: &str, value: String) {
        if key == TRACEPARENT {
            *self.0 = Some(value);
        }
    }
}

struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

struct Metadata<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for Metadata<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            value.parse(),
        ) {
            self.0.insert(key, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_parses_into_a_remote_parent_and_garbage_into_none() {
        set_enabled();
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let cx = parent_from_traceparent(Some(tp));
        let sc = cx.span().span_context().clone();
        assert!(sc.is_valid() && sc.is_remote() && sc.is_sampled());
        assert_eq!(
            sc.trace_id().to_string(),
            "0af7651916cd43dd8448eb211c80319c"
        );
        assert!(!parent_from_traceparent(Some("00-zz-zz-01"))
            .span()
            .span_context()
            .is_valid());
        assert!(!parent_from_traceparent(None)
            .span()
            .span_context()
            .is_valid());
    }
}
