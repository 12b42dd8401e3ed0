//! session-svc: conversations in Redis under short per-session locks.
//!
//! A turn takes a session's lock twice, briefly — to append the user message
//! and to store the reply — and never while the model runs (see [`turn`]).
//! The gRPC surface is `palaver.session.v1.Sessions`, plus health and
//! reflection.
//!
//! ```text
//! gateway / tools ──gRPC──► SessionService ──► Turns (locks) ──► Store (Redis | memory)
//!                                 └──────gRPC──► inference-svc
//! ```

pub mod config;
pub mod dialog;
pub mod error;
pub mod keys;
pub mod metrics;
pub mod running;
pub mod service;
pub mod store;
pub mod turn;

use std::sync::Arc;

use futures::StreamExt;
use palaver_proto::inference::v1::inference_client::InferenceClient;
use palaver_proto::session::v1::sessions_server::SessionsServer;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Endpoint;

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

/// A session-svc instance, ready to serve.
pub struct Server<S: Store> {
    service: SessionService<S>,
    /// For the heartbeat that tells other replicas this one's turns live.
    turns: Arc<turn::Turns<S>>,
}

const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);
const KEEP_ALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);
const KEEP_ALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

impl<S: Store> Server<S> {
    /// Builds the service over `store`; the connection to inference-svc is
    /// made lazily, so start order does not matter.
    pub fn new(config: Config, store: S, registry: &mut Registry) -> Result<Self, ServeError> {
        let bad_url = |reason: String| ServeError::InferenceUrl {
            url: config.inference_url.clone(),
            reason,
        };
        // Bounded connects and HTTP/2 keep-alive, as the gateway's channel
        // has: a dead inference-svc is noticed in seconds, not at the OS's
        // TCP timeout.
        let channel = Endpoint::from_shared(config.inference_url.clone())
            .map_err(|e| bad_url(e.to_string()))?
            .tcp_nodelay(true)
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(KEEP_ALIVE_INTERVAL)
            .keep_alive_timeout(KEEP_ALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            .connect_lazy();
        let metrics = Arc::new(metrics::Metrics::new(registry));
        let turns = Arc::new(turn::Turns::new(
            store,
            config.projects,
            config.lock,
            metrics,
        ));
        Ok(Self {
            service: SessionService::new(turns.clone(), InferenceClient::new(channel)),
            turns,
        })
    }

    /// Serves gRPC on `listener` until `shutdown`, then reports NOT_SERVING,
    /// stops accepting and waits for in-flight turns to finish.
    pub async fn serve(
        self,
        listener: TcpListener,
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
        tonic::transport::Server::builder()
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
