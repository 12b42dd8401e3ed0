//! Logs, metrics and traces.
//!
//! Traces are off unless an OTLP endpoint is given ([`OtlpArgs`]); then
//! [`init`] installs, beside the log output, a layer that exports the spans
//! of a turn (named in [`TRACED_SPANS`]) with one OpenTelemetry tracer
//! provider per service, so that `palaver up`, which runs three services
//! in one process, still shows three services.

use std::ffi::OsStr;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::{
    extract::State,
    http::{header, StatusCode},
    response::IntoResponse,
    routing::get,
    Router,
};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{Level, Metadata, Subscriber};
use tracing_subscriber::filter::FilterExt as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::Layer;

/// Logs to stderr, filtered by `RUST_LOG` (default `info`). Safe to call twice.
pub fn init_logging() {
    init_logging_with("info");
}

/// Logs to stderr, filtered by `RUST_LOG`, else by `default_filter`. Safe to
/// call twice.
///
/// Colours only on a terminal: logs that go to a file, `docker logs` or a
/// log collector get plain text, with no escape codes around every field.
pub fn init_logging_with(default_filter: &str) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(env_filter(default_filter))
        .with_writer(std::io::stderr)
        .with_ansi(ansi())
        .try_init();
}

/// Where and how traces are exported; off without an endpoint.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct OtlpArgs {
    /// Export a trace of every turn over OTLP/gRPC to this collector, e.g.
    /// http://otel-collector:4317. Without it nothing is traced and tracing
    /// costs nothing.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,

    /// The traces' service name (`service.name`) [default: the service's
    /// own]. `palaver up` names its three services itself and takes this as
    /// their `service.namespace`.
    #[arg(long, env = "OTEL_SERVICE_NAME")]
    pub otlp_service_name: Option<String>,

    /// Which turns are traced: always_on, always_off, traceidratio,
    /// parentbased_always_on, parentbased_always_off or
    /// parentbased_traceidratio (the parentbased ones follow the decision of
    /// a caller that sent a traceparent) [default: parentbased_always_on].
    #[arg(long, env = "OTEL_TRACES_SAMPLER")]
    pub otlp_sampler: Option<String>,

    /// The ratio of the traceidratio samplers, from 0 to 1 [default: 1].
    #[arg(long, env = "OTEL_TRACES_SAMPLER_ARG")]
    pub otlp_sampler_arg: Option<f64>,
}

/// One service whose spans are exported: spans whose target is in crate
/// `target` are reported as coming from service `name`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Service {
    /// The crate's name as `tracing` targets spell it (`session_svc`).
    pub target: &'static str,
    /// Its `service.name`.
    pub name: &'static str,
}

/// The spans exported: one turn's stretches in each service. Other spans
/// (long-lived ones especially) would make unrelated turns one trace.
pub const TRACED_SPANS: &[&str] = &[
    "turn",
    "phase1",
    "generate",
    "phase3",
    "queue",
    "generation",
];

/// Why tracing cannot start.
#[derive(Debug, thiserror::Error)]
pub enum TracingError {
    #[error("unknown OTEL_TRACES_SAMPLER / --otlp-sampler {0:?}")]
    Sampler(String),
    #[error("OTEL_TRACES_SAMPLER_ARG / --otlp-sampler-arg {0} is not between 0 and 1")]
    Ratio(f64),
    #[error("OTLP exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
}

/// The running OTLP export: one tracer provider per service. Call
/// [`Tracing::shutdown`] before exit, so that the last spans leave.
pub struct Tracing {
    providers: Vec<SdkTracerProvider>,
    tracer: RoutedTracer,
}

impl std::fmt::Debug for Tracing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracing")
            .field("services", &self.tracer.routes.len())
            .finish()
    }
}

