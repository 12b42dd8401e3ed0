//! Client of vLLM's OpenAI-compatible API (also llama.cpp server, Ollama).
//!
//! What it gets right (see VLLM_API.md):
//! - streams `POST /v1/chat/completions` and always sends `model`,
//!   `temperature`, `top_p` and `max_tokens` (vLLM's fallbacks differ from
//!   OpenAI's);
//! - keeps pooled connections idle for less than vLLM's 5 s keep-alive and
//!   retries once only when no response came back at all;
//! - finds errors both before streaming (JSON 4xx/5xx) and inside the stream
//!   (a chunk with a top-level `error`), in vLLM's old and new shapes;
//! - bounds the wait for the first token, every gap between chunks and the
//!   whole reply;
//! - dropping the stream drops the HTTP response, which closes the
//!   connection and makes vLLM abort the generation.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use reqwest::header::HeaderValue;
use reqwest::{RequestBuilder, Response, StatusCode, Url};
use tokio::sync::Mutex;
use tokio::time::{timeout_at, Instant};

mod errors;
mod wire;

use self::errors::*;
use self::wire::*;
use super::sse::SseParser;
use super::think::ThinkFilter;
use super::{Chunk, GenerateParams, TokenStream, Usage};
use crate::config::Config;
use crate::error::InferenceError;

/// Below vLLM's (uvicorn's) 5 s keep-alive, so palaver never reuses a
/// connection the server is about to close.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(4);

/// Most of an error body read; enough for any message, bounded against a
/// peer that streams forever.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// Longest piece of a server's message quoted in ours.
const MAX_QUOTED: usize = 300;

/// The OpenAI-compatible backend; cheap to clone (shares one connection pool).
#[derive(Clone)]
pub struct OpenAiBackend {
    inner: Arc<Inner>,
}

struct Inner {
    client: reqwest::Client,
    /// Base URL without `/v1`, for messages.
    base: String,
    chat_url: Url,
    models_url: Url,
    api_key: Option<String>,
    /// The model named in the configuration, if any.
    configured_model: Option<String>,
    /// The model found through `GET /v1/models`, once asked. A mutex rather
    /// than a once-cell so a model the server stopped serving can be forgotten.
    discovered_model: Mutex<Option<String>>,
    first_token_timeout: Duration,
    idle_timeout: Duration,
    request_timeout: Duration,
    min_tokens_per_sec: f64,
    strip_think: bool,
    think_starts_open: bool,
}

/// The time limits a reply's next chunk can run into.
#[derive(Clone, Copy)]
enum Bound {
    FirstToken,
    Idle,
    Total,
}

/// The deadlines of one generation.
#[derive(Clone, Copy)]
struct Deadlines {
    first_token: Instant,
    total: Instant,
    /// How long the whole reply was given, for the error that says so.
    budget: Duration,
}

