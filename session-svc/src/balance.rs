//! Turns to many inference-svc replicas (one per GPU), each session to the
//! same replica while it is healthy, so the model server's prefix cache
//! keeps the conversation.
//!
//! Borrowed: one tonic [`Channel`] per replica (HTTP/2, reconnects, keep-
//! alive) and tonic-health's client for probes. palaver's own: the endpoint
//! set (a list, or every address of a DNS name re-resolved while running),
//! the rendezvous picker with a load bound, ejection after consecutive
//! failures with health probes to re-admit, and one retry before the first
//! token. tower's p2c balancer (and tonic's `balance_channel`) picks by
//! load alone, which would scatter a session over every server's cache.
//!
//! ```text
//! turn(key) ─► replicas ranked by hash(key, replica) ─► first that is admitted
//!              and not far above the mean load ─► on UNAVAILABLE before any
//!              token: the next one, once
//! ```

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use palaver_core::auth::Channel;
use palaver_proto::inference::v1::inference_client::InferenceClient;
use palaver_proto::inference::v1::{GenerateChunk, GenerateReply, GenerateRequest};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio_util::sync::{CancellationToken, DropGuard};
use tonic::{Code, Response, Status, Streaming};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// The gRPC service whose health inference-svc ties to its model server.
const INFERENCE_SERVICE: &str = "palaver.inference.v1.Inference";

/// Where the replicas are and how they are watched.
#[derive(Debug, Clone, PartialEq)]
pub struct BalanceConfig {
    /// How often a `dns://` name is resolved again.
    pub refresh: Duration,
    /// How often every replica's health is asked.
    pub probe: Duration,
    /// Consecutive failures (transport errors, UNAVAILABLE) that eject a replica.
    pub eject_after: u32,
    /// How a turn's replica is chosen.
    pub policy: Policy,
}

/// How a turn's replica is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Policy {
    /// The session's replica by rendezvous hashing (under the load bound).
    #[default]
    Affinity,
    /// Each turn to the next replica in turn, ignoring the session: only
    /// to measure what affinity is worth.
    RoundRobin,
}

impl Default for BalanceConfig {
    fn default() -> Self {
        Self {
            refresh: Duration::from_secs(5),
            probe: Duration::from_secs(1),
            eject_after: 3,
            policy: Policy::Affinity,
        }
    }
}

/// Flags of the balancer (each also read from the environment).
#[derive(Debug, Clone, clap::Args)]
pub struct BalanceArgs {
    /// How often a `dns://` inference address is resolved again, in
    /// milliseconds (a Kubernetes headless Service's pods come and go).
    #[arg(long, env = "PALAVER_INFERENCE_REFRESH_MS", default_value_t = 5000)]
    pub inference_refresh_ms: u64,

    /// How often each inference replica's gRPC health is checked, in
    /// milliseconds: an ejected replica is re-admitted once it answers
    /// SERVING, a replica answering NOT_SERVING (its model server is down)
    /// is ejected at once.
    #[arg(long, env = "PALAVER_INFERENCE_PROBE_MS", default_value_t = 1000)]
    pub inference_probe_ms: u64,

    /// Consecutive failed calls (connection errors, UNAVAILABLE) after
    /// which an inference replica is ejected until its health check passes.
    #[arg(long, env = "PALAVER_INFERENCE_EJECT_AFTER", default_value_t = 3)]
    pub inference_eject_after: u32,

    /// How a turn's inference replica is chosen: `affinity` (each session
    /// on its own replica, so the model server's prefix cache keeps it) or
    /// `round-robin` (for comparison in benchmarks only).
    #[arg(
        long,
        env = "PALAVER_INFERENCE_POLICY",
        value_enum,
        default_value_t = Policy::Affinity
    )]
    pub inference_policy: Policy,
}

impl BalanceArgs {
    pub fn config(&self) -> BalanceConfig {
        BalanceConfig {
            refresh: Duration::from_millis(self.inference_refresh_ms.max(100)),
            probe: Duration::from_millis(self.inference_probe_ms.max(50)),
            eject_after: self.inference_eject_after.max(1),
            policy: self.inference_policy,
        }
    }
}

/// Why the inference address cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("no address given")]
    Empty,
    #[error("{0:?} is not dns://host:port")]
    BadDns(String),
    #[error("{url:?}: {reason}")]
    BadUrl { url: String, reason: String },
}

