//! session-svc: conversations in Redis, each held only while it changes.
//!
//! A turn holds its session twice, briefly — one swap to append the user
//! message, one to store the reply — and never while the model runs (see
//! [`turn`]). The gRPC surface is `palaver.session.v1.Sessions`, plus health
//! and reflection.
//!
//! ```text
//! gateway / tools ──gRPC──► SessionService ──► TurnEngine (swaps, owners) ──► Store (Redis | memory)
//!                            (validate)  └──────► Balancer ──gRPC──► inference-svc replicas
//! ```

pub mod balance;
pub mod config;
pub mod dialog;
pub mod error;
pub mod keys;
pub mod metrics;
pub mod running;
pub mod service;
pub mod store;
pub mod turn;
pub mod validate;

use std::sync::Arc;

use futures::StreamExt;
use palaver_proto::session::v1::sessions_server::SessionsServer;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;

pub use config::{Config, ListenArgs, SessionArgs};
pub use error::SessionError;
pub use service::SessionService;
pub use store::{MemoryStore, RedisStore, Store};

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("invalid inference url {url:?}: {reason}")]
    InferenceUrl { url: String, reason: String },
    #[error("reflection setup failed: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error(transparent)]
    Transport(#[from] tonic::transport::Error),
}

/// session-svc in traces: its spans, under its `service.name`.
pub const TRACED: palaver_core::telemetry::Service = palaver_core::telemetry::Service {
    target: env!("CARGO_CRATE_NAME"),
    name: "session-svc",
};

/// The methods a `chat` token may call; `admin` may call all.
pub const CHAT_METHODS: &[&str] = &[
    "/palaver.session.v1.Sessions/Chat",
    "/palaver.session.v1.Sessions/ChatStream",
    "/palaver.session.v1.Sessions/GetHistory",
];

/// How the gRPC server is protected (one definition for both services).
pub use palaver_core::auth::Security;

/// A session-svc instance, ready to serve.
pub struct Server<S: Store> {
    service: SessionService<S>,
    /// For the heartbeat that tells other replicas this one's turns live.
    turns: Arc<turn::TurnEngine<S>>,
    /// The inference replicas' balancer (shared with the service).
    inference: balance::Balancer,
}

const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);
const KEEP_ALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);
const KEEP_ALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

impl<S: Store> Server<S> {
    /// Builds the service over `store`; the connection to inference-svc is
    /// made lazily, so start order does not matter.
    pub fn new(config: Config, store: S, registry: &mut Registry) -> Result<Self, ServeError> {
        // One channel per inference replica, made lazily, over TLS for an
        // https:// URL and carrying the token. Bounded connects and HTTP/2
        // keep-alive, as the gateway's channel has: a dead inference-svc is
        // noticed in seconds, not at the OS's TCP timeout.
        let (tls, token) = (config.inference_tls.clone(), config.inference_token.clone());
        let make_channel: balance::MakeChannel = Arc::new(move |url: &str| {
            let channel = tls
                .endpoint(url)
                .map_err(|e| e.to_string())?
                .tcp_nodelay(true)
                .connect_timeout(CONNECT_TIMEOUT)
                .http2_keep_alive_interval(KEEP_ALIVE_INTERVAL)
                .keep_alive_timeout(KEEP_ALIVE_TIMEOUT)
                .keep_alive_while_idle(true)
                .connect_lazy();
            Ok(tonic::service::interceptor::InterceptedService::new(
                channel,
                token.clone(),
            ))
        });
        let inference = balance::Target::parse(&config.inference_url)
            .and_then(|t| balance::Balancer::new(t, config.balance.clone(), make_channel, registry))
            .map_err(|e| ServeError::InferenceUrl {
                url: config.inference_url.clone(),
                reason: e.to_string(),
            })?;
        let metrics = Arc::new(metrics::Metrics::new(registry));
        let turns = Arc::new(turn::TurnEngine::new(
            store,
            config.projects,
            config.lock,
            metrics,
        ));
        Ok(Self {
            service: SessionService::new(turns.clone(), inference.clone()),
            turns,
            inference,
        })
    }

    /// The balancer over inference-svc replicas: what tests use to change
    /// the replica set or see which are ejected.
    pub fn balancer(&self) -> balance::Balancer {
        self.inference.clone()
    }

    /// Serves gRPC on `listener` until `shutdown`, then reports NOT_SERVING,
    /// stops accepting and waits for in-flight turns to finish.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), ServeError> {
        self.serve_secured(listener, Security::default(), shutdown)
            .await
    }

    /// As [`serve`](Self::serve), with TLS and bearer tokens.
    pub async fn serve_secured(
        self,
        listener: TcpListener,
        security: Security,
        shutdown: CancellationToken,
    ) -> Result<(), ServeError> {
        let beating = CancellationToken::new();
        let heartbeat = {
            let (turns, beating) = (self.turns.clone(), beating.clone());
            tokio::spawn(async move { turns.heartbeat(beating).await })
        };
        let _stop_beating = beating.drop_guard();
        let (reporter, health) = tonic_health::server::health_reporter();
        reporter
            .set_serving::<SessionsServer<SessionService<S>>>()
            .await;
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(palaver_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()?;
        let incoming = TcpListenerStream::new(listener).map(|conn| {
            let conn = conn?;
            // Small request/response messages: do not let Nagle delay them.
            conn.set_nodelay(true)?;
            Ok::<_, std::io::Error>(conn)
        });
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = security.tls {
            builder = builder.tls_config(tls)?;
        }
        builder
            .layer(security.auth)
            .layer(palaver_core::trace_context::TraceContextLayer)
            .add_service(health)
            .add_service(reflection)
            .add_service(SessionsServer::new(self.service))
            .serve_with_incoming_shutdown(incoming, async move {
                shutdown.cancelled().await;
                reporter
                    .set_not_serving::<SessionsServer<SessionService<S>>>()
                    .await;
                tracing::info!("session-svc draining in-flight turns");
            })
            .await?;
        // Beats until the last turn is drained, so that none is taken over.
        drop(_stop_beating);
        let _ = heartbeat.await;
        Ok(())
    }
}