impl OpenAiBackend {
    /// A client for the server at `url` (`http://host:8000` or `http://host:8000/v1`).
    pub fn new(config: &Config, url: &str) -> Result<Self, InferenceError> {
        let base = normalize_base(url)?;
        let join = |path: &str| {
            Url::parse(&format!("{base}{path}")).map_err(|e| {
                InferenceError::Config(format!("invalid model server url {url:?}: {e}"))
            })
        };
        let mut builder = reqwest::Client::builder();
        if base.starts_with("https://") {
            let tls = palaver_core::tls::client_config(config.vllm_ca_file.as_deref(), None)
                .map_err(|e| InferenceError::Config(format!("model server TLS: {e}")))?;
            builder = builder.use_preconfigured_tls(tls).https_only(true);
        } else if config.vllm_ca_file.is_some() {
            return Err(InferenceError::Config(
                "--vllm-ca-file is given but the model server url is not https://".into(),
            ));
        }
        let client = builder
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            // vLLM speaks HTTP/1.1 only; concurrency is one connection each.
            .http1_only()
            // Chunks are small and latency matters more than packet count.
            .tcp_nodelay(true)
            .build()
            .map_err(|e| InferenceError::Config(format!("cannot build the http client: {e}")))?;
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                chat_url: join("/v1/chat/completions")?,
                models_url: join("/v1/models")?,
                base,
                api_key: config.api_key.clone(),
                configured_model: config.model.clone(),
                discovered_model: Mutex::new(None),
                first_token_timeout: config.first_token_timeout,
                idle_timeout: config.idle_timeout,
                request_timeout: config.request_timeout,
                min_tokens_per_sec: config.min_tokens_per_sec,
                strip_think: config.strip_think,
                think_starts_open: config.think_starts_open,
            }),
        })
    }

    /// `GET /health` answered 200 within `timeout` (vLLM: 503 once its
    /// engine died, connection refused while it loads or after it exited).
    pub async fn healthy(&self, timeout: Duration) -> bool {
        let url = format!("{}/health", self.inner.base);
        let probe = self.inner.client.get(url).timeout(timeout).send();
        matches!(probe.await, Ok(r) if r.status().is_success())
    }

    /// Sends the request and returns once the server answered with a status;
    /// the reply then streams.
    pub async fn generate(&self, req: GenerateParams) -> Result<TokenStream, InferenceError> {
        let inner = &self.inner;
        let start = Instant::now();
        let budget = inner.reply_budget(req.max_tokens);
        let total = start + budget;
        let deadlines = Deadlines {
            first_token: (start + inner.first_token_timeout).min(total),
            total,
            budget,
        };
        let first_token_error = || inner.first_token_error(deadlines);

        let model = timeout_at(deadlines.first_token, inner.model())
            .await
            .map_err(|_| first_token_error())??;
        let body = ChatCompletionRequest::new(&model, &req);
        let request_id = request_id_header(&req.request_id);
        let session = session_header(&req.affinity_key);
        tracing::debug!(request_id = ?request_id, %model, "sending chat completion");
        // The model server's own spans join the turn's trace (vLLM reads it).
        let traceparent = palaver_core::trace_context::current_traceparent();
        if traceparent.is_some() {
            tracing::Span::current().record("model", model.as_str());
        }

        let response = timeout_at(
            deadlines.first_token,
            inner.send_with_retry(|| {
                let mut post = inner
                    .authorized(inner.client.post(inner.chat_url.clone()))
                    .header("X-Request-Id", request_id.clone());
                if let Some(tp) = &traceparent {
                    post = post.header(palaver_core::trace_context::TRACEPARENT, tp.as_str());
                }
                match &session {
                    Some(s) => post.header("x-session-id", s.clone()),
                    None => post,
                }
                .json(&body)
            }),
        )
        .await
        .map_err(|_| first_token_error())??;

        let status = response.status();
        if !status.is_success() {
            let err = inner.error_from_response(response, deadlines.total).await;
            if matches!(err, InferenceError::ModelNotFound(_)) {
                inner.forget_discovered(&model).await;
            }
            return Err(err);
        }
        Ok(Box::pin(self.clone().stream_reply(response, deadlines)))
    }

    /// Reads the SSE body into chunks, applying the timeouts and the think filter.
    fn stream_reply(
        self,
        response: Response,
        deadlines: Deadlines,
    ) -> impl futures::Stream<Item = Result<Chunk, InferenceError>> + Send {
        async_stream::try_stream! {
            let inner = &self.inner;
            let mut body = Box::pin(response.bytes_stream());
            let mut parser = SseParser::new();
            let mut think = inner
                .strip_think
                .then(|| ThinkFilter::new(inner.think_starts_open));
            let mut got_event = false;
            let mut finish_reason: Option<String> = None;
            let mut usage: Option<Usage> = None;
            let mut done = false;
            // Whether any text outside the reasoning came through.
            let mut answered = false;

            while !done {
                // Which bound applies now; its error is only worded if it hits.
                let (deadline, bound) = if got_event {
                    let idle = Instant::now() + inner.idle_timeout;
                    if idle < deadlines.total {
                        (idle, Bound::Idle)
                    } else {
                        (deadlines.total, Bound::Total)
                    }
                } else {
                    (deadlines.first_token, Bound::FirstToken)
                };
                let next = timeout_at(deadline, body.next()).await.map_err(|_| match bound {
                    Bound::FirstToken => inner.first_token_error(deadlines),
                    Bound::Idle => inner.idle_error(),
                    Bound::Total => inner.total_error(deadlines),
                })?;
                let events = match next {
                    Some(Ok(bytes)) => parser.push(&bytes).map_err(|_| {
                        InferenceError::Backend(
                            "the model server sent an event line longer than 1 MiB".into(),
                        )
                    })?,
                    // Broke after the last token: the reply is complete.
                    Some(Err(_)) if finish_reason.is_some() => break,
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "reply body broke");
                        Err::<Vec<String>, _>(InferenceError::Unavailable(
                            "the connection to the model server broke in the middle of a reply".into(),
                        ))?
                    }
                    None => {
                        done = true;
                        parser.finish().into_iter().collect()
                    }
                };
                for data in events {
                    got_event = true;
                    if data.trim() == "[DONE]" {
                        done = true;
                        break;
                    }
                    let event = parse_event(&data)?;
                    if let Some(u) = event.usage {
                        usage = Some(u);
                    }
                    if event.finish_reason.as_deref() == Some("abort") {
                        // vLLM cut the generation short itself (shutting
                        // down, or giving up on a preempted request): the
                        // text so far is no reply, to store or to send.
                        Err::<(), _>(InferenceError::Unavailable(
                            "the model server aborted the reply before it was finished".into(),
                        ))?;
                    }
                    if event.finish_reason.is_some() {
                        finish_reason = event.finish_reason;
                    }
                    let visible = match &mut think {
                        Some(f) => f.push(&event.content),
                        None => event.content,
                    };
                    if !visible.is_empty() {
                        answered = answered || !visible.trim().is_empty();
                        yield Chunk { delta: visible, ..Chunk::default() };
                    }
                }
            }
            // Read the body's end so the connection goes back to the pool
            // instead of being closed; it normally follows [DONE] at once.
            let drain_until = (Instant::now() + Duration::from_millis(200)).min(deadlines.total);
            while let Ok(Some(Ok(_))) = timeout_at(drain_until, body.next()).await {}

            let finish_reason = finish_reason.ok_or_else(|| {
                InferenceError::Backend("the model server ended the reply without finishing it".into())
            })?;
            let rest = think.as_mut().map(ThinkFilter::finish).unwrap_or_default();
            if !answered && rest.trim().is_empty() {
                // A thinking model that spent max_tokens reasoning (or a
                // reply of nothing): an empty answer, stored and sent, would
                // read as a bug in the client.
                let why = if think.is_some() {
                    "no text outside its reasoning: raise max_tokens or turn the model's thinking off"
                } else {
                    "no text"
                };
                Err::<(), _>(InferenceError::Backend(format!(
                    "the model's reply had {why} (finish reason {finish_reason:?})"
                )))?;
            }
            yield Chunk { delta: rest, finish_reason: Some(finish_reason), usage };
        }
    }
}

