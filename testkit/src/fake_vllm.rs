//! A fake vLLM: the OpenAI-compatible endpoints palaver uses, over real HTTP,
//! with configurable latency, injectable faults and counters of what it saw.
//!
//! It speaks the exact shapes of vLLM (see VLLM_API.md): a streamed reply is
//! a role chunk, content chunks (the last one carrying `finish_reason`), a
//! usage chunk when `stream_options.include_usage` is set, then
//! `data: [DONE]`. Headers go out at once and the first chunk after `ttft`,
//! as vLLM does after queueing and prefill.
//!
//! Requests in flight are counted from arrival until the reply's body is
//! finished or the client disconnected, so tests can check how many
//! generations palaver runs at once.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures::Stream;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::pause;

/// What the fake answers.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// `reply to: <last user message>`, padded with filler words up to
    /// [`FakeVllmConfig::tokens`] words.
    Echo,
    /// This text, one word (with its following whitespace) per chunk.
    Fixed(String),
    /// Exactly these deltas, one per chunk (to split tags at chosen places).
    Chunks(Vec<String>),
}

/// A failure to inject into `POST /v1/chat/completions`.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// Answer normally.
    None,
    /// Answer with this status and body (JSON or not) before streaming.
    Status(u16, String),
    /// vLLM's 400 for a prompt that does not fit the context.
    ContextTooLong,
    /// 200, a few content chunks, then vLLM's error event and `[DONE]`.
    ErrorMidStream,
    /// 200, a few content chunks, then a chunk finishing with `"abort"` (vLLM
    /// cutting a generation short itself, e.g. while it shuts down) and
    /// `[DONE]`.
    AbortMidStream,
    /// 200 and headers, then never a chunk (a request stuck in vLLM's queue).
    Hang,
    /// Close the connection without sending a byte of a response.
    Drop,
    /// The inner fault on every other request (the 1st, 3rd, …), a normal
    /// answer on the rest: a flaky backend rather than a dead one.
    EveryOther(Box<Fault>),
}

/// Tokens a reply gets before [`Fault::ErrorMidStream`] or
/// [`Fault::AbortMidStream`] cuts it short.
const CUT_SHORT_AFTER: usize = 3;

/// Behaviour of a [`FakeVllm`].
#[derive(Debug, Clone, PartialEq)]
pub struct FakeVllmConfig {
    /// The served model name (`/v1/models`; other names get a 404).
    pub model: String,
    /// Time to first token.
    pub ttft: Duration,
    /// Time per further token.
    pub tpot: Duration,
    /// Words in an [`Reply::Echo`] reply (at least the echo itself).
    pub tokens: usize,
    /// What to answer.
    pub reply: Reply,
    /// Refuse a prompt whose roles do not alternate, as the chat templates
    /// of Gemma, Mistral and others do: after an optional system message,
    /// user and assistant take turns, starting and ending with user. vLLM
    /// answers such a prompt with a 400.
    pub strict_roles: bool,
    /// Prefill time per prompt token this server has not seen before: a
    /// model server's prefix cache. Each message-prefix of a prompt is
    /// remembered once served, so a session's next turn pays only for what
    /// was added since (its last reply and new message); the same session
    /// on another server pays for its whole history. Zero: no prefill time.
    pub prefill_per_token: Duration,
}

impl Default for FakeVllmConfig {
    fn default() -> Self {
        Self {
            model: "fake-model".into(),
            ttft: Duration::from_millis(20),
            tpot: Duration::from_millis(5),
            tokens: 16,
            reply: Reply::Echo,
            strict_roles: true,
            prefill_per_token: Duration::ZERO,
        }
    }
}

/// Prefixes a fake remembers before it forgets them all, so a long
/// benchmark's cache stays bounded (vLLM evicts too).
const PREFIX_CACHE_CAP: usize = 1 << 20;

/// A model server's prefix cache, at message granularity: one hash per
/// message-prefix of every prompt served.
#[derive(Default)]
struct PrefixCache(std::collections::HashSet<u64>);