impl Tracing {
    /// Starts exporting for `services` (the first is the default for spans
    /// of other crates), or `None` without an endpoint: then nothing runs.
    /// Must be called inside the tokio runtime (the exporter's channel).
    pub fn start(args: &OtlpArgs, services: &[Service]) -> Result<Option<Self>, TracingError> {
        let endpoint = args.otlp_endpoint.as_deref().filter(|e| !e.is_empty());
        let (Some(endpoint), false) = (endpoint, services.is_empty()) else {
            return Ok(None);
        };
        let sampler = sampler(args.otlp_sampler.as_deref(), args.otlp_sampler_arg)?;
        let mut providers = Vec::with_capacity(services.len());
        let mut routes = Vec::with_capacity(services.len());
        for service in services {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .with_timeout(EXPORT_TIMEOUT)
                .build()?;
            let mut resource = opentelemetry_sdk::Resource::builder();
            resource = match &args.otlp_service_name {
                Some(name) if services.len() == 1 => resource.with_service_name(name.clone()),
                Some(namespace) => resource.with_service_name(service.name).with_attribute(
                    opentelemetry::KeyValue::new("service.namespace", namespace.clone()),
                ),
                None => resource.with_service_name(service.name),
            };
            let provider = SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_sampler(sampler.clone())
                .with_resource(resource.build())
                .build();
            routes.push((service.target, provider.tracer(service.target)));
            providers.push(provider);
        }
        crate::trace_context::set_enabled();
        Ok(Some(Self {
            providers,
            tracer: RoutedTracer {
                routes: routes.into(),
            },
        }))
    }

    /// The layer turning [`TRACED_SPANS`] of the services' crates (and the
    /// warnings inside them) into OpenTelemetry spans.
    pub fn layer<S>(&self) -> impl Layer<S> + 'static
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
    {
        let targets: Vec<&'static str> = self.tracer.routes.iter().map(|(t, _)| *t).collect();
        tracing_opentelemetry::layer()
            .with_tracer(self.tracer.clone())
            .with_location(false)
            .with_threads(false)
            .with_tracked_inactivity(false)
            .with_filter(tracing_subscriber::filter::filter_fn(move |meta| {
                exported(meta, &targets)
            }))
    }

    /// Logs (as [`init_logging_with`]) plus [`Tracing::layer`], as one
    /// subscriber; what [`init`] installs, for tests to install per thread.
    pub fn subscriber(&self, default_filter: &str) -> impl Subscriber + Send + Sync + 'static {
        self.subscriber_writing_to(default_filter, std::io::stderr, ansi())
    }

    /// [`Tracing::subscriber`] with its logs written to `writer`.
    pub fn subscriber_writing_to<W>(
        &self,
        default_filter: &str,
        writer: W,
        ansi: bool,
    ) -> impl Subscriber + Send + Sync + 'static
    where
        W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
    {
        // Log lines inside a turn show its span, and so its trace id.
        let turns = tracing_subscriber::filter::filter_fn(|meta| {
            meta.is_span() && meta.fields().field("trace_id").is_some()
        });
        let logs = tracing_subscriber::fmt::layer()
            .with_writer(writer)
            .with_ansi(ansi)
            .with_filter(env_filter(default_filter).or(turns));
        tracing_subscriber::registry().with(logs).with(self.layer())
    }

    /// Sends the spans ended so far.
    pub async fn flush(&self) {
        let providers = self.providers.clone();
        // Blocking: waits for the export thread, whose gRPC calls need this
        // runtime to run.
        let _ = tokio::task::spawn_blocking(move || {
            for p in providers {
                if let Err(e) = p.force_flush() {
                    tracing::warn!(error = %e, "cannot flush traces");
                }
            }
        })
        .await;
    }

    /// Sends the last spans and stops the exporters.
    pub async fn shutdown(self) {
        let providers = self.providers;
        let _ = tokio::task::spawn_blocking(move || {
            for p in providers {
                if let Err(e) = p.shutdown() {
                    tracing::warn!(error = %e, "traces not all sent at shutdown");
                }
            }
        })
        .await;
    }
}

/// How long one export may take before its spans are dropped.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// Starts logging (filtered by `RUST_LOG`, else `default_filter`) and, with
/// an OTLP endpoint, trace export for `services`. Without one it is exactly
/// [`init_logging_with`]: no exporter, no extra layer.
pub fn init(
    otlp: &OtlpArgs,
    services: &[Service],
    default_filter: &str,
) -> Result<Option<Tracing>, TracingError> {
    let tracing = Tracing::start(otlp, services)?;
    match &tracing {
        None => init_logging_with(default_filter),
        Some(t) => {
            let _ = t.subscriber(default_filter).try_init();
            tracing::info!(
                endpoint = otlp.otlp_endpoint.as_deref().unwrap_or_default(),
                "exporting traces over OTLP"
            );
        }
    }
    Ok(tracing)
}