impl Inner {
    fn authorized(&self, builder: RequestBuilder) -> RequestBuilder {
        match &self.api_key {
            Some(key) => builder.bearer_auth(key),
            None => builder,
        }
    }

    /// Sends a request; when no response came back at all (refused, or a
    /// pooled connection closed under it), tries exactly once more. Never
    /// after a status arrived: the server may already be generating.
    async fn send_with_retry(
        &self,
        build: impl Fn() -> RequestBuilder,
    ) -> Result<Response, InferenceError> {
        match build().send().await {
            Ok(r) => Ok(r),
            Err(e) if (e.is_connect() || e.is_request()) && !e.is_timeout() => {
                tracing::debug!(error = %e, "no response from the model server; retrying once");
                build().send().await.map_err(|e| self.send_error(&e))
            }
            Err(e) => Err(self.send_error(&e)),
        }
    }

    fn send_error(&self, e: &reqwest::Error) -> InferenceError {
        tracing::warn!(error = %e, base = %self.base, "model server unreachable");
        if e.is_connect() {
            InferenceError::Unavailable(format!(
                "cannot connect to the model server at {}",
                self.base
            ))
        } else {
            InferenceError::Unavailable(format!(
                "the model server at {} closed the connection without answering",
                self.base
            ))
        }
    }