impl PrefixCache {
    /// Counts the prompt tokens (words) past the longest remembered prefix
    /// of `messages`, and remembers every prefix.
    fn uncached_tokens(&mut self, messages: &[Value]) -> usize {
        use std::hash::{Hash, Hasher};
        if self.0.len() > PREFIX_CACHE_CAP {
            self.0.clear();
        }
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        let mut uncached = 0;
        let mut hit = true;
        for m in messages {
            let role = m.get("role").and_then(Value::as_str).unwrap_or("");
            let content = m.get("content").and_then(Value::as_str).unwrap_or("");
            (role, content).hash(&mut hasher);
            let new = self.0.insert(hasher.finish());
            hit = hit && !new;
            if !hit {
                uncached += content.split_whitespace().count();
            }
        }
        uncached
    }
}

/// Whether `messages` is what a strict chat template accepts.
fn roles_alternate(messages: &[Value]) -> bool {
    let roles: Vec<&str> = messages
        .iter()
        .map(|m| m.get("role").and_then(Value::as_str).unwrap_or(""))
        .collect();
    let turns = match roles.first() {
        Some(&"system") => &roles[1..],
        _ => &roles[..],
    };
    !turns.is_empty()
        && turns.len() % 2 == 1
        && turns
            .iter()
            .enumerate()
            .all(|(i, r)| *r == if i % 2 == 0 { "user" } else { "assistant" })
}

/// Counters and switches shared by the handlers and the test.
struct Shared {
    config: FakeVllmConfig,
    fault: Mutex<Fault>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    requests: AtomicUsize,
    /// Counts requests under [`Fault::EveryOther`].
    alternate: AtomicUsize,
    /// The raw body: parsed only when a test asks, so that a benchmark's
    /// fake does not copy every request.
    last_request: Mutex<Option<Bytes>>,
    last_request_id: Mutex<Option<String>>,
    /// W3C trace context of the last chat completion request.
    last_traceparent: Mutex<Option<String>>,
    /// Requests per `x-session-id` header value since start or `reset_stats`.
    sessions: Mutex<std::collections::HashMap<String, usize>>,
    prefixes: Mutex<PrefixCache>,
    shutdown: CancellationToken,
}

impl Shared {
    fn new(config: FakeVllmConfig, shutdown: CancellationToken) -> Self {
        Self {
            config,
            fault: Mutex::new(Fault::None),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            requests: AtomicUsize::new(0),
            alternate: AtomicUsize::new(0),
            last_request: Mutex::new(None),
            last_request_id: Mutex::new(None),
            last_traceparent: Mutex::new(None),
            sessions: Mutex::default(),
            prefixes: Mutex::default(),
            shutdown,
        }
    }
}

/// Locks a mutex even if a panicking test poisoned it: the data is plain.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A running fake vLLM on 127.0.0.1; stops when dropped.
pub struct FakeVllm {
    shared: Arc<Shared>,
    addr: SocketAddr,
    task: Mutex<Option<JoinHandle<io::Result<()>>>>,
    /// Stops the listener only (see [`FakeVllm::stop_listening`]).
    listening: Mutex<CancellationToken>,
}

impl FakeVllm {
    /// Starts a fake on a free loopback port.
    pub async fn start(config: FakeVllmConfig) -> FakeVllm {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local address");
        let shared = Arc::new(Shared::new(config, CancellationToken::new()));
        let listening = shared.shutdown.child_token();
        let task = tokio::spawn(serve_shared(listener, shared.clone(), listening.clone()));
        FakeVllm {
            shared,
            addr,
            task: Mutex::new(Some(task)),
            listening: Mutex::new(listening),
        }
    }

    /// Serves a fake on `listener` until `shutdown` (for `palaver fake-vllm`).
    pub async fn serve(
        listener: TcpListener,
        config: FakeVllmConfig,
        shutdown: CancellationToken,
    ) -> io::Result<()> {
        let stop = shutdown.clone();
        serve_shared(listener, Arc::new(Shared::new(config, shutdown)), stop).await
    }

