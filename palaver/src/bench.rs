//! `palaver bench`: an MQTT load generator speaking the wire protocol of the
//! clients in the field (DESIGN.md).
//!
//! N sessions are spread round-robin over M connections. Each connection
//! subscribes to its own reply space `<p>/assistant_response/+/<clientId>/#`
//! and sends every request with the reference client's reply topic
//! `<p>/assistant_response/<sid>/<clientId>/<requestId>`, so a reply is
//! matched to its request by topic alone, exactly as that client does.
//!
//! - **Closed loop** (default): every session sends its next message as soon
//!   as the reply to the previous one arrived (or timed out).
//! - **Open loop** (`--rate R`): R requests/s in total, on a fixed schedule
//!   whatever the replies do; latency counts from the *scheduled* send time,
//!   so a stalled server cannot hide its queueing (no coordinated omission).
//!
//! The run is a warm-up (requests sent, nothing recorded), then the measured
//! window: what is counted is what *arrives* inside it — answers, error
//! replies by kind, requests that got no reply within `--timeout`. Latency is
//! end to end, from handing the publish to the MQTT client until the reply
//! is read from the socket, and every sample is kept, so percentiles are
//! exact (nearest rank), not bucketed.

use std::collections::{BTreeMap, HashMap};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use gateway::errors::{
    BUSY_TEXT, INTERNAL_TEXT, OVERLOADED_TEXT, RATE_LIMITED_TEXT, TIMEOUT_TEXT, UNAVAILABLE_TEXT,
};
use gateway::topics;
use palaver_core::projects::{ProjectSettings, Projects};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS, SubscribeFilter};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};

use crate::client::{BrokerArgs, ClientError, Target};

/// How often each connection looks for requests past their timeout.
const TIMEOUT_SCAN: Duration = Duration::from_millis(50);
/// How long connecting and subscribing every connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Error kind of a request that got no reply within `--timeout`.
const NO_REPLY: &str = "no_reply";
/// Longest error text used as its own kind (unknown `Error: ...` replies).
const MAX_KIND_CHARS: usize = 100;

/// Flags of `palaver bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub broker: BrokerArgs,

    /// Project to load: the first level of its topics. Its rate limit applies
    /// (the defaults allow 20 messages per minute per session): benchmark a
    /// project with `rate_limit = 0`, e.g. from scripts/bench-projects.toml.
    #[arg(long, default_value = "bench")]
    pub project: String,

    /// Sessions talking at once.
    #[arg(long, default_value_t = 1)]
    pub sessions: usize,

    /// MQTT connections the sessions are spread over [default: one per session].
    #[arg(long)]
    pub connections: Option<usize>,

    /// Length of the measured window, in seconds.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,

    /// Warm-up before the measured window, in seconds (requests sent, nothing recorded).
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,

    /// Size of each message's text, in bytes (ASCII words).
    #[arg(long, default_value_t = 64)]
    pub message_bytes: usize,

    /// Open loop: send this many requests per second in total on a fixed
    /// schedule, whatever the replies do. Default: closed loop.
    #[arg(long)]
    pub rate: Option<f64>,

    /// Seconds to wait for a reply before counting the request as `no_reply`.
    #[arg(long, default_value_t = 30.0)]
    pub timeout: f64,

    /// QoS of the requests (replies come at the gateway's reply QoS).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=2))]
    pub qos: u8,

    /// A name for this run, copied into the output.
    #[arg(long)]
    pub label: Option<String>,

    /// Print the result as one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,

    /// The baseline for palaver's cost: send the same load (closed loop) to
    /// this OpenAI-compatible server's POST /v1/chat/completions, streamed, as
    /// inference-svc sends it, instead of through palaver over MQTT. The
    /// system prompt and sampling are --project's in --projects.
    #[arg(long, value_name = "URL")]
    pub direct_url: Option<String>,

    /// Projects file the direct load (--direct-url) takes --project's system
    /// prompt and sampling from: the file palaver runs with [default: built-in].
    #[arg(long, value_name = "FILE")]
    pub projects: Option<std::path::PathBuf>,

    /// Ask for streamed replies (`"stream": true`) and also report the time
    /// to the first piece on `<replyTopic>/stream` and the pieces per turn.
    #[arg(long, env = "PALAVER_BENCH_STREAM")]
    pub stream: bool,
}

