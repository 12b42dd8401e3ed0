//! palaver's MQTT gateway: reads chat requests that clients publish on
//! `<project>/user_input`, runs each as one `Sessions.Chat` call on
//! session-svc, and publishes the reply as plain text on the client's reply
//! topic. It also serves the control topics (template, clear_history,
//! delete_session) and announces presence on `<project>/status`.
//!
//! The MQTT side is the wire protocol of clients already in the field
//! (DESIGN.md, "MQTT wire protocol"); [`request`], [`control`] and
//! [`errors`] hold its rules as pure functions. Modules:
//! - [`config`]: flags and the plain [`Config`];
//! - [`identity`]: identity binding, a user's own request topic, sessions and replies;
//! - [`topics`], [`publish`]: topic names and the single confined publish path;
//! - [`link`]: one MQTT connection per project (one last will each);
//! - [`mqtt`]: the MQTT client, version 5 or 3.1.1, behind one interface;
//! - [`lease`]: which of several gateways consumes a project;
//! - [`turn`]: one request against session-svc;
//! - [`stream`], [`cancel`]: the opt-in streamed reply, and cancelling a turn;
//! - [`backlog`]: the `max-pending` bound and the shutdown drain;
//! - [`control_rate`]: how often control topics may be used;
//! - [`presence`], [`readiness`], [`metrics`].
//!
//! ```no_run
//! # async fn demo() -> Result<(), gateway::GatewayError> {
//! let mut registry = prometheus_client::registry::Registry::default();
//! let config = gateway::Config::new("127.0.0.1", 1883, "http://127.0.0.1:50051", vec!["general".into()]);
//! let gateway = gateway::Gateway::new(config, &mut registry)?;
//! let ready = gateway.ready();
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! let task = tokio::spawn(gateway.run(shutdown.clone()));
//! assert!(ready.await, "every project subscribed");
//! // ... publish requests ...
//! shutdown.cancel();
//! task.await.expect("gateway task")?;
//! # Ok(()) }
//! ```

#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod ack;
pub mod backlog;
pub mod cancel;
pub mod config;
pub mod control;
pub mod control_rate;
pub mod errors;
pub mod identity;
pub mod lease;
pub mod link;
pub mod metrics;
pub mod mqtt;
pub mod order;
pub mod presence;
pub mod publish;
pub mod readiness;
pub mod request;
pub mod stream;
pub mod topics;
pub mod turn;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use palaver_proto::session::v1::sessions_client::SessionsClient;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinHandle};
use tokio_util::sync::CancellationToken;
use tonic::transport::Endpoint;

pub use config::{Config, ConfigError, GatewayArgs};

/// The gateway in traces: its spans, under its `service.name`.
pub const TRACED: palaver_core::telemetry::Service = palaver_core::telemetry::Service {
    target: env!("CARGO_CRATE_NAME"),
    name: "palaver-gateway",
};

use crate::backlog::Backlog;
use crate::control_rate::ControlRate;
use crate::lease::{ConsumerLease, Standing};
use crate::link::{Link, LinkHandle, Shared};
use crate::metrics::{Metrics, OutKind};
use crate::readiness::Readiness;
use crate::turn::Turns;

/// How long the final "offline" + DISCONNECT of one project may take.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long to wait for connection tasks to finish after the DISCONNECT.
const JOIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Stops everything `Gateway::run` spawned when it goes away.
struct AbortOnDrop {
    tasks: Vec<AbortHandle>,
    abandon: CancellationToken,
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.abandon.cancel();
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Why the gateway cannot start (or stopped badly).
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The settings are unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A connection task panicked (a bug); the others were still shut down.
    #[error("gateway task failed: {0}")]
    Task(String),
}

/// The gateway: build with [`Gateway::new`], then [`Gateway::run`] it.
pub struct Gateway {
    config: Config,
    metrics: Metrics,
    endpoint: Endpoint,
    readiness: Arc<Readiness>,
}

