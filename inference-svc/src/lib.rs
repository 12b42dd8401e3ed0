//! inference-svc: the gRPC `palaver.inference.v1.Inference` service in front
//! of vLLM (or the built-in simulator).
//!
//! At most `max_concurrent` generations (8) run at once; the admission limit
//! sits on the outbound call (a tower layer), so health checks and
//! reflection are never queued behind generations. Start it in-process with
//! [`Server::new`] and [`Server::serve`] on any listener, port 0 included.
//!
//! Modules, one concept each: [`config`], [`error`], [`backend`] (the vLLM
//! client, the simulator, SSE and `<think>` handling), [`limit`] (admission)
//! and [`fair_queue`] (who gets a freed slot),
//! [`service`] (the gRPC surface), [`metrics`].

pub mod backend;
pub mod config;
pub mod error;
pub mod fair_queue;
pub mod limit;
pub mod metrics;
pub mod service;

use std::time::Duration;

use palaver_proto::inference::v1::inference_server::InferenceServer;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tower::ServiceBuilder;

pub use config::{BackendKind, Config, InferenceArgs};
pub use error::InferenceError;

use backend::Backend;
use limit::AdmissionLayer;
use metrics::Metrics;
use service::InferenceService;

/// HTTP/2 pings to idle clients, so a client that vanished without closing
/// its connection is noticed and its generation aborted.
const HTTP2_KEEPALIVE: Duration = Duration::from_secs(20);

/// inference-svc in traces: its spans, under its `service.name`.
pub const TRACED: palaver_core::telemetry::Service = palaver_core::telemetry::Service {
    target: env!("CARGO_CRATE_NAME"),
    name: "inference-svc",
};

/// The methods a `chat` token may call (all of inference-svc's);
/// `admin` may call all.
pub const CHAT_METHODS: &[&str] = &[
    "/palaver.inference.v1.Inference/Generate",
    "/palaver.inference.v1.Inference/GenerateStream",
];

/// How the gRPC server is protected (one definition for both services).
pub use palaver_core::auth::Security;

/// A configured inference-svc, ready to serve.
pub struct Server {
    routes: Routes,
    health: tonic_health::server::HealthReporter,
    /// For the model server's health check.
    backend: Backend,
    model_health_interval: Duration,
}

impl Server {
    /// Builds the backend and the service stack; registers metrics into
    /// `registry`. Fails on a configuration that cannot work.
    pub fn new(config: Config, registry: &mut Registry) -> Result<Self, InferenceError> {
        config.validate()?;
        let metrics = Metrics::register(registry);
        let backend = Backend::from_config(&config)?;
        let stack = ServiceBuilder::new()
            // Admission: `max_concurrent` generations hold a slot until their
            // last chunk; up to `max_queue` callers wait `queue_timeout`, and
            // a freed slot goes to the client running the fewest.
            .layer(AdmissionLayer::new(
                config.max_concurrent,
                config.max_queue,
                config.queue_timeout,
                config.fair_share,
                metrics.clone(),
            ))
            // The backend: vLLM over HTTP (with its own timeouts) or the simulator.
            .service(backend.clone());
        let inference = InferenceServer::new(InferenceService::new(
            stack,
            metrics,
            config.max_tokens_limit,
        ));

        let (health, health_service) = tonic_health::server::health_reporter();
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(palaver_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| InferenceError::Config(format!("cannot build server reflection: {e}")))?;
        let routes = Routes::new(inference)
            .add_service(health_service)
            .add_service(reflection);
        match &config.backend {
            BackendKind::OpenAi { url } => tracing::info!(
                %url,
                max_concurrent = config.max_concurrent,
                max_queue = config.max_queue,
                fair_share = config.fair_share,
                "inference backend: openai-compatible server"
            ),
            BackendKind::Sim => tracing::info!(
                max_concurrent = config.max_concurrent,
                "inference backend: simulator (no model)"
            ),
        }
        Ok(Self {
            routes,
            health,
            backend,
            model_health_interval: config.model_health_interval,
        })
    }

    /// Serves gRPC on `listener` until `shutdown` is cancelled; then reports
    /// NOT_SERVING, stops accepting and waits for running calls to finish.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), tonic::transport::Error> {
        self.serve_secured(listener, Security::default(), shutdown)
            .await
    }

    /// As [`serve`](Self::serve), with TLS and bearer tokens.
    pub async fn serve_secured(
        self,
        listener: TcpListener,
        security: Security,
        shutdown: CancellationToken,
    ) -> Result<(), tonic::transport::Error> {
        let Self {
            routes,
            health,
            backend,
            model_health_interval,
        } = self;
        health
            .set_serving::<InferenceServer<InferenceService>>()
            .await;
        let checker = tokio::spawn(watch_model_server(
            backend,
            health.clone(),
            model_health_interval,
        ));
        // Small gRPC frames (one per token) should leave at once.
        let incoming = TcpListenerStream::new(listener).map(|conn| {
            if let Ok(stream) = &conn {
                if let Err(e) = stream.set_nodelay(true) {
                    tracing::debug!(error = %e, "cannot disable Nagle on a connection");
                }
            }
            conn
        });
        let signal = async move {
            shutdown.cancelled().await;
            tracing::info!("inference-svc draining");
            // Stopped first, so that it cannot report SERVING after this.
            checker.abort();
            let _ = checker.await;
            health
                .set_not_serving::<InferenceServer<InferenceService>>()
                .await;
            health
                .set_service_status("", tonic_health::ServingStatus::NotServing)
                .await;
        };
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = security.tls {
            builder = builder.tls_config(tls)?;
        }
        builder
            .http2_keepalive_interval(Some(HTTP2_KEEPALIVE))
            .layer(security.auth)
            .layer(palaver_core::trace_context::TraceContextLayer)
            .add_routes(routes)
            .serve_with_incoming_shutdown(incoming, signal)
            .await
    }
}

/// Reports `palaver.inference.v1.Inference` NOT_SERVING while the model
/// server fails its health check and SERVING again once it passes, so that
/// session-svc moves this replica's sessions elsewhere while its GPU is
/// down. The overall status ("") is left alone: it is what the liveness
/// probe reads, and restarting this process would not bring vLLM back.
async fn watch_model_server(
    backend: Backend,
    health: tonic_health::server::HealthReporter,
    interval: Duration,
) {
    let mut serving = true;
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        // A check never outlasts the interval (at least a second, for a
        // busy server's slow answer).
        let ok = backend.healthy(interval.max(Duration::from_secs(1))).await;
        if ok == serving {
            continue;
        }
        serving = ok;
        if ok {
            tracing::info!("model server healthy again: serving");
            health
                .set_serving::<InferenceServer<InferenceService>>()
                .await;
        } else {
            tracing::warn!("model server fails its health check: not serving");
            health
                .set_not_serving::<InferenceServer<InferenceService>>()
                .await;
        }
    }
}