    /// Base URL, `http://127.0.0.1:PORT` (without `/v1`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Chat completions being answered now.
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::SeqCst)
    }

    /// Most chat completions answered at once since start or `reset_stats`.
    pub fn max_in_flight(&self) -> usize {
        self.shared.max_in_flight.load(Ordering::SeqCst)
    }

    /// Chat completion requests received since start or `reset_stats`.
    pub fn requests(&self) -> usize {
        self.shared.requests.load(Ordering::SeqCst)
    }

    /// Zeroes `requests`, sets `max_in_flight` to the current in-flight
    /// count and forgets the last request.
    pub fn reset_stats(&self) {
        self.shared.requests.store(0, Ordering::SeqCst);
        self.shared
            .max_in_flight
            .store(self.in_flight(), Ordering::SeqCst);
        *lock(&self.shared.last_request) = None;
        *lock(&self.shared.last_request_id) = None;
        lock(&self.shared.sessions).clear();
    }

    /// Requests per `x-session-id` header since start or `reset_stats`:
    /// which sessions this server saw.
    pub fn sessions(&self) -> std::collections::HashMap<String, usize> {
        lock(&self.shared.sessions).clone()
    }

    /// JSON body of the last chat completion request.
    pub fn last_request(&self) -> Option<Value> {
        let body = lock(&self.shared.last_request).clone()?;
        serde_json::from_slice(&body).ok()
    }

    /// `X-Request-Id` header of the last chat completion request.
    pub fn last_request_id(&self) -> Option<String> {
        lock(&self.shared.last_request_id).clone()
    }

    /// `traceparent` header of the last chat completion request: how vLLM
    /// would join the turn's trace.
    pub fn last_traceparent(&self) -> Option<String> {
        lock(&self.shared.last_traceparent).clone()
    }

    /// Injects `fault` into every following chat completion.
    pub fn set_fault(&self, fault: Fault) {
        *lock(&self.shared.fault) = fault;
    }

    /// Stops listening (new connections are refused) and ends every reply
    /// in progress by dropping its connection.
    pub async fn shutdown(&self) {
        self.shared.shutdown.cancel();
        let task = lock(&self.task).take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

impl FakeVllm {
    /// Closes the port, so that connections are refused, like a vLLM whose
    /// process exited; counters and the fault setting are kept. Replies in
    /// progress may finish.
    pub async fn stop_listening(&self) {
        lock(&self.listening).cancel();
        let task = lock(&self.task).take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }

    /// Listens again on the same port after [`FakeVllm::stop_listening`].
    pub async fn listen_again(&self) {
        let mut tries = 0;
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) if tries < 50 => {
                    tries += 1;
                    tracing::debug!(error = %e, "port not free yet");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("cannot listen on {} again: {e}", self.addr),
            }
        };
        let token = self.shared.shutdown.child_token();
        *lock(&self.listening) = token.clone();
        let task = tokio::spawn(serve_shared(listener, self.shared.clone(), token));
        *lock(&self.task) = Some(task);
    }
}

impl Drop for FakeVllm {
    fn drop(&mut self) {
        self.shared.shutdown.cancel();
    }
}

async fn serve_shared(
    listener: TcpListener,
    shared: Arc<Shared>,
    stop: CancellationToken,
) -> io::Result<()> {
    let shutdown = stop;
    let app = Router::new()
        .route("/health", get(|| async { StatusCode::OK }))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat_completions))
        .with_state(shared);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

/// Counts a request in flight until dropped (it lives inside the body stream).
struct InFlight(Arc<Shared>);

impl InFlight {
    fn enter(shared: &Arc<Shared>) -> Self {
        let now = shared.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        shared.max_in_flight.fetch_max(now, Ordering::SeqCst);
        Self(shared.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn models(State(shared): State<Arc<Shared>>) -> Response {
    let model = &shared.config.model;
    axum::Json(json!({
        "object": "list",
        "data": [{
            "id": model,
            "object": "model",
            "created": unix_now(),
            "owned_by": "vllm",
            "root": model,
            "parent": null,
            "max_model_len": 4096,
            "permission": [],
        }],
    }))
    .into_response()
}

/// vLLM's (>= 0.10.1) error body.
fn error_response(status: StatusCode, kind: &str, message: &str) -> Response {
    let body = json!({
        "error": {"message": message, "type": kind, "param": null, "code": status.as_u16()}
    });
    (status, axum::Json(body)).into_response()
}

async fn chat_completions(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    // Time to first token counts from arrival, as vLLM's does: parsing the
    // request is part of it, not added to it.
    let arrived = tokio::time::Instant::now();
    shared.requests.fetch_add(1, Ordering::SeqCst);
    let guard = InFlight::enter(&shared);
    let request: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "BadRequestError",
                &format!("invalid JSON: {e}"),
            )
        }
    };
    *lock(&shared.last_request) = Some(body.clone());
    *lock(&shared.last_request_id) = headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    *lock(&shared.last_traceparent) = headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    if let Some(session) = headers.get("x-session-id").and_then(|v| v.to_str().ok()) {
        *lock(&shared.sessions)
            .entry(session.to_owned())
            .or_default() += 1;
    }