/// Whether the OpenTelemetry layer takes `meta`: a turn's spans from the
/// traced crates, and warnings inside them.
fn exported(meta: &Metadata<'_>, targets: &[&'static str]) -> bool {
    let ours = targets.contains(&crate_of(meta.target()));
    if meta.is_span() {
        ours && TRACED_SPANS.contains(&meta.name())
    } else {
        ours && *meta.level() <= Level::WARN
    }
}

fn crate_of(target: &str) -> &str {
    target.split("::").next().unwrap_or(target)
}

fn sampler(name: Option<&str>, ratio: Option<f64>) -> Result<Sampler, TracingError> {
    let ratio = ratio.unwrap_or(1.0);
    if !(0.0..=1.0).contains(&ratio) {
        return Err(TracingError::Ratio(ratio));
    }
    Ok(match name.unwrap_or("parentbased_always_on") {
        "always_on" => Sampler::AlwaysOn,
        "always_off" => Sampler::AlwaysOff,
        "traceidratio" => Sampler::TraceIdRatioBased(ratio),
        "" | "parentbased_always_on" => Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
        "parentbased_always_off" => Sampler::ParentBased(Box::new(Sampler::AlwaysOff)),
        "parentbased_traceidratio" => {
            Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio)))
        }
        other => return Err(TracingError::Sampler(other.to_owned())),
    })
}

/// One tracer per service, chosen by the crate that made the span (the
/// `target` attribute tracing-opentelemetry adds): a single layer then
/// serves three services in one process, each span under its own
/// service's resource.
#[derive(Clone)]
struct RoutedTracer {
    routes: Arc<[(&'static str, SdkTracer)]>,
}

impl opentelemetry::trace::Tracer for RoutedTracer {
    type Span = opentelemetry_sdk::trace::Span;

    fn build_with_context(
        &self,
        builder: opentelemetry::trace::SpanBuilder,
        parent_cx: &opentelemetry::Context,
    ) -> Self::Span {
        let target = builder
            .attributes
            .iter()
            .flatten()
            .find(|kv| kv.key.as_str() == "target")
            .map(|kv| kv.value.as_str());
        let tracer = target
            .and_then(|t| {
                let krate = crate_of(&t).to_owned();
                self.routes.iter().find(|(name, _)| *name == krate)
            })
            .or_else(|| self.routes.first())
            .map(|(_, tracer)| tracer)
            .expect("Tracing::start makes at least one route");
        tracer.build_with_context(builder, parent_cx)
    }
}

fn env_filter(default_filter: &str) -> tracing_subscriber::EnvFilter {
    tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter))
}

fn ansi() -> bool {
    colour_logs(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    )
}

/// Whether logs get colours: on a terminal, unless `NO_COLOR` is set to
/// anything but the empty string (<https://no-color.org>).
fn colour_logs(stderr_is_terminal: bool, no_color: Option<&OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// Serves `GET /metrics` (Prometheus text format) from `registry` until `shutdown`.
pub async fn serve_metrics(
    listener: TcpListener,
    registry: Arc<Registry>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    serve_metrics_and_probes(listener, registry, None, shutdown).await
}

/// Serves `GET /metrics` and, with `ready`, the probes `GET /healthz` (200
/// while the process serves HTTP at all) and `GET /readyz` (200 while `ready`
/// holds true, 503 otherwise), until `shutdown`.
///
/// The probes share the metrics listener so that an orchestrator needs no
/// second port; they answer plain text for a human with `curl`.
pub async fn serve_metrics_and_probes(
    listener: TcpListener,
    registry: Arc<Registry>,
    ready: Option<watch::Receiver<bool>>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let mut app = Router::new()
        .route("/metrics", get(render))
        .with_state(registry);
    if let Some(ready) = ready {
        app = app.merge(
            Router::new()
                .route("/healthz", get(|| async { "ok\n" }))
                .route("/readyz", get(readyz))
                .with_state(ready),
        );
    }
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

/// Binds `addr` and serves metrics in the background; returns the bound address.
pub async fn spawn_metrics(
    addr: SocketAddr,
    registry: Arc<Registry>,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    spawn_metrics_and_probes(addr, registry, None, shutdown).await
}

/// [`spawn_metrics`] with the probes of [`serve_metrics_and_probes`].
pub async fn spawn_metrics_and_probes(
    addr: SocketAddr,
    registry: Arc<Registry>,
    ready: Option<watch::Receiver<bool>>,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = serve_metrics_and_probes(listener, registry, ready, shutdown).await {
            tracing::warn!(error = %e, "metrics endpoint stopped");
        }
    });
    Ok(local)
}