    /// The model to request: configured, or discovered once and cached.
    async fn model(&self) -> Result<String, InferenceError> {
        if let Some(m) = &self.configured_model {
            return Ok(m.clone());
        }
        let mut cached = self.discovered_model.lock().await;
        if let Some(m) = &*cached {
            return Ok(m.clone());
        }
        let response = self
            .send_with_retry(|| self.authorized(self.client.get(self.models_url.clone())))
            .await?;
        if !response.status().is_success() {
            // The request's deadline bounds this read through our caller.
            return Err(self
                .error_from_response(response, Instant::now() + self.request_timeout)
                .await);
        }
        let models: ModelList = response.json().await.map_err(|e| {
            InferenceError::Backend(format!("the model server's model list is unreadable: {e}"))
        })?;
        let id = models
            .data
            .into_iter()
            .map(|m| m.id)
            .find(|id| !id.is_empty())
            .ok_or_else(|| InferenceError::Unavailable("the model server lists no model".into()))?;
        tracing::info!(model = %id, "discovered the served model");
        *cached = Some(id.clone());
        Ok(id)
    }

    /// After a 404 for a discovered model (the server was restarted with
    /// another one), asks again next time.
    async fn forget_discovered(&self, model: &str) {
        let mut cached = self.discovered_model.lock().await;
        if cached.as_deref() == Some(model) {
            *cached = None;
        }
    }

    /// Maps an error response (status and JSON body in any of vLLM's shapes).
    async fn error_from_response(&self, response: Response, deadline: Instant) -> InferenceError {
        let status = response.status();
        // An unreadable body still leaves the status to go by.
        let body: Vec<u8> = timeout_at(deadline, read_limited(response))
            .await
            .unwrap_or_default();
        let message = error_message(&body);
        tracing::warn!(%status, message = ?quote(&message), "model server refused a request");
        self.api_error(status.as_u16(), &message)
    }

    /// One mapping for HTTP errors and errors inside the stream.
    fn api_error(&self, code: u16, message: &str) -> InferenceError {
        if let Some(e) = context_too_long(message) {
            return e;
        }
        let quoted = quote(message);
        match StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR) {
            StatusCode::NOT_FOUND => InferenceError::ModelNotFound(
                self.configured_model
                    .clone()
                    .unwrap_or_else(|| "discovered from the server".into()),
            ),
            StatusCode::BAD_REQUEST | StatusCode::UNPROCESSABLE_ENTITY => {
                InferenceError::InvalidArgument(format!(
                    "the model server refused the request: {quoted}"
                ))
            }
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                InferenceError::Unavailable("the model server refused palaver's api key".into())
            }
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => {
                InferenceError::BackendBusy(format!("the model server is busy ({code}): {quoted}"))
            }
            // A server error's body may be a stack trace or internal
            // addresses: callers get the status, the log gets the body.
            s if s.is_server_error() => {
                InferenceError::Unavailable(format!("the model server failed ({code})"))
            }
            _ => InferenceError::Backend(format!("the model server answered {code}")),
        }
    }

    /// How long a whole reply of `max_tokens` may take: `request_timeout`,
    /// or longer when a reply that long, at the slowest pace allowed after
    /// its first token, needs more. vLLM sets no deadline of its own, and a
    /// fixed one would fail every long reply at the same point.
    fn reply_budget(&self, max_tokens: u32) -> Duration {
        let generating = Duration::from_secs_f64(f64::from(max_tokens) / self.min_tokens_per_sec);
        (self.first_token_timeout + generating).max(self.request_timeout)
    }

    fn first_token_error(&self, d: Deadlines) -> InferenceError {
        if d.first_token >= d.total {
            self.total_error(d)
        } else {
            InferenceError::Timeout(format!(
                "the model sent no token within {} ms",
                self.first_token_timeout.as_millis()
            ))
        }
    }

    fn idle_error(&self) -> InferenceError {
        InferenceError::Timeout(format!(
            "the model stalled for more than {} ms in the middle of a reply",
            self.idle_timeout.as_millis()
        ))
    }

    fn total_error(&self, d: Deadlines) -> InferenceError {
        InferenceError::Timeout(format!(
            "the model did not finish within {} ms",
            d.budget.as_millis()
        ))
    }
}

/// Accepts `http://host:8000`, `http://host:8000/`, `http://host:8000/v1`
/// and `http://host:8000/v1/`; returns the part before `/v1`.
fn normalize_base(url: &str) -> Result<String, InferenceError> {
    let trimmed = url.trim().trim_end_matches('/');
    let base = trimmed.strip_suffix("/v1").unwrap_or(trimmed);
    let parsed = Url::parse(base)
        .map_err(|e| InferenceError::Config(format!("invalid model server url {url:?}: {e}")))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(InferenceError::Config(format!(
            "model server url {url:?} must use http:// or https://"
        )));
    }
    Ok(base.to_string())
}