/// Runs the benchmark and prints the result; exit 2 when it could not run.
pub async fn run(args: BenchArgs) -> ExitCode {
    match bench(&args).await {
        Ok(report) => {
            if args.json {
                println!("{}", report.to_json());
            } else {
                println!("{}", report.table());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("palaver bench: {e}");
            ExitCode::from(2)
        }
    }
}

/// A validated plan of one run.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Broker to load.
    pub target: Target,
    /// Project name.
    pub project: String,
    /// Sessions in total.
    pub sessions: usize,
    /// MQTT connections.
    pub connections: usize,
    /// Warm-up length.
    pub warmup: Duration,
    /// Measured window length.
    pub duration: Duration,
    /// Message text size in bytes.
    pub message_bytes: usize,
    /// Open-loop rate in requests/s, or closed loop.
    pub rate: Option<f64>,
    /// Reply timeout.
    pub timeout: Duration,
    /// Request QoS.
    pub qos: QoS,
    /// Run label.
    pub label: Option<String>,
    /// Streamed replies.
    pub stream: bool,
}

fn seconds(what: &str, s: f64) -> Result<Duration, ClientError> {
    if !(0.0..=86_400.0).contains(&s) {
        return Err(ClientError::Connect(format!(
            "--{what} must be a number of seconds within 0..=86400"
        )));
    }
    Ok(Duration::from_secs_f64(s))
}

impl Plan {
    /// Checks the flags.
    pub fn from_args(args: &BenchArgs) -> Result<Self, ClientError> {
        let bad = |m: String| Err(ClientError::Connect(m));
        if args.sessions == 0 {
            return bad("--sessions must be at least 1".into());
        }
        let connections = args.connections.unwrap_or(args.sessions);
        if connections == 0 || connections > args.sessions {
            return bad(format!(
                "--connections must be within 1..={} (the number of sessions)",
                args.sessions
            ));
        }
        if args.project.is_empty() || args.project.contains(['/', '+', '#']) {
            return bad(format!("--project {:?} is not a topic level", args.project));
        }
        if args.message_bytes == 0 {
            return bad("--message-bytes must be at least 1".into());
        }
        if let Some(rate) = args.rate {
            if !(rate.is_finite() && rate > 0.0) {
                return bad("--rate must be above 0 requests per second".into());
            }
        }
        let duration = seconds("duration", args.duration)?;
        if duration.is_zero() {
            return bad("--duration must be above 0".into());
        }
        let timeout = seconds("timeout", args.timeout)?;
        if timeout.is_zero() {
            return bad("--timeout must be above 0".into());
        }
        Ok(Self {
            target: args.broker.target()?,
            project: args.project.clone(),
            sessions: args.sessions,
            connections,
            warmup: seconds("warmup", args.warmup)?,
            duration,
            message_bytes: args.message_bytes,
            rate: args.rate,
            timeout,
            qos: gateway::mqtt::qos(args.qos),
            label: args.label.clone(),
            stream: args.stream,
        })
    }
}

/// The phases of a run, the same for every connection.
#[derive(Debug, Clone, Copy)]
struct Clock {
    start: Instant,
    measure_from: Instant,
    measure_until: Instant,
}

impl Clock {
    fn measured(&self, t: Instant) -> bool {
        t >= self.measure_from && t < self.measure_until
    }
}

/// What one connection counted inside the measured window.
#[derive(Debug, Default)]
struct Tally {
    /// End-to-end latency of every answer, in nanoseconds.
    latencies: Vec<u64>,
    /// Error replies and missing replies, by kind.
    errors: BTreeMap<String, u64>,
    /// Requests sent.
    sent: u64,
    /// Replies that came after their request had timed out.
    late: u64,
    /// Requests still unanswered when the window closed.
    unfinished: u64,
    /// Times the connection to the broker was lost.
    disconnects: u64,
    /// With `--stream`: time to the first piece of every answer, in ns.
    first_piece: Vec<u64>,
    /// With `--stream`: delta pieces of every answer.
    pieces: Vec<u64>,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        self.latencies.extend(other.latencies);
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
        self.sent += other.sent;
        self.late += other.late;
        self.unfinished += other.unfinished;
        self.disconnects += other.disconnects;
        self.first_piece.extend(other.first_piece);
        self.pieces.extend(other.pieces);
    }
}