async fn readyz(State(ready): State<watch::Receiver<bool>>) -> impl IntoResponse {
    if *ready.borrow() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

/// Why `/metrics` could not be served.
#[derive(Debug, thiserror::Error)]
#[error("cannot serve metrics on {addr}: {source}")]
pub struct MetricsError {
    addr: SocketAddr,
    source: std::io::Error,
}

/// What every service binary does with its `--metrics-listen` flag: nothing
/// without an address, else serve `registry` there in the background and log
/// where. Returns the bound address.
pub async fn serve_metrics_flag(
    addr: Option<SocketAddr>,
    registry: Registry,
    shutdown: CancellationToken,
) -> Result<Option<SocketAddr>, MetricsError> {
    serve_metrics_flag_with_probes(addr, registry, None, shutdown).await
}

/// [`serve_metrics_flag`] that also serves `/healthz` and `/readyz` (see
/// [`serve_metrics_and_probes`]) when `ready` is given.
pub async fn serve_metrics_flag_with_probes(
    addr: Option<SocketAddr>,
    registry: Registry,
    ready: Option<watch::Receiver<bool>>,
    shutdown: CancellationToken,
) -> Result<Option<SocketAddr>, MetricsError> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    let probes = ready.is_some();
    let bound = spawn_metrics_and_probes(addr, Arc::new(registry), ready, shutdown)
        .await
        .map_err(|source| MetricsError { addr, source })?;
    if probes {
        tracing::info!(addr = %bound, "metrics at /metrics, probes at /healthz and /readyz");
    } else {
        tracing::info!(addr = %bound, "metrics at /metrics");
    }
    Ok(Some(bound))
}

async fn render(State(registry): State<Arc<Registry>>) -> impl IntoResponse {
    let mut body = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut body, &registry) {
        tracing::warn!(error = %e, "cannot encode metrics");
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samplers_are_the_standard_names() {
        assert!(matches!(sampler(None, None), Ok(Sampler::ParentBased(_))));
        assert!(matches!(
            sampler(Some("traceidratio"), Some(0.25)),
            Ok(Sampler::TraceIdRatioBased(r)) if r == 0.25
        ));
        assert!(matches!(
            sampler(Some("always_off"), None),
            Ok(Sampler::AlwaysOff)
        ));
        assert!(matches!(
            sampler(Some("sometimes"), None),
            Err(TracingError::Sampler(_))
        ));
        assert!(matches!(
            sampler(Some("traceidratio"), Some(1.5)),
            Err(TracingError::Ratio(_))
        ));
    }

    #[tokio::test]
    async fn without_an_endpoint_tracing_is_off() {
        let off = Tracing::start(&OtlpArgs::default(), &[]).unwrap();
        assert!(off.is_none());
        let empty = OtlpArgs {
            otlp_endpoint: Some(String::new()),
            ..OtlpArgs::default()
        };
        assert!(Tracing::start(&empty, &[]).unwrap().is_none());
    }

    #[test]
    fn spans_are_routed_by_the_crate_that_made_them() {
        assert_eq!(crate_of("session_svc::service::chat"), "session_svc");
        assert_eq!(crate_of("gateway"), "gateway");
    }

    #[test]
    fn logs_are_coloured_only_on_a_terminal_without_no_color() {
        assert!(colour_logs(true, None));
        assert!(
            !colour_logs(false, None),
            "a file or a pipe gets plain text"
        );
        assert!(!colour_logs(true, Some(OsStr::new("1"))));
        assert!(
            colour_logs(true, Some(OsStr::new(""))),
            "NO_COLOR counts only when it is not empty"
        );
    }
}