/// The session key as a header value, when it is one (else only `user`
/// carries it: the JSON body takes any string).
fn session_header(key: &str) -> Option<HeaderValue> {
    if key.is_empty() {
        return None;
    }
    HeaderValue::from_str(key).ok()
}

/// The caller's request id when it is a usable header value, else a fresh
/// one: vLLM (before 0.9) refuses duplicate ids among running requests.
fn request_id_header(id: &str) -> HeaderValue {
    let usable = !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic());
    if usable {
        if let Ok(v) = HeaderValue::from_str(id) {
            return v;
        }
    }
    let fresh = format!("palaver-{:016x}", rand::random::<u64>());
    HeaderValue::from_str(&fresh).unwrap_or_else(|_| HeaderValue::from_static("palaver"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Message, Role};

    #[test]
    fn the_request_body_is_vllm_s_shape_with_the_sampling_as_given() {
        let req = GenerateParams {
            messages: vec![
                Message {
                    role: Role::System,
                    content: "be brief".into(),
                },
                Message {
                    role: Role::User,
                    content: "say \"hi\"\n".into(),
                },
            ],
            temperature: 0.7,
            top_p: 0.95,
            max_tokens: 64,
            request_id: "r".into(),
            affinity_key: String::new(),
            client: String::new(),
        };
        let body = serde_json::to_string(&ChatCompletionRequest::new("m", &req)).unwrap();
        // 0.7 as the caller gave it, not 0.699999988079071 (f32 widened to f64).
        assert_eq!(
            body,
            r#"{"model":"m","messages":[{"role":"system","content":"be brief"},{"role":"user","content":"say \"hi\"\n"}],"stream":true,"stream_options":{"include_usage":true},"temperature":0.7,"top_p":0.95,"max_tokens":64}"#
        );
    }

    #[test]
    fn the_session_key_goes_in_user_and_in_a_header_when_it_can() {
        let req = GenerateParams {
            messages: Vec::new(),
            temperature: 1.0,
            top_p: 1.0,
            max_tokens: 1,
            request_id: String::new(),
            affinity_key: "general/s-1".into(),
            client: String::new(),
        };
        let body = serde_json::to_string(&ChatCompletionRequest::new("m", &req)).unwrap();
        assert!(
            body.ends_with(r#""max_tokens":1,"user":"general/s-1"}"#),
            "{body}"
        );
        assert_eq!(session_header("general/s-1").unwrap(), "general/s-1");
        assert!(session_header("").is_none());
        assert!(session_header("bad\nkey").is_none());
    }

    #[test]
    fn base_url_forms() {
        for u in [
            "http://h:8000",
            "http://h:8000/",
            "http://h:8000/v1",
            "http://h:8000/v1/",
        ] {
            assert_eq!(normalize_base(u).unwrap(), "http://h:8000", "{u}");
        }
        assert_eq!(
            normalize_base("https://h:8000/v1").unwrap(),
            "https://h:8000"
        );
        assert!(normalize_base("ftp://h:8000").is_err());
        assert!(normalize_base("not a url").is_err());
    }

    #[test]
    fn events_in_vllm_shapes() {
        let role = r#"{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}"#;
        assert_eq!(parse_event(role).unwrap(), Event::default());
        let content =
            r#"{"choices":[{"index":0,"delta":{"content":"Hi","reasoning_content":"hmm"}}]}"#;
        assert_eq!(parse_event(content).unwrap().content, "Hi");
        let reasoning_only = r#"{"choices":[{"index":0,"delta":{"reasoning":"hmm"}}]}"#;
        assert_eq!(parse_event(reasoning_only).unwrap().content, "");
        let finish = r#"{"choices":[{"index":0,"delta":{"content":"!"},"finish_reason":"length","stop_reason":null}]}"#;
        let e = parse_event(finish).unwrap();
        assert_eq!(
            (e.content.as_str(), e.finish_reason.as_deref()),
            ("!", Some("length"))
        );
        let usage =
            r#"{"choices":[],"usage":{"prompt_tokens":7,"total_tokens":9,"completion_tokens":2}}"#;
        assert_eq!(
            parse_event(usage).unwrap().usage,
            Some(Usage {
                prompt_tokens: 7,
                completion_tokens: 2
            })
        );
        let null_usage = r#"{"choices":[{"delta":{"content":"x"}}],"usage":null}"#;
        assert_eq!(parse_event(null_usage).unwrap().content, "x");
    }

    #[test]
    fn the_fast_path_reads_what_the_general_one_reads() {
        let inputs = [
            r#"{"choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}"#,
            r#"{"id":"x","object":"chat.completion.chunk","choices":[{"delta":{"content":"a\"b"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":2}}"#,
            r#"{"object":"chat\u002ecompletion.chunk","choices":[{"delta":{"content":"x"}}]}"#,
            r#"{"choices":[],"usage":null,"error":null}"#,
            r#"{"choices":[{"delta":{"content":"a"}}],"choices":[{"delta":{"content":"b"}}]}"#,
            r#"{"object":7,"choices":[{"delta":{"content":"x"}}]}"#,
            r#"{"error":{"message":"boom","code":500}}"#,
            r#"{"error":"Unauthorized"}"#,
            r#"{"object":"error","message":"old","code":400}"#,
            r#"{"choices":"nope"}"#,
            "{not json",
        ];
        for data in inputs {
            assert_eq!(parse_event(data), parse_event_general(data), "{data}");
        }
    }

    #[test]
    fn errors_mid_stream_in_both_shapes() {
        let nested = r#"{"error":{"message":"engine died","type":"InternalServerError","param":null,"code":500}}"#;
        assert!(
            matches!(parse_event(nested), Err(InferenceError::Unavailable(m)) if m.contains("engine died"))
        );
        let flat = r#"{"object":"error","message":"bad thing","type":"BadRequestError","param":null,"code":400}"#;
        assert!(
            matches!(parse_event(flat), Err(InferenceError::InvalidArgument(m)) if m.contains("bad thing"))
        );
        let ctx = r#"{"error":{"message":"This model's maximum context length is 4096 tokens.","code":400}}"#;
        assert_eq!(
            parse_event(ctx),
            Err(InferenceError::InvalidArgument(
                "the conversation is too long for the model".into()
            ))
        );
        assert!(matches!(
            parse_event("{not json"),
            Err(InferenceError::Backend(_))
        ));
    }

    #[test]
    fn llama_cpp_s_context_refusal_is_a_conversation_too_long() {
        let too_long =
            || InferenceError::InvalidArgument("the conversation is too long for the model".into());
        // llama-server's answer to a prompt over a slot's context, verbatim.
        let body = br#"{"error":{"code":400,"message":"request (1959 tokens) exceeds the available context size (1024 tokens), try increasing it","type":"exceed_context_size_error","n_prompt_tokens":1959,"n_ctx":1024}}"#;
        assert_eq!(context_too_long(&error_message(body)), Some(too_long()));
        let unsplittable = r#"{"error":{"code":400,"message":"input (2000 tokens) is larger than the max context size (1024 tokens). skipping","type":"exceed_context_size_error"}}"#;
        assert_eq!(parse_event(unsplittable), Err(too_long()));
        assert_eq!(context_too_long("the request is bad"), None);
    }

    #[test]
    fn error_bodies_in_every_shape() {
        assert_eq!(
            error_message(br#"{"error":{"message":"new","code":400}}"#),
            "new"
        );
        assert_eq!(
            error_message(br#"{"object":"error","message":"old","code":400}"#),
            "old"
        );
        assert_eq!(
            error_message(br#"{"error":"Unauthorized"}"#),
            "Unauthorized"
        );
        assert_eq!(error_message(br#"{"detail":"nope"}"#), "nope");
        assert_eq!(error_message(b" plain text \n"), "plain text");
    }

    #[test]
    fn request_ids() {
        assert_eq!(request_id_header("req-1"), "req-1");
        let fresh = request_id_header("");
        assert!(fresh.to_str().unwrap().starts_with("palaver-"));
        assert!(request_id_header("bad\nid")
            .to_str()
            .unwrap()
            .starts_with("palaver-"));
    }

    #[test]
    fn quotes_are_bounded() {
        let long = "word ".repeat(500);
        assert!(quote(&long).chars().count() <= MAX_QUOTED + 1);
        assert_eq!(quote("a\n  b"), "a b");
    }
}