/// Sorts an error reply the way the gateway produced it: the two strings old
/// clients know, the gateway's fixed texts, else the text itself.
pub fn error_kind(text: &str) -> Option<String> {
    let known = [
        (RATE_LIMITED_TEXT, "rate_limited"),
        (OVERLOADED_TEXT, "overloaded"),
        (TIMEOUT_TEXT, "server_timeout"),
        (UNAVAILABLE_TEXT, "unavailable"),
        (BUSY_TEXT, "busy"),
        (INTERNAL_TEXT, "internal"),
    ];
    if let Some((_, kind)) = known.iter().find(|(t, _)| *t == text) {
        return Some((*kind).to_owned());
    }
    text.starts_with("Error: ")
        .then(|| text.chars().take(MAX_KIND_CHARS).collect())
}

/// A message of about `bytes` bytes of plain words.
fn message_text(bytes: usize) -> String {
    const WORDS: &str =
        "the quick brown fox jumps over the lazy dog and asks the model one more question ";
    let mut text: String = WORDS.chars().cycle().take(bytes).collect();
    // A trailing space would be trimmed away by nobody, but looks odd in logs.
    if text.ends_with(' ') {
        text.pop();
        text.push('?');
    }
    text
}

/// One request waiting for its reply.
struct Pending {
    session: usize,
    /// When it was sent (closed loop) or scheduled (open loop).
    since: Instant,
    /// When its first streamed piece came.
    first_piece: Option<Instant>,
    /// Delta pieces so far.
    pieces: u64,
}

/// One session of a connection.
struct Session {
    id: String,
}

/// One MQTT connection and the sessions it speaks for.
struct Conn {
    plan: Arc<Plan>,
    client_id: String,
    client: AsyncClient,
    eventloop: EventLoop,
    input_topic: String,
    reply_prefix: String,
    message: String,
    sessions: Vec<Session>,
    pending: HashMap<u64, Pending>,
    next_request: u64,
    /// Round-robin position of the open-loop schedule.
    next_session: usize,
    tally: Tally,
}

impl Conn {
    fn new(plan: Arc<Plan>, run_id: &str, index: usize, sessions: Vec<Session>) -> Self {
        let client_id = format!("bench-{run_id}-c{index}");
        let mut opts = MqttOptions::new(
            client_id.clone(),
            plan.target.host.clone(),
            plan.target.port,
        );
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_clean_session(true);
        opts.set_max_packet_size(4 * 1024 * 1024, crate::broker::MAX_PAYLOAD_BYTES);
        // Room for every session's request (twice, for open loop) in flight
        // at once, so the client never throttles the load it is to generate.
        let room = sessions.len().saturating_mul(4).saturating_add(64);
        opts.set_inflight(u16::try_from(room).unwrap_or(u16::MAX));
        if let Some((user, password)) = &plan.target.credentials {
            opts.set_credentials(user.clone(), password.clone());
        }
        let (client, mut eventloop) = AsyncClient::new(opts, room);
        // rumqttc leaves Nagle on; a request written right after the PUBACK
        // of the previous reply would wait for that ACK's ACK (~40 ms with
        // delayed ACKs), which is the generator's delay, not the server's.
        eventloop.network_options.set_tcp_nodelay(true);
        Self {
            input_topic: topics::user_input(&plan.project),
            reply_prefix: topics::reply_prefix(&plan.project),
            message: message_text(plan.message_bytes),
            plan,
            client_id,
            client,
            eventloop,
            sessions,
            pending: HashMap::new(),
            next_request: 0,
            next_session: 0,
            tally: Tally::default(),
        }
    }

