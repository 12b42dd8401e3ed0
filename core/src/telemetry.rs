//! Logs and metrics.

use std::ffi::OsStr;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::{
    extract::State,
    http::{header, StatusCode},
    response::IntoResponse,
    routing::get,
    Router,
};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

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
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let ansi = colour_logs(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .try_init();
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