    let config = &shared.config;
    if let Some(model) = request.get("model").and_then(Value::as_str) {
        if model != config.model {
            return error_response(
                StatusCode::NOT_FOUND,
                "NotFoundError",
                &format!("The model `{model}` does not exist."),
            );
        }
    }
    let Some(messages) = request.get("messages").and_then(Value::as_array) else {
        return error_response(
            StatusCode::BAD_REQUEST,
            "BadRequestError",
            "messages: field required",
        );
    };
    if config.strict_roles && !roles_alternate(messages) {
        return error_response(
            StatusCode::BAD_REQUEST,
            "BadRequestError",
            "Conversation roles must alternate user/assistant/user/assistant/...",
        );
    }
    let stream = request.get("stream").and_then(Value::as_bool) == Some(true);
    let stream_options = request.get("stream_options").filter(|v| !v.is_null());
    if stream_options.is_some() && !stream {
        return error_response(
            StatusCode::BAD_REQUEST,
            "BadRequestError",
            "Stream options can only be defined when `stream=True`.",
        );
    }
    let include_usage = stream_options
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        == Some(true);
    let max_tokens = request
        .get("max_completion_tokens")
        .filter(|v| !v.is_null())
        .or_else(|| request.get("max_tokens"))
        .and_then(Value::as_u64)
        .map(|n| usize::try_from(n).unwrap_or(usize::MAX));

    let fault = match lock(&shared.fault).clone() {
        Fault::EveryOther(inner) => {
            if shared.alternate.fetch_add(1, Ordering::SeqCst) % 2 == 0 {
                *inner
            } else {
                Fault::None
            }
        }
        f => f,
    };
    match fault {
        Fault::None
        | Fault::ErrorMidStream
        | Fault::AbortMidStream
        | Fault::Hang
        | Fault::Drop
        | Fault::EveryOther(_) => {}
        Fault::Status(code, body) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return (status, [(header::CONTENT_TYPE, "application/json")], body).into_response();
        }
        Fault::ContextTooLong => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "BadRequestError",
                "This model's maximum context length is 4096 tokens. However, you requested \
                 5000 tokens (4488 in the messages, 512 in the completion). Please reduce the \
                 length of the messages or completion.",
            )
        }
    }

    // Prefill: the first token waits for the tokens not cached here, so
    // time to first token counts from when prefill would have ended.
    let arrived = if config.prefill_per_token.is_zero() {
        arrived
    } else {
        let uncached = lock(&shared.prefixes).uncached_tokens(messages);
        arrived + config.prefill_per_token * u32::try_from(uncached).unwrap_or(u32::MAX)
    };
    let prompt_tokens: usize = messages
        .iter()
        .filter_map(|m| m.get("content").and_then(Value::as_str))
        .map(|c| c.split_whitespace().count())
        .sum();
    let mut pieces = reply_pieces(config, messages);
    let finish = match max_tokens {
        Some(max) if pieces.len() > max => {
            pieces.truncate(max);
            "length"
        }
        _ => "stop",
    };
    let reply = Generated {
        id: format!("chatcmpl-{}", shared.requests.load(Ordering::SeqCst)),
        created: unix_now(),
        model: config.model.clone(),
        pieces,
        finish,
        prompt_tokens,
    };

    if fault == Fault::Drop {
        // An error as the body's first item makes hyper close the connection
        // before the response head is flushed: the client sees no byte.
        let body = futures::stream::once(async {
            Err::<Bytes, _>(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "fault: drop",
            ))
        });
        return sse_response(Body::from_stream(body));
    }
    if !stream {
        return unary_reply(&shared, arrived, reply, fault, guard).await;
    }
    let events = reply_events(shared.clone(), arrived, reply, include_usage, fault, guard);
    sse_response(Body::from_stream(events))
}

fn sse_response(body: Body) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/event-stream; charset=utf-8")],
        body,
    )
        .into_response()
}