    /// Connects and subscribes; then reports ready and waits for the start.
    async fn connect(&mut self) -> Result<(), ClientError> {
        let filter = format!("{}+/{}/#", self.reply_prefix, self.client_id);
        loop {
            match self.eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    self.client
                        .try_subscribe_many([SubscribeFilter::new(
                            filter.clone(),
                            QoS::AtLeastOnce,
                        )])
                        .map_err(|e| ClientError::Connect(format!("cannot subscribe: {e}")))?;
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(e) => {
                    return Err(ClientError::Connect(format!(
                        "cannot connect to {}: {e}",
                        self.plan.target
                    )))
                }
            }
        }
    }

    /// Publishes the next request of `session`, counting from `since`.
    fn send(&mut self, session: usize, since: Instant, clock: &Clock) {
        let id = self.next_request;
        self.next_request += 1;
        let sid = &self.sessions[session].id;
        let request_id = format!("{id:x}");
        let mut payload = json!({
            "message": self.message,
            "sessionId": sid,
            "replyTopic": format!("{}{sid}/{}/{request_id}", self.reply_prefix, self.client_id),
            "clientId": self.client_id,
            "requestId": request_id,
        });
        if self.plan.stream {
            payload["stream"] = Value::Bool(true);
        }
        let body = serde_json::to_vec(&payload).expect("a JSON value serializes");
        let measured = clock.measured(since);
        match self
            .client
            .try_publish(self.input_topic.clone(), self.plan.qos, false, body)
        {
            Ok(()) => {
                self.pending.insert(
                    id,
                    Pending {
                        session,
                        since,
                        first_piece: None,
                        pieces: 0,
                    },
                );
                if measured {
                    self.tally.sent += 1;
                }
            }
            Err(_) => {
                // Only when the client's own queue is full: the generator,
                // not the server, is the bottleneck; say so.
                if measured {
                    *self
                        .tally
                        .errors
                        .entry("generator_queue_full".into())
                        .or_default() += 1;
                }
            }
        }
    }

    /// Matches a delivered message to its request; returns the session whose
    /// request it answered.
    fn on_reply(
        &mut self,
        topic: &str,
        payload: &[u8],
        now: Instant,
        clock: &Clock,
    ) -> Option<usize> {
        if let Some(reply_topic) = topic.strip_suffix("/stream") {
            self.on_piece(reply_topic, payload, now);
            return None;
        }
        let id = request_of(topic)?;
        let Some(pending) = self.pending.remove(&id) else {
            if clock.measured(now) {
                self.tally.late += 1;
            }
            return None;
        };
        if clock.measured(now) {
            let text = String::from_utf8_lossy(payload);
            match error_kind(&text) {
                None => {
                    let nanos = now.saturating_duration_since(pending.since).as_nanos();
                    self.tally
                        .latencies
                        .push(u64::try_from(nanos).unwrap_or(u64::MAX));
                    if let Some(first) = pending.first_piece {
                        let nanos = first.saturating_duration_since(pending.since).as_nanos();
                        self.tally
                            .first_piece
                            .push(u64::try_from(nanos).unwrap_or(u64::MAX));
                        self.tally.pieces.push(pending.pieces);
                    }
                }
                Some(kind) => *self.tally.errors.entry(kind).or_default() += 1,
            }
        }
        Some(pending.session)
    }

    /// Notes a piece of a streamed reply: when the first came, how many.
    fn on_piece(&mut self, reply_topic: &str, payload: &[u8], now: Instant) {
        let Some(pending) = request_of(reply_topic).and_then(|id| self.pending.get_mut(&id)) else {
            return;
        };
        pending.first_piece.get_or_insert(now);
        let piece: Value = serde_json::from_slice(payload).unwrap_or_default();
        if piece.get("delta").is_some() {
            pending.pieces += 1;
        }
    }

    /// Gives up on requests older than the timeout; returns their sessions.
    fn expire(&mut self, now: Instant, clock: &Clock) -> Vec<usize> {
        let timeout = self.plan.timeout;
        let expired: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| now.saturating_duration_since(p.since) >= timeout)
            .map(|(id, _)| *id)
            .collect();
        let mut sessions = Vec::with_capacity(expired.len());
        for id in expired {
            if let Some(p) = self.pending.remove(&id) {
                if clock.measured(now) {
                    *self.tally.errors.entry(NO_REPLY.into()).or_default() += 1;
                }
                sessions.push(p.session);
            }
        }
        sessions
    }

    /// Generates load from `clock.start` until the window closes.
    async fn drive(mut self, mut start: watch::Receiver<Option<Clock>>) -> Tally {
        let clock = match start.wait_for(Option::is_some).await {
            Ok(c) => c.expect("checked"),
            Err(_) => return self.tally,
        };
        let closed_loop = self.plan.rate.is_none();
        // Open loop: this connection's share of the rate, evenly spaced.
        let period = self.plan.rate.map(|rate| {
            Duration::from_secs_f64(self.plan.connections as f64 / rate)
                .max(Duration::from_micros(1))
        });
        let mut schedule =
            tokio::time::interval_at(clock.start, period.unwrap_or(Duration::MAX / 4));
        // Late ticks are sent at once and still measured from their slot.
        schedule.set_missed_tick_behavior(MissedTickBehavior::Burst);
        let mut scan = tokio::time::interval(TIMEOUT_SCAN);
        scan.set_missed_tick_behavior(MissedTickBehavior::Delay);

        tokio::time::sleep_until(clock.start).await;
        if closed_loop {
            let now = Instant::now();
            for s in 0..self.sessions.len() {
                self.send(s, now, &clock);
            }
        }
        let end = tokio::time::sleep_until(clock.measure_until);
        tokio::pin!(end);
        loop {
            tokio::select! {
                // Replies first: they decide latency.
                biased;
                event = self.eventloop.poll() => match event {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let now = Instant::now();
                        if let Some(session) = self.on_reply(&p.topic, &p.payload, now, &clock) {
                            if closed_loop && now < clock.measure_until {
                                self.send(session, Instant::now(), &clock);
                            }
                        }
                    }
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        // Reconnected after a loss: the subscription is gone
                        // with the clean session.
                        let filter = format!("{}+/{}/#", self.reply_prefix, self.client_id);
                        let _ = self.client.try_subscribe_many([SubscribeFilter::new(filter, QoS::AtLeastOnce)]);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        if clock.measured(Instant::now()) {
                            self.tally.disconnects += 1;
                        }
                        tracing::warn!(error = %e, "lost the broker; reconnecting");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                },
                () = &mut end => break,
                slot = schedule.tick(), if !closed_loop => {
                    let session = self.next_session;
                    self.next_session = (self.next_session + 1) % self.sessions.len();
                    self.send(session, slot, &clock);
                }
                _ = scan.tick() => {
                    let now = Instant::now();
                    for session in self.expire(now, &clock) {
                        if closed_loop && now < clock.measure_until {
                            self.send(session, now, &clock);
                        }
                    }
                }
            }
        }
        self.tally.unfinished = self.pending.len() as u64;
        // Leave politely so the broker does not keep our subscription.
        if self.client.try_disconnect().is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                loop {
                    match self.eventloop.poll().await {
                        Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
            })
            .await;
        }
        self.tally
    }
}