/// What `--inference-url` names.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// Fixed URLs, `http://a:50052,http://b:50052`.
    List(Vec<String>),
    /// Every A/AAAA record of `host`, at `port`, over plain HTTP/2.
    Dns { host: String, port: u16 },
}

impl Target {
    pub fn parse(spec: &str) -> Result<Self, TargetError> {
        let spec = spec.trim();
        if let Some(rest) = spec.strip_prefix("dns://") {
            let (host, port) = rest
                .trim_end_matches('/')
                .rsplit_once(':')
                .ok_or_else(|| TargetError::BadDns(spec.into()))?;
            let port = port.parse().map_err(|_| TargetError::BadDns(spec.into()))?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            if host.is_empty() {
                return Err(TargetError::BadDns(spec.into()));
            }
            return Ok(Self::Dns {
                host: host.into(),
                port,
            });
        }
        let urls: Vec<String> = spec
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_owned)
            .collect();
        if urls.is_empty() {
            return Err(TargetError::Empty);
        }
        Ok(Self::List(urls))
    }
}

/// Builds the channel to one replica's URL (TLS, timeouts: the caller's).
pub type MakeChannel = Arc<dyn Fn(&str) -> Result<Channel, String> + Send + Sync>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReplicaLabel {
    replica: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TurnLabel {
    replica: String,
    outcome: &'static str,
}

/// Per-replica metrics, in session-svc's registry.
#[derive(Clone)]
struct Metrics {
    turns: Family<TurnLabel, Counter>,
    failures: Family<ReplicaLabel, Counter>,
    ejected: Family<ReplicaLabel, Gauge>,
    in_flight: Family<ReplicaLabel, Gauge>,
    retries: Counter,
    replicas: Gauge,
}

impl Metrics {
    fn new(registry: &mut Registry) -> Self {
        let m = Self {
            turns: Family::default(),
            failures: Family::default(),
            ejected: Family::default(),
            in_flight: Family::default(),
            retries: Counter::default(),
            replicas: Gauge::default(),
        };
        let r = registry.sub_registry_with_prefix("palaver_session_inference");
        r.register(
            "turns",
            "Generations sent to each inference replica, by outcome (ok, error, retried)",
            m.turns.clone(),
        );
        r.register(
            "failures",
            "Failed calls and health checks that count towards a replica's ejection",
            m.failures.clone(),
        );
        r.register(
            "ejected",
            "1 while an inference replica is ejected (skipped until its health check passes)",
            m.ejected.clone(),
        );
        r.register(
            "in_flight",
            "Generations this session-svc has running or queued on each inference replica",
            m.in_flight.clone(),
        );
        r.register(
            "retries",
            "Generations tried again on the next replica after failing before their first token",
            m.retries.clone(),
        );
        r.register(
            "replicas",
            "Inference replicas known (from the list or DNS)",
            m.replicas.clone(),
        );
        m
    }
}

/// One inference-svc replica.
struct Replica {
    url: String,
    /// Hash of the URL, mixed with the session's in the rendezvous score.
    id_hash: u64,
    client: InferenceClient<Channel>,
    health: HealthClient<Channel>,
    in_flight: AtomicUsize,
    failures: AtomicU32,
    /// SERVING answers in a row while ejected.
    serving: AtomicU32,
    ejected: AtomicBool,
    label: ReplicaLabel,
}

/// The replicas and the tasks that keep them current; shared by every clone.
struct Inner {
    replicas: RwLock<Vec<Arc<Replica>>>,
    make_channel: MakeChannel,
    config: BalanceConfig,
    metrics: Metrics,
    /// The next turn's place under [`Policy::RoundRobin`].
    next: AtomicUsize,
    /// Stops the background tasks when the last [`Balancer`] is dropped.
    _stop: DropGuard,
}

/// The inference client session-svc's turns use: [`Balancer::generate`] and
/// [`Balancer::generate_stream`] stand in for `InferenceClient`'s. Cheap to
/// clone.
#[derive(Clone)]
pub struct Balancer {
    inner: Arc<Inner>,
}

impl Balancer {
    /// A balancer over `target`. A list is used at once; a DNS name once
    /// first resolved (within moments). Must be called within a Tokio
    /// runtime: the resolver and the health probes run in the background
    /// until the last clone is dropped.
    pub fn new(
        target: Target,
        config: BalanceConfig,
        make_channel: MakeChannel,
        registry: &mut Registry,
    ) -> Result<Self, TargetError> {
        let stop = CancellationToken::new();
        let inner = Arc::new(Inner {
            replicas: RwLock::new(Vec::new()),
            make_channel,
            config,
            metrics: Metrics::new(registry),
            next: AtomicUsize::new(0),
            _stop: stop.clone().drop_guard(),
        });
        let this = Self { inner };
        match &target {
            Target::List(urls) => this.set_endpoints(urls)?,
            Target::Dns { host, port } => {
                tokio::spawn(resolve_loop(
                    Arc::downgrade(&this.inner),
                    host.clone(),
                    *port,
                    stop.clone(),
                ));
            }
        }
        tokio::spawn(probe_loop(Arc::downgrade(&this.inner), stop));
        Ok(this)
    }

    /// Replaces the set of replicas; those already known keep their
    /// connection and state. What the DNS resolver calls, and tests.
    pub fn set_endpoints(&self, urls: &[String]) -> Result<(), TargetError> {
        let mut channels = BTreeMap::new();
        let current: Vec<Arc<Replica>> = read(&self.inner.replicas).clone();
        for url in urls {
            if channels.contains_key(url) {
                continue;
            }
            if let Some(r) = current.iter().find(|r| &r.url == url) {
                channels.insert(url.clone(), r.clone());
                continue;
            }
            let channel = (self.inner.make_channel)(url).map_err(|reason| TargetError::BadUrl {
                url: url.clone(),
                reason,
            })?;
            let label = ReplicaLabel {
                replica: url.clone(),
            };
            self.inner.metrics.ejected.get_or_create(&label).set(0);
            channels.insert(
                url.clone(),
                Arc::new(Replica {
                    url: url.clone(),
                    id_hash: fnv1a(url.as_bytes()),
                    client: InferenceClient::new(channel.clone()),
                    health: HealthClient::new(channel),
                    in_flight: AtomicUsize::new(0),
                    failures: AtomicU32::new(0),
                    serving: AtomicU32::new(0),
                    ejected: AtomicBool::new(false),
                    label,
                }),
            );
        }
        let next: Vec<Arc<Replica>> = channels.into_values().collect();
        let added: Vec<&str> = next
            .iter()
            .filter(|r| !current.iter().any(|c| c.url == r.url))
            .map(|r| r.url.as_str())
            .collect();
        let removed: Vec<&str> = current
            .iter()
            .filter(|c| !next.iter().any(|r| r.url == c.url))
            .map(|c| c.url.as_str())
            .collect();
        if !added.is_empty() || !removed.is_empty() {
            tracing::info!(?added, ?removed, "inference replicas changed");
        }
        for gone in &removed {
            let label = ReplicaLabel {
                replica: (*gone).to_owned(),
            };
            self.inner.metrics.ejected.remove(&label);
            self.inner.metrics.in_flight.remove(&label);
        }
        self.inner
            .metrics
            .replicas
            .set(i64::try_from(next.len()).unwrap_or(i64::MAX));
        *write(&self.inner.replicas) = next;
        Ok(())
    }

    /// The replica URLs in the order a turn of `key` tries them now
    /// (admitted and not overloaded first). For tests and tools.
    pub fn route(&self, key: &str) -> Vec<String> {
        self.inner
            .candidates(key)
            .into_iter()
            .map(|r| r.url.clone())
            .collect()
    }

    /// URLs of the replicas currently ejected.
    pub fn ejected(&self) -> Vec<String> {
        read(&self.inner.replicas)
            .iter()
            .filter(|r| r.ejected.load(Ordering::SeqCst))
            .map(|r| r.url.clone())
            .collect()
    }

    /// A unary generation on the session's replica; tried once more on the
    /// next one if the first could not start it.
    pub async fn generate(
        &self,
        mut request: GenerateRequest,
    ) -> Result<Response<GenerateReply>, Status> {
        let candidates = self.inner.candidates(&request.affinity_key);
        let tries = candidates.len().min(2);
        let mut last = Status::unavailable("no inference replica is known yet");
        for (attempt, replica) in candidates.iter().take(tries).enumerate() {
            if attempt > 0 {
                self.inner.metrics.retries.inc();
            }
            let _busy = InFlight::enter(&self.inner.metrics, replica);
            // The history is copied only while another attempt may need it.
            let this_try = if attempt + 1 < tries {
                request.clone()
            } else {
                std::mem::take(&mut request)
            };
            let result = replica
                .client
                .clone()
                .generate(this_try)
                .await
                .map_err(from_replica);
            match result {
                Ok(reply) => {
                    self.inner.succeeded(replica);
                    return Ok(reply);
                }
                // A unary reply gives the caller nothing before it ends, so
                // any failure to start is safe to try elsewhere.
                Err(s) if retryable(&s) && attempt == 0 && candidates.len() > 1 => {
                    self.inner.failed(replica, &s, "retried");
                    last = s;
                }
                Err(s) => {
                    self.inner.failed(replica, &s, "error");
                    return Err(s);
                }
            }
        }
        Err(last)
    }

    /// A streamed generation on the session's replica. If it fails before
    /// its first token (connection refused, replica or model server down,
    /// its queue full), it is started again on the next replica, once.
    pub async fn generate_stream(
        &self,
        request: GenerateRequest,
    ) -> Result<Response<BalancedStream>, Status> {
        let candidates = self.inner.candidates(&request.affinity_key);
        let mut stream = BalancedStream {
            inner: self.inner.clone(),
            candidates,
            attempt: 0,
            request,
            current: None,
            started: false,
        };
        stream.open().await?;
        Ok(Response::new(stream))
    }
}

impl Inner {
    /// Every replica, best first for `key`: rendezvous order among the
    /// admitted ones under the load bound, then the admitted ones over it,
    /// then the ejected (a last resort when nothing else is left).
    fn candidates(&self, key: &str) -> Vec<Arc<Replica>> {
        let replicas = read(&self.replicas).clone();
        let key_hash = fnv1a(key.as_bytes());
        let admitted: Vec<&Arc<Replica>> = replicas
            .iter()
            .filter(|r| !r.ejected.load(Ordering::SeqCst))
            .collect();
        let total: usize = admitted
            .iter()
            .map(|r| r.in_flight.load(Ordering::SeqCst))
            .sum();
        let bound = load_bound(total, admitted.len());
        if self.config.policy == Policy::RoundRobin {
            let n = replicas.len().max(1);
            let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
            let mut order: Vec<Arc<Replica>> = replicas[start..]
                .iter()
                .chain(&replicas[..start])
                .cloned()
                .collect();
            order.sort_by_key(|r| r.ejected.load(Ordering::SeqCst));
            return order;
        }
        let mut ranked: Vec<(u8, u64, Arc<Replica>)> = replicas
            .iter()
            .map(|r| {
                let tier = if r.ejected.load(Ordering::SeqCst) {
                    2
                } else if r.in_flight.load(Ordering::SeqCst) >= bound {
                    1
                } else {
                    0
                };
                // Highest score first.
                (tier, u64::MAX - score(key_hash, r.id_hash), r.clone())
            })
            .collect();
        ranked.sort_by_key(|(tier, s, _)| (*tier, *s));
        if tracing::enabled!(tracing::Level::DEBUG) {
            let best = replicas.iter().max_by_key(|r| score(key_hash, r.id_hash));
            if let (Some(best), Some((_, _, chosen))) = (best, ranked.first()) {
                if !Arc::ptr_eq(best, chosen) {
                    tracing::debug!(key, best = %best.url, chosen = %chosen.url, bound, "session placed off its replica");
                }
            }
        }
        ranked.into_iter().map(|(_, _, r)| r).collect()
    }

    fn succeeded(&self, replica: &Replica) {
        replica.failures.store(0, Ordering::SeqCst);
        self.count(replica, "ok");
    }

    fn count(&self, replica: &Replica, outcome: &'static str) {
        self.metrics
            .turns
            .get_or_create(&TurnLabel {
                replica: replica.url.clone(),
                outcome,
            })
            .inc();
    }

    /// Counts the call's outcome; a failure of the replica (not of the
    /// request) counts towards ejecting it.
    fn failed(&self, replica: &Replica, status: &Status, outcome: &'static str) {
        self.count(replica, outcome);
        if outcome == "retried" {
            tracing::info!(replica = %replica.url, error = %status, "generation failed before its first token: trying the next replica");
        }
        if is_replica_failure(status) {
            self.strike(replica, &status.to_string());
        } else {
            replica.failures.store(0, Ordering::SeqCst);
        }
    }

    /// One failure of `replica`; enough of them in a row eject it.
    fn strike(&self, replica: &Replica, why: &str) {
        self.metrics.failures.get_or_create(&replica.label).inc();
        let n = replica.failures.fetch_add(1, Ordering::SeqCst) + 1;
        if n >= self.config.eject_after {
            self.eject(replica, why);
        }
    }

    fn eject(&self, replica: &Replica, why: &str) {
        replica.serving.store(0, Ordering::SeqCst);
        if !replica.ejected.swap(true, Ordering::SeqCst) {
            tracing::warn!(replica = %replica.url, reason = why, "inference replica ejected");
            self.metrics.ejected.get_or_create(&replica.label).set(1);
        }
    }

    /// After a SERVING answer. An ejected replica needs two in a row: its
    /// own check of its model server may not have caught up yet with what
    /// the failed calls showed.
    fn readmit(&self, replica: &Replica) {
        if !replica.ejected.load(Ordering::SeqCst) {
            return;
        }
        if replica.serving.fetch_add(1, Ordering::SeqCst) + 1 < 2 {
            return;
        }
        replica.failures.store(0, Ordering::SeqCst);
        if replica.ejected.swap(false, Ordering::SeqCst) {
            tracing::info!(replica = %replica.url, "inference replica healthy again: re-admitted");
            self.metrics.ejected.get_or_create(&replica.label).set(0);
        }
    }

    /// Asks one replica's health; NOT_SERVING ejects it at once (it says
    /// so itself), no answer counts as one failure, SERVING re-admits it.
    async fn probe(&self, replica: &Replica) {
        let mut health = replica.health.clone();
        let ask = health.check(HealthCheckRequest {
            service: INFERENCE_SERVICE.into(),
        });
        match tokio::time::timeout(self.config.probe.max(Duration::from_millis(500)), ask).await {
            Ok(Ok(reply)) if reply.get_ref().status == ServingStatus::Serving as i32 => {
                self.readmit(replica);
            }
            Ok(Ok(_)) => self.eject(replica, "health check: not serving"),
            Ok(Err(s)) if replica.ejected.load(Ordering::SeqCst) => {
                replica.serving.store(0, Ordering::SeqCst);
                tracing::debug!(replica = %replica.url, error = %s, "ejected replica still fails its health check");
            }
            Ok(Err(s)) => self.strike(replica, &format!("health check: {s}")),
            Err(_) if replica.ejected.load(Ordering::SeqCst) => {
                replica.serving.store(0, Ordering::SeqCst);
            }
            Err(_) => self.strike(replica, "health check timed out"),
        }
    }
}

/// A replica is skipped while it has this many generations in flight
/// (running or queued) or more: 1.5 × the mean of the admitted replicas
/// (counting the one being placed) plus 16. The 16 is one GPU's batch of 8
/// running and one batch waiting: a session is moved only once its own
/// replica would make it wait more than about one extra generation, which
/// costs more than re-reading its history elsewhere; the 1.5 × keeps the
/// bound proportional when every replica is busy. A replica that merely has
/// more sessions than its share by chance keeps them.
pub fn load_bound(total_in_flight: usize, admitted: usize) -> usize {
    let mean = (total_in_flight + 1) as f64 / admitted.max(1) as f64;
    (1.5 * mean).ceil() as usize + 16
}

/// A failure of the call itself rather than an answer of the replica's, as
/// UNAVAILABLE: CANCELLED (its server reset the stream, e.g. while it shut
/// down; this caller did not cancel, and the turn's code takes CANCELLED to
/// mean its own caller left, which would end the turn without a reply), and
/// UNKNOWN or INTERNAL raised by the HTTP/2 transport (a connection closed
/// mid-call), which tonic marks with the transport error as their source.
/// A status the replica sent has no source and is kept as it is.
fn from_replica(status: Status) -> Status {
    let transport = std::error::Error::source(&status).is_some()
        && matches!(status.code(), Code::Unknown | Code::Internal);
    if status.code() == Code::Cancelled || transport {
        Status::unavailable(format!(
            "the call to the inference replica broke off: {}",
            status.message()
        ))
    } else {
        status
    }
}

/// Whether a failure may be tried on another replica: it happened before
/// the generation started (connection refused or reset, replica or model
/// server unavailable, its queue full). Other codes are the request's own
/// (bad input, deadline) and would fail anywhere.
fn retryable(status: &Status) -> bool {
    matches!(status.code(), Code::Unavailable | Code::ResourceExhausted)
}

/// Whether a failure says the replica is unwell (rather than busy or the
/// request bad).
fn is_replica_failure(status: &Status) -> bool {
    status.code() == Code::Unavailable
}

/// Counts a generation on a replica until dropped.
struct InFlight {
    replica: Arc<Replica>,
    gauge: Gauge,
}

impl InFlight {
    fn enter(metrics: &Metrics, replica: &Arc<Replica>) -> Self {
        replica.in_flight.fetch_add(1, Ordering::SeqCst);
        let gauge = metrics.in_flight.get_or_create(&replica.label).clone();
        gauge.inc();
        Self {
            replica: replica.clone(),
            gauge,
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.replica.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.gauge.dec();
    }
}

/// A streamed generation that may restart once on another replica until its
/// first token; read it with [`BalancedStream::message`] as tonic's
/// `Streaming`.
pub struct BalancedStream {
    inner: Arc<Inner>,
    candidates: Vec<Arc<Replica>>,
    attempt: usize,
    request: GenerateRequest,
    current: Option<(Streaming<GenerateChunk>, InFlight)>,
    /// A token reached the caller: from here on a failure is final.
    started: bool,
}

impl BalancedStream {
    /// Starts the generation on the current candidate, or on the next one
    /// if that fails in a way another replica may not.
    async fn open(&mut self) -> Result<(), Status> {
        loop {
            let Some(replica) = self.candidates.get(self.attempt).cloned() else {
                return Err(Status::unavailable("no inference replica is known yet"));
            };
            if self.attempt > 0 {
                self.inner.metrics.retries.inc();
            }
            let busy = InFlight::enter(&self.inner.metrics, &replica);
            match replica
                .client
                .clone()
                .generate_stream(self.request.clone())
                .await
            {
                Ok(s) => {
                    self.current = Some((s.into_inner(), busy));
                    return Ok(());
                }
                Err(s) => {
                    drop(busy);
                    self.give_up_or_next(&replica, from_replica(s))?;
                }
            }
        }
    }

    /// After a failure on `replica`: `Ok` to try the next replica, else the error.
    fn give_up_or_next(&mut self, replica: &Replica, status: Status) -> Result<(), Status> {
        let again =
            !self.started && retryable(&status) && self.attempt == 0 && self.candidates.len() > 1;
        self.inner
            .failed(replica, &status, if again { "retried" } else { "error" });
        if again {
            self.attempt += 1;
            self.current = None;
            Ok(())
        } else {
            Err(status)
        }
    }

    /// The next chunk, `None` at the end.
    pub async fn message(&mut self) -> Result<Option<GenerateChunk>, Status> {
        loop {
            let Some((stream, _)) = self.current.as_mut() else {
                return Ok(None);
            };
            let replica = self.candidates[self.attempt].clone();
            match stream.message().await {
                Ok(Some(chunk)) => {
                    if !chunk.delta.is_empty() {
                        self.started = true;
                    }
                    return Ok(Some(chunk));
                }
                Ok(None) => {
                    self.current = None;
                    self.inner.succeeded(&replica);
                    return Ok(None);
                }
                Err(s) => {
                    self.give_up_or_next(&replica, from_replica(s))?;
                    self.open().await?;
                }
            }
        }
    }
}

/// Resolves `host` every `refresh` and sets the replicas to its addresses;
/// a failed or empty answer keeps the last set (a DNS hiccup must not drop
/// every replica).
async fn resolve_loop(inner: Weak<Inner>, host: String, port: u16, stop: CancellationToken) {
    let mut ticks = tokio::time::interval(Duration::from_millis(1));
    let mut first = true;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let Some(strong) = inner.upgrade() else {
            return;
        };
        if first {
            ticks = tokio::time::interval(strong.config.refresh);
            ticks.tick().await;
            first = false;
        }
        let balancer = Balancer { inner: strong };
        match tokio::net::lookup_host((host.as_str(), port)).await {
            Ok(addrs) => {
                let urls = urls_of(addrs);
                if urls.is_empty() {
                    tracing::warn!(%host, "inference DNS name has no address; keeping the last set");
                } else if let Err(e) = balancer.set_endpoints(&urls) {
                    tracing::warn!(error = %e, "cannot use a resolved inference address");
                }
            }
            Err(e) => {
                tracing::warn!(%host, error = %e, "cannot resolve the inference DNS name; keeping the last set")
            }
        }
    }
}

/// `http://` URLs of resolved addresses, each once, in a stable order.
fn urls_of(addrs: impl Iterator<Item = SocketAddr>) -> Vec<String> {
    let set: HashSet<SocketAddr> = addrs.collect();
    let mut urls: Vec<String> = set.into_iter().map(|a| format!("http://{a}")).collect();
    urls.sort();
    urls
}

/// Probes every replica every `probe` interval.
async fn probe_loop(inner: Weak<Inner>, stop: CancellationToken) {
    let Some(interval) = inner.upgrade().map(|i| i.config.probe) else {
        return;
    };
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let replicas = read(&strong.replicas).clone();
        futures::future::join_all(replicas.iter().map(|r| strong.probe(r))).await;
    }
}