/// A reply about to be sent.
struct Generated {
    id: String,
    created: u64,
    model: String,
    pieces: Vec<String>,
    finish: &'static str,
    prompt_tokens: usize,
}

/// One streamed event's JSON, in vLLM's key order. Typed rather than built
/// with `json!`: a benchmark's fake must not spend the CPU that palaver is
/// being measured on.
#[derive(Serialize)]
struct ChunkJson<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: &'a [ChoiceJson<'a>],
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Value>,
}

#[derive(Serialize)]
struct ChoiceJson<'a> {
    index: u32,
    delta: DeltaJson<'a>,
    logprobs: Option<()>,
    finish_reason: Option<&'a str>,
    /// Present (as null) on the chunk that finishes, absent before.
    #[serde(skip_serializing_if = "Option::is_none")]
    stop_reason: Option<Value>,
}

#[derive(Serialize)]
struct DeltaJson<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    content: &'a str,
}

impl Generated {
    /// A `data:` event with one choice: `content` as the delta (after the
    /// assistant role on the first chunk), finishing the reply if `finish`.
    fn chunk(&self, content: &str, first: bool, finish: bool) -> Bytes {
        let choice = ChoiceJson {
            index: 0,
            delta: DeltaJson {
                role: first.then_some("assistant"),
                content,
            },
            logprobs: None,
            finish_reason: finish.then_some(self.finish),
            stop_reason: finish.then_some(Value::Null),
        };
        self.event(&[choice], None)
    }

    fn event(&self, choices: &[ChoiceJson<'_>], usage: Option<Value>) -> Bytes {
        let json = ChunkJson {
            id: &self.id,
            object: "chat.completion.chunk",
            created: self.created,
            model: &self.model,
            choices,
            usage,
        };
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(b"data: ");
        serde_json::to_writer(&mut out, &json).expect("a chunk serializes");
        out.extend_from_slice(b"\n\n");
        Bytes::from(out)
    }

    /// The whole stream: the role chunk, one chunk per token (the last with
    /// the finish reason; an empty one if there are no tokens), the usage
    /// chunk if asked for, and `[DONE]`.
    fn events(&self, include_usage: bool) -> Vec<Bytes> {
        let n = self.pieces.len();
        let mut out = Vec::with_capacity(n + 3);
        out.push(self.chunk("", true, false));
        for (i, piece) in self.pieces.iter().enumerate() {
            // vLLM sends the last token together with the finish reason.
            out.push(self.chunk(piece, false, i + 1 == n));
        }
        if n == 0 {
            out.push(self.chunk("", false, true));
        }
        if include_usage {
            out.push(self.event(&[], Some(self.usage())));
        }
        out.push(Bytes::from_static(b"data: [DONE]\n\n"));
        out
    }

    fn usage(&self) -> Value {
        let completion = self.pieces.len();
        json!({
            "prompt_tokens": self.prompt_tokens,
            "total_tokens": self.prompt_tokens + completion,
            "completion_tokens": completion,
        })
    }
}

/// The deltas of the reply, before `max_tokens` is applied.
fn reply_pieces(config: &FakeVllmConfig, messages: &[Value]) -> Vec<String> {
    match &config.reply {
        Reply::Chunks(chunks) => chunks.clone(),
        Reply::Fixed(text) => text
            .split_inclusive(char::is_whitespace)
            .map(str::to_string)
            .collect(),
        Reply::Echo => {
            let last_user = messages
                .iter()
                .rev()
                .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
                .and_then(|m| m.get("content").and_then(Value::as_str))
                .unwrap_or("");
            let mut words: Vec<String> = format!("reply to: {last_user}")
                .split_whitespace()
                .map(str::to_string)
                .collect();
            let mut filler = 1;
            while words.len() < config.tokens {
                words.push(format!("word{filler}"));
                filler += 1;
            }
            words
                .iter()
                .enumerate()
                .map(|(i, w)| if i == 0 { w.clone() } else { format!(" {w}") })
                .collect()
        }
    }
}

/// [`pause::pause`] `d`, or false early when the fake is shutting down.
async fn pause(shutdown: &CancellationToken, d: Duration) -> bool {
    pause_until(shutdown, tokio::time::Instant::now() + d).await
}

/// [`pause::until`] `deadline`, or false early when the fake is shutting down.
async fn pause_until(shutdown: &CancellationToken, deadline: tokio::time::Instant) -> bool {
    tokio::select! {
        _ = pause::until(deadline) => true,
        _ = shutdown.cancelled() => false,
    }
}

fn aborted() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, "fake vLLM shutting down")
}