/// The request id a reply topic ends in.
fn request_of(topic: &str) -> Option<u64> {
    topic
        .rsplit('/')
        .next()
        .and_then(|level| u64::from_str_radix(level, 16).ok())
}

/// The result of a run.
#[derive(Debug)]
pub struct Report {
    plan: Plan,
    tally: Tally,
}

/// The latency figures every report gives, in ms, from sorted nanosecond
/// samples (`None` without samples).
fn latency_figures(sorted: &[u64]) -> Vec<(&'static str, Option<f64>)> {
    let mean = (!sorted.is_empty())
        .then(|| sorted.iter().map(|&n| n as f64).sum::<f64>() / sorted.len() as f64 / 1e6);
    vec![
        ("min", percentile_ms(sorted, 0.0)),
        ("mean", mean),
        ("p50", percentile_ms(sorted, 0.50)),
        ("p90", percentile_ms(sorted, 0.90)),
        ("p99", percentile_ms(sorted, 0.99)),
        ("p999", percentile_ms(sorted, 0.999)),
        ("max", percentile_ms(sorted, 1.0)),
    ]
}

/// The latency figures of sorted nanosecond samples (ms; null without
/// samples) as a JSON object.
pub fn latency_json(sorted: &[u64]) -> serde_json::Map<String, Value> {
    latency_figures(sorted)
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.map_or(Value::Null, Value::from)))
        .collect()
}

/// The latency figures of sorted nanosecond samples as the rows of a human
/// table, appended to `out`.
pub fn latency_rows(sorted: &[u64], out: &mut String) {
    for (name, v) in latency_figures(sorted) {
        let shown = v.map_or_else(|| "-".to_owned(), |v| format!("{v:.3}"));
        out.push_str(&format!("  {name:<16}{shown:>10}\n"));
    }
}

/// Exact nearest-rank percentiles of sorted nanosecond samples, in ms.
fn percentile_ms(sorted: &[u64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1] as f64 / 1e6)
}

impl Report {
    fn replies(&self) -> u64 {
        self.tally.latencies.len() as u64
    }

    fn per_sec(&self, n: u64) -> f64 {
        n as f64 / self.plan.duration.as_secs_f64()
    }

    fn errors_total(&self) -> u64 {
        self.tally.errors.values().sum()
    }

    /// The machine-readable result.
    pub fn to_json(&self) -> Value {
        let p = &self.plan;
        let latency = latency_json(&self.tally.latencies);
        json!({
            "label": p.label,
            "config": {
                "broker": p.target.to_string(),
                "project": p.project,
                "sessions": p.sessions,
                "connections": p.connections,
                "mode": if p.rate.is_some() { "open" } else { "closed" },
                "rate": p.rate,
                "warmup_s": p.warmup.as_secs_f64(),
                "duration_s": p.duration.as_secs_f64(),
                "message_bytes": p.message_bytes,
                "timeout_s": p.timeout.as_secs_f64(),
                "qos": p.qos as u8,
                "stream": p.stream,
            },
            "sent": self.tally.sent,
            "replies": self.replies(),
            "replies_per_sec": self.per_sec(self.replies()),
            "errors_total": self.errors_total(),
            "errors": self.tally.errors,
            "late_replies": self.tally.late,
            "unfinished": self.tally.unfinished,
            "disconnects": self.tally.disconnects,
            "latency_ms": latency,
            "first_piece_ms": p.stream.then(|| latency_json(&self.tally.first_piece)),
            "pieces_per_turn": p.stream.then(|| self.pieces_per_turn()),
        })
    }