/// FNV-1a: a hash every session-svc replica (and version) computes alike,
/// so they all send a session to the same inference replica.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The rendezvous score of a (session, replica) pair: the pair's hashes
/// mixed by splitmix64's finalizer, so that scores of one session on
/// different replicas are independent.
fn score(key_hash: u64, replica_hash: u64) -> u64 {
    let mut z = key_hash ^ replica_hash.rotate_left(32);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Reads a lock even if a panicking thread poisoned it: the data is a list.
fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn top(key: &str, replicas: &[String]) -> String {
        let k = fnv1a(key.as_bytes());
        replicas
            .iter()
            .max_by_key(|r| score(k, fnv1a(r.as_bytes())))
            .unwrap()
            .clone()
    }

    fn urls(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("http://10.0.0.{i}:50052")).collect()
    }

    #[test]
    fn sessions_spread_evenly_and_a_new_replica_takes_about_a_share() {
        let keys: Vec<String> = (0..6000).map(|i| format!("session-{i}")).collect();
        let three = urls(3);
        let mut per = BTreeMap::new();
        for k in &keys {
            *per.entry(top(k, &three)).or_insert(0) += 1;
        }
        for (r, n) in &per {
            assert!((1700..=2300).contains(n), "{r} got {n} of 6000");
        }
        let four = urls(4);
        let moved: Vec<&String> = keys
            .iter()
            .filter(|k| top(k, &three) != top(k, &four))
            .collect();
        // Only sessions that move go to the new replica: 1/4 expected.
        assert!(
            (1250..=1750).contains(&moved.len()),
            "{} moved",
            moved.len()
        );
        assert!(moved.iter().all(|k| top(k, &four) == four[3]));
    }

    #[test]
    fn the_load_bound_leaves_room_for_a_full_batch() {
        assert_eq!(load_bound(0, 1), 18);
        assert_eq!(load_bound(15, 2), 28);
        // 47 on 3 replicas: a mean of 16, so one with 40 is skipped.
        assert_eq!(load_bound(47, 3), 40);
    }

    #[test]
    fn targets() {
        assert_eq!(
            Target::parse("http://a:1, http://b:2").unwrap(),
            Target::List(vec!["http://a:1".into(), "http://b:2".into()])
        );
        assert_eq!(
            Target::parse("dns://inference.palaver.svc:50052").unwrap(),
            Target::Dns {
                host: "inference.palaver.svc".into(),
                port: 50052
            }
        );
        assert!(Target::parse("dns://nohost").is_err());
        assert!(Target::parse(" , ").is_err());
        // What the replica said stays; a broken call becomes retryable.
        assert_eq!(from_replica(Status::internal("bug")).code(), Code::Internal);
        assert_eq!(
            from_replica(Status::cancelled("reset")).code(),
            Code::Unavailable
        );
        let broken = Status::from_error(Box::new(std::io::Error::other("connection closed")));
        assert_eq!(broken.code(), Code::Unknown);
        assert!(retryable(&from_replica(broken)));
        let a: SocketAddr = "10.0.0.2:5".parse().unwrap();
        let b: SocketAddr = "[fd00::1]:5".parse().unwrap();
        assert_eq!(
            urls_of([b, a, b].into_iter()),
            vec!["http://10.0.0.2:5", "http://[fd00::1]:5"]
        );
    }
}