/// The SSE body of a streamed reply, holding `guard` until it ends or is dropped.
fn reply_events(
    shared: Arc<Shared>,
    arrived: tokio::time::Instant,
    reply: Generated,
    include_usage: bool,
    fault: Fault,
    guard: InFlight,
) -> impl Stream<Item = Result<Bytes, io::Error>> + Send {
    async_stream::stream! {
        let _guard = guard;
        let shutdown = shared.shutdown.clone();
        let config = &shared.config;
        if fault == Fault::Hang {
            shutdown.cancelled().await;
            yield Err(aborted());
            return;
        }
        // Rendered while "the model runs", so that writing them costs the
        // fake nothing after the pause it promised.
        let cut_short = matches!(fault, Fault::ErrorMidStream | Fault::AbortMidStream);
        let events = (!cut_short).then(|| reply.events(include_usage));
        if !pause_until(&shutdown, arrived + config.ttft).await {
            yield Err(aborted());
            return;
        }
        let Some(events) = events else {
            // The role chunk and up to CUT_SHORT_AFTER tokens, none
            // finishing, then the engine fails or gives up.
            yield Ok(reply.chunk("", true, false));
            for piece in reply.pieces.iter().take(CUT_SHORT_AFTER) {
                yield Ok(reply.chunk(piece, false, false));
            }
            if fault == Fault::AbortMidStream {
                let aborted = Generated { finish: "abort", ..reply };
                yield Ok(aborted.chunk("", false, true));
                yield Ok(Bytes::from_static(b"data: [DONE]\n\n"));
                return;
            }
            let error = json!({"error": {
                "message": "The engine failed while generating (fault: error mid-stream).",
                "type": "InternalServerError",
                "param": null,
                "code": 500,
            }});
            yield Ok(Bytes::from(format!("data: {error}\n\ndata: [DONE]\n\n")));
            return;
        };
        if config.tpot.is_zero() {
            // Every token at once: one write, as they would reach a client.
            yield Ok(Bytes::from(events.concat()));
            return;
        }
        for (i, event) in events.into_iter().enumerate() {
            // Event i (1-based after the role chunk) is token i: pause before
            // every token but the first, never before usage or [DONE].
            if (2..=reply.pieces.len()).contains(&i) && !pause(&shutdown, config.tpot).await {
                yield Err(aborted());
                return;
            }
            yield Ok(event);
        }
    }
}