    /// Mean, least and most delta pieces of an answered streamed turn.
    fn pieces_per_turn(&self) -> Value {
        let pieces = &self.tally.pieces;
        let mean =
            (!pieces.is_empty()).then(|| pieces.iter().sum::<u64>() as f64 / pieces.len() as f64);
        json!({
            "mean": mean,
            "min": pieces.iter().min(),
            "max": pieces.iter().max(),
        })
    }

    /// The human-readable result.
    pub fn table(&self) -> String {
        let p = &self.plan;
        let mode = match p.rate {
            Some(r) => format!("open loop at {r} requests/s"),
            None => "closed loop".to_owned(),
        };
        let mut out = format!(
            "palaver bench{}: {} sessions over {} connections to {}, project {:?}, {mode}\n\
             {:.1} s measured after {:.1} s warm-up, {}-byte messages, QoS {}, timeout {:.0} s\n\n",
            p.label
                .as_deref()
                .map(|l| format!(" [{l}]"))
                .unwrap_or_default(),
            p.sessions,
            p.connections,
            p.target,
            p.project,
            p.duration.as_secs_f64(),
            p.warmup.as_secs_f64(),
            p.message_bytes,
            p.qos as u8,
            p.timeout.as_secs_f64(),
        );
        out.push_str(&format!(
            "  {:<16}{:>10}\n  {:<16}{:>10}  ({:.1}/s)\n  {:<16}{:>10}\n",
            "sent",
            self.tally.sent,
            "replies",
            self.replies(),
            self.per_sec(self.replies()),
            "errors",
            self.errors_total(),
        ));
        for (kind, n) in &self.tally.errors {
            out.push_str(&format!("    {kind:<40}{n:>8}\n"));
        }
        if self.tally.late + self.tally.unfinished + self.tally.disconnects > 0 {
            out.push_str(&format!(
                "  late replies {}, unanswered at the end {}, disconnects {}\n",
                self.tally.late, self.tally.unfinished, self.tally.disconnects
            ));
        }
        out.push_str("\n  latency (ms, end to end)\n");
        latency_rows(&self.tally.latencies, &mut out);
        if p.stream {
            out.push_str("\n  time to first piece (ms)\n");
            latency_rows(&self.tally.first_piece, &mut out);
            let per_turn = self.pieces_per_turn();
            out.push_str(&format!(
                "\n  pieces per turn: mean {:.1}, min {}, max {}\n",
                per_turn["mean"].as_f64().unwrap_or(0.0),
                per_turn["min"],
                per_turn["max"],
            ));
        }
        out
    }
}

/// Connects everything, runs warm-up and window, collects the tallies.
pub async fn bench(args: &BenchArgs) -> Result<Report, ClientError> {
    let plan = Arc::new(Plan::from_args(args)?);
    if let Some(url) = &args.direct_url {
        return bench_direct(args, plan, url).await;
    }
    let run_id = format!("{:08x}", rand::random::<u32>());
    let mut groups: Vec<Vec<Session>> = (0..plan.connections).map(|_| Vec::new()).collect();
    for i in 0..plan.sessions {
        groups[i % plan.connections].push(Session {
            id: format!("bench-{run_id}-s{i}"),
        });
    }

    let (start_tx, start_rx) = watch::channel(None);
    let mut connecting = tokio::task::JoinSet::new();
    for (index, sessions) in groups.into_iter().enumerate() {
        let plan = plan.clone();
        let run_id = run_id.clone();
        connecting.spawn(async move {
            let mut conn = Conn::new(plan, &run_id, index, sessions);
            conn.connect().await.map(|()| conn)
        });
    }
    let mut conns = Vec::with_capacity(plan.connections);
    let connected = tokio::time::timeout(CONNECT_TIMEOUT, async {
        while let Some(joined) = connecting.join_next().await {
            let conn = joined.map_err(|e| ClientError::Connect(format!("connect task: {e}")))??;
            conns.push(conn);
        }
        Ok::<(), ClientError>(())
    })
    .await;
    match connected {
        Ok(r) => r?,
        Err(_) => {
            return Err(ClientError::Connect(format!(
                "could not connect and subscribe {} connections to {} within {} s",
                plan.connections,
                plan.target,
                CONNECT_TIMEOUT.as_secs()
            )))
        }
    }

    let mut driving = tokio::task::JoinSet::new();
    for conn in conns {
        driving.spawn(conn.drive(start_rx.clone()));
    }
    // A short pause so every task is parked on the start signal.
    let start = Instant::now() + Duration::from_millis(50);
    let measure_from = start + plan.warmup;
    let clock = Clock {
        start,
        measure_from,
        measure_until: measure_from + plan.duration,
    };
    let _ = start_tx.send(Some(clock));
    let mut tally = Tally::default();
    while let Some(joined) = driving.join_next().await {
        match joined {
            Ok(t) => tally.merge(t),
            Err(e) => return Err(ClientError::Connect(format!("load task failed: {e}"))),
        }
    }
    tally.latencies.sort_unstable();
    tally.first_piece.sort_unstable();
    Ok(Report {
        plan: Arc::try_unwrap(plan).unwrap_or_else(|p| (*p).clone()),
        tally,
    })
}