impl Gateway {
    /// Validates `config` and registers the gateway's metrics in `registry`.
    ///
    /// Connects to nothing yet; it need not be called inside a Tokio runtime.
    pub fn new(config: Config, registry: &mut Registry) -> Result<Self, GatewayError> {
        config.validate()?;
        let endpoint = config
            .session_tls
            .endpoint(&config.session_url)
            .map_err(ConfigError::Tls)?
            .connect_timeout(Duration::from_secs(5))
            // Notice a silently dead session-svc between turns.
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true);
        let metrics = Metrics::register(registry);
        let gauges = config
            .projects
            .iter()
            .map(|p| metrics.subscribed(p))
            .collect();
        let readiness = Arc::new(Readiness::new(gauges));
        Ok(Self {
            config,
            metrics,
            endpoint,
            readiness,
        })
    }

    /// The settings in use (with the generated client id, for instance).
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// A flag that is true while every project's connection is subscribed
    /// (SubAck received), false before, during reconnects and after shutdown.
    /// Take it before calling [`Gateway::run`].
    pub fn ready_watch(&self) -> watch::Receiver<bool> {
        self.readiness.watch()
    }

    /// Resolves with `true` once every project is subscribed, or `false` if
    /// the gateway stopped first. Take it before calling [`Gateway::run`].
    pub fn ready(&self) -> impl Future<Output = bool> + Send + 'static {
        let mut rx = self.readiness.watch();
        async move { rx.wait_for(|ready| *ready).await.is_ok() }
    }

    /// Serves until `shutdown` is cancelled, then drains: stops taking new
    /// requests (unsubscribes; late arrivals get "Server is overloaded"),
    /// waits up to `shutdown_grace` for turns in flight so their replies still
    /// go out, publishes "offline" for every project and disconnects.
    ///
    /// Broker or session-svc outages are not errors: the gateway keeps
    /// retrying and answers requests with error replies meanwhile.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), GatewayError> {
        let Gateway {
            config,
            metrics,
            endpoint,
            readiness,
        } = self;
        let sessions =
            SessionsClient::with_interceptor(endpoint.connect_lazy(), config.session_token.clone());
        // Unique per process: the lease tells this gateway from its standbys.
        let holder = format!("{}-{:016x}", config.client_id, rand::random::<u64>());
        let leases: Vec<Option<Arc<ConsumerLease>>> = config
            .projects
            .iter()
            .map(|p| {
                config
                    .consumer_lease
                    .map(|ttl| Arc::new(ConsumerLease::new(sessions.clone(), p, &holder, ttl)))
            })
            .collect();
        let stop_leasing = CancellationToken::new();
        let abandon = CancellationToken::new();
        let closing = CancellationToken::new();
        let draining = CancellationToken::new();
        let shared = Arc::new(Shared {
            backlog: Backlog::new(config.max_pending, &metrics),
            turns: Arc::new(Turns::new(
                sessions,
                config.request_timeout,
                metrics.clone(),
                abandon.clone(),
            )),
            metrics: metrics.clone(),
            readiness: readiness.clone(),
            draining: draining.clone(),
            closing: closing.clone(),
            control_rate: ControlRate::new(config.control_limits),
            config,
        });

        // If `run` itself is dropped (aborted, or lost a `select!`), nothing it
        // started may linger: dropping the connections lets the broker fire
        // the last wills, as for a crash.
        let mut guard = AbortOnDrop {
            tasks: Vec::new(),
            abandon: abandon.clone(),
        };
        let stop_heartbeats = CancellationToken::new();
        let service: Arc<str> = Arc::from(shared.config.service_name.as_str());
        let mut links: Vec<(String, LinkHandle, Vec<String>, JoinHandle<()>)> = Vec::new();
        // Without the lease every project is this gateway's, always.
        let (_always, always_holder) = watch::channel(Standing::Holder);
        for (index, project) in shared.config.projects.iter().enumerate() {
            let (link, handle) = Link::new(shared.clone(), project, index);
            let subscriptions = link.subscriptions();
            let standing = match &leases[index] {
                Some(lease) => {
                    let (lease, stop) = (lease.clone(), stop_leasing.clone());
                    let standing = lease.standing();
                    let keep = tokio::spawn(async move { lease.keep(stop).await });
                    guard.tasks.push(keep.abort_handle());
                    standing
                }
                None => always_holder.clone(),
            };
            let task = tokio::spawn(link.run(standing));
            guard.tasks.push(task.abort_handle());
            let heartbeats = tokio::spawn(presence::heartbeats(
                handle.publisher.clone(),
                service.clone(),
                shared.config.heartbeat,
                handle.connected.clone(),
                stop_heartbeats.clone(),
            ));
            guard.tasks.push(heartbeats.abort_handle());
            links.push((project.clone(), handle, subscriptions, task));
        }
        tracing::info!(
            projects = ?shared.config.projects,
            broker = %format!("{}:{}", shared.config.mqtt_host, shared.config.mqtt_port),
            session_url = %shared.config.session_url,
            shared_group = ?shared.config.shared_group,
            consumer_lease_ms = ?shared.config.consumer_lease.map(|d| d.as_millis()),
            "gateway started"
        );

        shutdown.cancelled().await;
        tracing::info!(pending = shared.backlog.in_use(), "gateway draining");
        draining.cancel();
        readiness.clear();
        // Unsubscribing lets the broker route new requests to other members
        // of a shared group instead of to a gateway that will refuse them.
        // A persistent session (the lease) keeps its subscriptions for the
        // gateway that takes over: requests arriving now wait for it.
        let persistent = shared.config.consumer_lease.is_some();
        for (_, handle, subscriptions, _) in links.iter().filter(|_| !persistent) {
            for topic in subscriptions {
                let queued =
                    tokio::time::timeout(CLOSE_TIMEOUT, handle.client.unsubscribe(topic.clone()))
                        .await;
                if !matches!(queued, Ok(Ok(()))) {
                    tracing::debug!(topic = %topic, "could not queue an unsubscribe");
                }
            }
        }

        let grace = shared.config.shutdown_grace;
        if tokio::time::timeout(grace, shared.backlog.drained())
            .await
            .is_err()
        {
            tracing::warn!(
                abandoned = shared.backlog.in_use(),
                grace_secs = grace.as_secs_f64(),
                "shutdown grace period over; abandoning turns still in flight"
            );
            abandon.cancel();
            // Let abandoned tasks release their permits before going offline.
            let _ = tokio::time::timeout(Duration::from_secs(1), shared.backlog.drained()).await;
        }
        stop_heartbeats.cancel();

        closing.cancel();
        let offline = presence::offline(&shared.config.service_name);
        for (project, handle, _, _) in &links {
            let status = topics::status_topic(project);
            let close = async {
                let _ = handle
                    .publisher
                    .publish(OutKind::Status, &status, offline.clone())
                    .await;
                handle.client.disconnect().await
            };
            if !matches!(tokio::time::timeout(CLOSE_TIMEOUT, close).await, Ok(Ok(()))) {
                tracing::warn!(project = %project, "could not queue the final offline/disconnect");
            }
        }

        let mut failure = None;
        for (project, _, _, mut task) in links {
            match tokio::time::timeout(JOIN_TIMEOUT, &mut task).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::error!(project = %project, error = %e, "connection task failed");
                    failure = Some(GatewayError::Task(format!("{project}: {e}")));
                }
                Err(_) => {
                    tracing::warn!(project = %project, "connection did not close in time; dropping it");
                    task.abort();
                }
            }
        }
        // Only now that nothing of ours is in flight may a standby take over.
        stop_leasing.cancel();
        for lease in leases.iter().flatten() {
            lease.release().await;
        }
        readiness.clear();
        drop(guard);
        tracing::info!("gateway stopped");
        failure.map_or(Ok(()), Err)
    }
}