/// A non-streamed reply: the whole generation time, then one JSON body.
async fn unary_reply(
    shared: &Shared,
    arrived: tokio::time::Instant,
    reply: Generated,
    fault: Fault,
    guard: InFlight,
) -> Response {
    let _guard = guard;
    let config = &shared.config;
    let steps = u32::try_from(reply.pieces.len().saturating_sub(1)).unwrap_or(u32::MAX);
    let wait = match fault {
        Fault::Hang => None,
        _ => Some(config.ttft + config.tpot * steps),
    };
    let finished = match wait {
        Some(d) => pause_until(&shared.shutdown, arrived + d).await,
        None => {
            shared.shutdown.cancelled().await;
            false
        }
    };
    if !finished {
        return error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailableError",
            "shutting down",
        );
    }
    if fault == Fault::ErrorMidStream {
        return error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalServerError",
            "The engine failed while generating (fault: error mid-stream).",
        );
    }
    let (text, finish) = match fault {
        Fault::AbortMidStream => (
            reply
                .pieces
                .iter()
                .take(CUT_SHORT_AFTER)
                .map(String::as_str)
                .collect(),
            "abort",
        ),
        _ => (reply.pieces.concat(), reply.finish),
    };
    axum::Json(json!({
        "id": reply.id,
        "object": "chat.completion",
        "created": reply.created,
        "model": reply.model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text, "reasoning_content": null, "tool_calls": []},
            "logprobs": null,
            "finish_reason": finish,
            "stop_reason": null,
        }],
        "usage": reply.usage(),
    }))
    .into_response()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prefix_cache_charges_only_what_a_prompt_adds() {
        let msg = |role: &str, text: &str| json!({"role": role, "content": text});
        let mut cache = PrefixCache::default();
        let first = [msg("system", "be brief"), msg("user", "one two three")];
        assert_eq!(cache.uncached_tokens(&first), 5);
        assert_eq!(cache.uncached_tokens(&first), 0);
        let second = [
            msg("system", "be brief"),
            msg("user", "one two three"),
            msg("assistant", "four"),
            msg("user", "five six"),
        ];
        assert_eq!(cache.uncached_tokens(&second), 3);
        // A changed early message invalidates everything after it.
        let edited = [msg("system", "be long"), msg("user", "one two three")];
        assert_eq!(cache.uncached_tokens(&edited), 5);
    }
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    /// Minimal HTTP/1.1 POST over a raw socket, so testkit needs no client.
    async fn post(addr: SocketAddr, body: &Value) -> (TcpStream, String) {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let body = body.to_string();
        let req = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
             x-request-id: t-1\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).await.unwrap();
        (s, String::new())
    }

    fn chat(stream: bool) -> Value {
        json!({
            "model": "fake-model",
            "messages": [{"role": "user", "content": "hello there"}],
            "stream": stream,
            "max_tokens": 6,
            "temperature": 0.0,
        })
    }

    #[tokio::test]
    async fn streams_vllm_chunks_and_counts_in_flight() {
        let fake = FakeVllm::start(FakeVllmConfig {
            ttft: Duration::from_millis(200),
            ..FakeVllmConfig::default()
        })
        .await;
        let mut body = chat(true);
        body["stream_options"] = json!({"include_usage": true});
        let (mut s, mut text) = post(fake.addr(), &body).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(fake.in_flight(), 1);
        s.read_to_string(&mut text).await.unwrap();
        assert_eq!(fake.in_flight(), 0);
        assert_eq!(fake.max_in_flight(), 1);
        assert_eq!(fake.last_request_id().as_deref(), Some("t-1"));
        assert_eq!(fake.last_request().unwrap()["max_tokens"], 6);

        let events: Vec<Value> = text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter(|d| *d != "[DONE]")
            .map(|d| serde_json::from_str(d).unwrap())
            .collect();
        assert!(text.contains("data: [DONE]"), "{text}");
        assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
        let reply: String = events
            .iter()
            .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(reply, "reply to: hello there word1 word2");
        let finish = &events[events.len() - 2]["choices"][0];
        assert_eq!(finish["finish_reason"], "length");
        assert_eq!(finish["stop_reason"], Value::Null);
        assert_eq!(events.last().unwrap()["usage"]["completion_tokens"], 6);
        assert_eq!(events.last().unwrap()["choices"], json!([]));
        // vLLM's exact keys: unset keys are omitted, not null, until the end.
        let middle = events[1].as_object().unwrap();
        let keys: Vec<&str> = middle.keys().map(String::as_str).collect();
        assert_eq!(keys, ["choices", "created", "id", "model", "object"]);
        let choice = events[1]["choices"][0].as_object().unwrap();
        let keys: Vec<&str> = choice.keys().map(String::as_str).collect();
        assert_eq!(keys, ["delta", "finish_reason", "index", "logprobs"]);
        assert_eq!(
            events[1]["choices"][0]["delta"],
            json!({"content": "reply"})
        );
    }

    #[tokio::test]
    async fn client_disconnect_ends_the_request() {
        let fake = FakeVllm::start(FakeVllmConfig {
            tpot: Duration::from_millis(50),
            tokens: 100,
            ..FakeVllmConfig::default()
        })
        .await;
        let (s, _) = post(fake.addr(), &chat(true)).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(fake.in_flight(), 1);
        drop(s);
        // The next write (within one tpot) fails and drops the body.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(fake.in_flight(), 0);
    }

    #[tokio::test]
    async fn wrong_model_is_404_and_shutdown_refuses() {
        let fake = FakeVllm::start(FakeVllmConfig::default()).await;
        let mut body = chat(false);
        body["model"] = json!("other");
        let (mut s, mut text) = post(fake.addr(), &body).await;
        s.read_to_string(&mut text).await.unwrap();
        assert!(text.starts_with("HTTP/1.1 404"), "{text}");
        assert!(text.contains("NotFoundError"));
        fake.shutdown().await;
        assert!(TcpStream::connect(fake.addr()).await.is_err());
    }
}