/// The request inference-svc makes for one turn of `project` with no
/// history: what palaver's load costs the model server, sent straight to it.
fn direct_body(settings: &ProjectSettings, message: &str) -> Value {
    json!({
        "messages": [
            {"role": "system", "content": settings.system_prompt},
            {"role": "user", "content": message},
        ],
        "temperature": settings.temperature,
        "top_p": settings.top_p,
        "max_tokens": settings.max_tokens,
        "stream": true,
        "stream_options": {"include_usage": true},
    })
}

/// `--direct-url`: every session sends its next request when the previous
/// reply's stream ended; counted like the MQTT load (what ends inside the
/// measured window), so the two reports compare line for line.
async fn bench_direct(args: &BenchArgs, plan: Arc<Plan>, url: &str) -> Result<Report, ClientError> {
    let bad = |m: String| ClientError::Connect(m);
    if plan.rate.is_some() {
        return Err(bad(
            "--direct-url runs a closed loop only (no --rate)".into()
        ));
    }
    let projects = Projects::load(args.projects.as_deref()).map_err(|e| bad(e.to_string()))?;
    let settings = projects.get(&plan.project).ok_or_else(|| {
        bad(format!(
            "no project {:?} in the projects file",
            plan.project
        ))
    })?;
    let body = Arc::new(direct_body(settings, &message_text(plan.message_bytes)));
    let base = url.trim().trim_end_matches('/');
    let endpoint = format!(
        "{}/v1/chat/completions",
        base.strip_suffix("/v1").unwrap_or(base)
    );
    // Like inference-svc's client: HTTP/1.1, one connection per request in
    // flight, no Nagle delay.
    let client = reqwest::Client::builder()
        .http1_only()
        .tcp_nodelay(true)
        .pool_idle_timeout(Duration::from_secs(4))
        .build()
        .map_err(|e| bad(format!("cannot build the http client: {e}")))?;

    let start = Instant::now() + Duration::from_millis(50);
    let measure_from = start + plan.warmup;
    let clock = Clock {
        start,
        measure_from,
        measure_until: measure_from + plan.duration,
    };
    let mut sessions = tokio::task::JoinSet::new();
    for _ in 0..plan.sessions {
        let (client, endpoint, body, timeout) =
            (client.clone(), endpoint.clone(), body.clone(), plan.timeout);
        sessions.spawn(async move {
            let mut tally = Tally::default();
            tokio::time::sleep_until(clock.start).await;
            while Instant::now() < clock.measure_until {
                let since = Instant::now();
                if clock.measured(since) {
                    tally.sent += 1;
                }
                let outcome = tokio::time::timeout(timeout, direct_turn(&client, &endpoint, &body))
                    .await
                    .unwrap_or_else(|_| Err(NO_REPLY.to_owned()));
                let now = Instant::now();
                if !clock.measured(now) {
                    continue;
                }
                match outcome {
                    Ok(()) => {
                        let nanos = now.saturating_duration_since(since).as_nanos();
                        tally
                            .latencies
                            .push(u64::try_from(nanos).unwrap_or(u64::MAX));
                    }
                    Err(kind) => *tally.errors.entry(kind).or_default() += 1,
                }
            }
            tally
        });
    }
    let mut tally = Tally::default();
    while let Some(joined) = sessions.join_next().await {
        tally.merge(joined.map_err(|e| bad(format!("load task failed: {e}")))?);
    }
    tally.latencies.sort_unstable();
    Ok(Report {
        plan: Arc::try_unwrap(plan).unwrap_or_else(|p| (*p).clone()),
        tally,
    })
}

/// One streamed completion, read to its end; `Err` names what went wrong.
/// Like inference-svc, it sends once more when no response came back at all:
/// llama-server closes a kept-alive connection after a few requests, and a
/// pooled connection can be closed under a new request.
async fn direct_turn(client: &reqwest::Client, endpoint: &str, body: &Value) -> Result<(), String> {
    let send = || client.post(endpoint).json(body).send();
    let response = match send().await {
        Err(e) if (e.is_connect() || e.is_request()) && !e.is_timeout() => send().await,
        other => other,
    }
    .map_err(|_| "unavailable".to_owned())?;
    let status = response.status();
    if !status.is_success() {
        return Err(format!("http_{}", status.as_u16()));
    }
    let text = response
        .text()
        .await
        .map_err(|_| "broken_stream".to_owned())?;
    if text.contains("\"error\"") {
        return Err("error_in_stream".into());
    }
    if !text.contains("[DONE]") {
        return Err("unfinished_stream".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_direct_load_is_inference_svc_s_request_without_history() {
        let settings = ProjectSettings {
            system_prompt: "Be brief.".into(),
            max_tokens: 16,
            ..ProjectSettings::default()
        };
        let body = direct_body(&settings, "hello");
        assert_eq!(body["messages"][0]["content"], "Be brief.");
        assert_eq!(
            body["messages"][1],
            json!({"role": "user", "content": "hello"})
        );
        assert_eq!(body["max_tokens"], 16);
        assert_eq!(body["stream"], true);
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let samples: Vec<u64> = (1..=100).map(|ms| ms * 1_000_000).collect();
        assert_eq!(percentile_ms(&samples, 0.5), Some(50.0));
        assert_eq!(percentile_ms(&samples, 0.99), Some(99.0));
        assert_eq!(percentile_ms(&samples, 0.999), Some(100.0));
        assert_eq!(percentile_ms(&samples, 0.0), Some(1.0));
        assert_eq!(percentile_ms(&samples, 1.0), Some(100.0));
        assert_eq!(percentile_ms(&[], 0.5), None);
        assert_eq!(percentile_ms(&[7_000_000], 0.99), Some(7.0));
    }

    #[test]
    fn error_replies_are_sorted_by_kind() {
        assert_eq!(
            error_kind(RATE_LIMITED_TEXT).as_deref(),
            Some("rate_limited")
        );
        assert_eq!(error_kind(OVERLOADED_TEXT).as_deref(), Some("overloaded"));
        assert_eq!(error_kind(TIMEOUT_TEXT).as_deref(), Some("server_timeout"));
        assert_eq!(
            error_kind("Error: Message is too long (at most 8000 characters).").as_deref(),
            Some("Error: Message is too long (at most 8000 characters).")
        );
        assert_eq!(error_kind("reply to: hello"), None);
        assert_eq!(error_kind("No Error: here"), None);
    }

    #[test]
    fn messages_have_the_asked_size() {
        for n in [1, 10, 64, 1000] {
            let m = message_text(n);
            assert_eq!(m.len(), n);
            assert!(!m.trim().is_empty());
        }
    }

    #[test]
    fn plans_refuse_impossible_runs() {
        let args = |sessions, connections| BenchArgs {
            broker: BrokerArgs {
                mqtt_url: None,
                host: "127.0.0.1".into(),
                port: 1883,
                username: None,
                password: None,
            },
            project: "bench".into(),
            sessions,
            connections,
            duration: 1.0,
            warmup: 0.0,
            message_bytes: 10,
            rate: None,
            timeout: 1.0,
            qos: 1,
            label: None,
            json: false,
            direct_url: None,
            projects: None,
            stream: false,
        };
        assert_eq!(Plan::from_args(&args(8, None)).unwrap().connections, 8);
        assert_eq!(Plan::from_args(&args(8, Some(2))).unwrap().connections, 2);
        assert!(Plan::from_args(&args(0, None)).is_err());
        assert!(Plan::from_args(&args(2, Some(3))).is_err());
        let mut open = args(4, None);
        open.rate = Some(0.0);
        assert!(Plan::from_args(&open).is_err());
    }
}
