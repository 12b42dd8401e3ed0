//! The gRPC `Inference` service: checks requests, sends them through the
//! admission stack, and returns or streams the reply.

use std::pin::Pin;

use futures::{Stream, StreamExt};
use palaver_core::projects::ProjectSettings;
use palaver_core::trace_context;
use palaver_proto::inference::v1::inference_server::Inference;
use palaver_proto::inference::v1::{GenerateChunk, GenerateReply, GenerateRequest};
use tonic::{Request, Response, Status};
use tower::ServiceExt;
use tracing::field::Empty;
use tracing::Instrument as _;

use crate::backend::{Backend, Chunk, GenerateParams, Message, Role, TokenStream};
use crate::error::InferenceError;
use crate::limit::Admission;
use crate::metrics::{Metrics, Outcome};

/// The outbound stack every generation goes through.
pub type Stack = Admission<Backend>;

/// Implementation of `palaver.inference.v1.Inference`.
#[derive(Clone)]
pub struct InferenceService {
    stack: Stack,
    metrics: Metrics,
    max_tokens_limit: u32,
}

impl InferenceService {
    /// Serves generations through `stack`, counting calls in `metrics`;
    /// refuses a `max_tokens` above `max_tokens_limit`.
    pub fn new(stack: Stack, metrics: Metrics, max_tokens_limit: u32) -> Self {
        Self {
            stack,
            metrics,
            max_tokens_limit,
        }
    }

    /// Validates, then waits for a slot and starts the generation.
    async fn start(
        &self,
        req: GenerateRequest,
        record: &mut CallRecord,
    ) -> Result<TokenStream, Status> {
        let params = validate(req, self.max_tokens_limit).map_err(|e| record.fail(e))?;
        tracing::debug!(
            request_id = %params.request_id,
            messages = params.messages.len(),
            max_tokens = params.max_tokens,
            "generation requested"
        );
        self.stack
            .clone()
            .oneshot(params)
            .await
            .map_err(|e| record.fail(e))
    }
}

/// Stream type of `GenerateStream`.
pub type ChunkStream = Pin<Box<dyn Stream<Item = Result<GenerateChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Inference for InferenceService {
    async fn generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<GenerateReply>, Status> {
        // If the client goes away, tonic drops this future and with it the
        // backend stream: the HTTP request to vLLM is aborted.
        let mut trace = GenerationTrace::new(&request);
        let span = trace.span.clone();
        async move {
            let mut record = CallRecord::new(&self.metrics, request.get_ref().affinity_key.clone());
            let mut stream = self.start(request.into_inner(), &mut record).await?;
            let mut reply = GenerateReply::default();
            while let Some(item) = stream.next().await {
                let chunk = item.map_err(|e| record.fail(e))?;
                trace.chunk(&chunk);
                reply.text.push_str(&chunk.delta);
                if let Some(finish) = chunk.finish_reason {
                    reply.finish_reason = finish;
                    reply.usage = chunk.usage;
                    record.succeed();
                    return Ok(Response::new(reply));
                }
            }
            Err(record.fail(unfinished()))
        }
        .instrument(span)
        .await
    }

    type GenerateStreamStream = ChunkStream;

    async fn generate_stream(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        let mut trace = GenerationTrace::new(&request);
        let mut record = CallRecord::new(&self.metrics, request.get_ref().affinity_key.clone());
        let mut stream = self
            .start(request.into_inner(), &mut record)
            .instrument(trace.span.clone())
            .await?;
        // The backend stream lives inside the response stream: when the
        // client goes away tonic drops it, which drops the HTTP request to
        // vLLM and frees the slot. No task is spawned that could outlive it.
        let out = async_stream::stream! {
            while let Some(item) = stream.next().await {
                match item {
                    Ok(chunk) => {
                        trace.chunk(&chunk);
                        let last = chunk.finish_reason.is_some();
                        yield Ok(GenerateChunk {
                            delta: chunk.delta,
                            finish_reason: chunk.finish_reason.unwrap_or_default(),
                            usage: chunk.usage,
                        });
                        if last {
                            record.succeed();
                            return;
                        }
                    }
                    Err(e) => {
                        yield Err(record.fail(e));
                        return;
                    }
                }
            }
            yield Err(record.fail(unfinished()));
        };
        Ok(Response::new(Box::pin(out)))
    }
}

/// The `generation` span of a call (a child of session-svc's `generate`)
/// and what it records: time to first token, finish reason, token counts.
/// The model is recorded by the backend, inside the span.
struct GenerationTrace {
    span: tracing::Span,
    /// When the call arrived; `None` once the first token is recorded, or
    /// when the span is off.
    started: Option<std::time::Instant>,
}

impl GenerationTrace {
    fn new(request: &Request<GenerateRequest>) -> Self {
        let span = tracing::debug_span!(
            "generation",
            request_id = %request.get_ref().request_id,
            model = Empty,
            ttft_ms = Empty,
            finish_reason = Empty,
            prompt_tokens = Empty,
            completion_tokens = Empty,
            trace_id = Empty,
        );
        trace_context::adopt(&span, trace_context::remote_parent(request.extensions()));
        let started = (!span.is_disabled()).then(std::time::Instant::now);
        Self { span, started }
    }

    fn chunk(&mut self, chunk: &Chunk) {
        if self.span.is_disabled() {
            return;
        }
        if !chunk.delta.is_empty() {
            if let Some(started) = self.started.take() {
                self.span
                    .record("ttft_ms", started.elapsed().as_secs_f64() * 1e3);
            }
        }
        if let Some(finish) = &chunk.finish_reason {
            self.span.record("finish_reason", finish.as_str());
        }
        if let Some(usage) = &chunk.usage {
            self.span.record("prompt_tokens", usage.prompt_tokens);
            self.span
                .record("completion_tokens", usage.completion_tokens);
        }
    }
}

fn unfinished() -> InferenceError {
    InferenceError::Backend("the reply ended without a finish reason".into())
}

/// Counts one call exactly once: as ok, as an error, or (when dropped
/// undecided, i.e. the client left) as cancelled.
struct CallRecord {
    metrics: Metrics,
    affinity_key: String,
    decided: bool,
}

impl CallRecord {
    fn new(metrics: &Metrics, affinity_key: String) -> Self {
        Self {
            metrics: metrics.clone(),
            affinity_key,
            decided: false,
        }
    }

    fn succeed(&mut self) {
        if !std::mem::replace(&mut self.decided, true) {
            self.metrics.record(Outcome::Ok);
        }
    }

    fn fail(&mut self, e: InferenceError) -> Status {
        if !std::mem::replace(&mut self.decided, true) {
            self.metrics.record(Outcome::Error);
            self.metrics.record_error(e.kind());
            match &e {
                e if e.is_overload() => {
                    tracing::info!(session = %self.affinity_key, error = %e, "generation refused")
                }
                InferenceError::InvalidArgument(_) => {
                    tracing::debug!(session = %self.affinity_key, error = %e, "bad generation request")
                }
                _ => tracing::warn!(session = %self.affinity_key, error = %e, "generation failed"),
            }
        }
        e.into()
    }
}

impl Drop for CallRecord {
    fn drop(&mut self) {
        if !self.decided {
            tracing::debug!(session = %self.affinity_key, "caller left before the reply finished");
            self.metrics.record(Outcome::Cancelled);
        }
    }
}

/// Turns the wire request into [`GenerateParams`], refusing what no model
/// should get. Missing sampling falls back to palaver's defaults so a bare
/// `grpcurl` call works; a present one is taken as is (0 means 0).
pub fn validate(
    req: GenerateRequest,
    max_tokens_limit: u32,
) -> Result<GenerateParams, InferenceError> {
    let bad = |m: String| Err(InferenceError::InvalidArgument(m));
    if req.messages.is_empty() {
        return bad("the request has no messages".into());
    }
    let mut messages = Vec::with_capacity(req.messages.len());
    for (i, m) in req.messages.into_iter().enumerate() {
        let Some(role) = Role::parse(&m.role) else {
            return bad(format!(
                "message {i} has role {:?}; expected system, user or assistant",
                m.role
            ));
        };
        messages.push(Message {
            role,
            content: m.content,
        });
    }
    let (temperature, top_p, max_tokens) = match req.sampling {
        Some(s) => (s.temperature, s.top_p, s.max_tokens),
        None => {
            let d = ProjectSettings::default();
            (d.temperature, d.top_p, d.max_tokens)
        }
    };
    if !(0.0..=2.0).contains(&temperature) {
        return bad(format!("temperature {temperature} is outside 0..=2"));
    }
    if !(top_p > 0.0 && top_p <= 1.0) {
        return bad(format!("top_p {top_p} is outside (0, 1]"));
    }
    if max_tokens == 0 {
        return bad("max_tokens must be at least 1".into());
    }
    if max_tokens > max_tokens_limit {
        return bad(format!(
            "max_tokens {max_tokens} is above this server's limit of {max_tokens_limit}"
        ));
    }
    Ok(GenerateParams {
        messages,
        temperature,
        top_p,
        max_tokens,
        request_id: req.request_id,
        affinity_key: req.affinity_key,
        client: req.client,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn validate_(req: GenerateRequest) -> Result<GenerateParams, InferenceError> {
        validate(req, 4096)
    }

    #[test]
    fn refuses_max_tokens_above_the_limit() {
        let err = validate(request("user", sampling(0.0, 1.0, u32::MAX)), 4096).unwrap_err();
        assert!(matches!(err, InferenceError::InvalidArgument(_)), "{err:?}");
        assert!(validate(request("user", sampling(0.0, 1.0, 4096)), 4096).is_ok());
    }
    use palaver_proto::inference::v1::{ChatMessage, Sampling};

    fn request(role: &str, sampling: Option<Sampling>) -> GenerateRequest {
        GenerateRequest {
            messages: vec![ChatMessage {
                role: role.into(),
                content: "hi".into(),
            }],
            sampling,
            request_id: "r1".into(),
            affinity_key: "s1".into(),
            client: String::new(),
        }
    }

    fn sampling(temperature: f32, top_p: f32, max_tokens: u32) -> Option<Sampling> {
        Some(Sampling {
            temperature,
            top_p,
            max_tokens,
        })
    }

    #[test]
    fn accepts_good_requests() {
        let p = validate_(request("user", sampling(0.0, 1.0, 1))).unwrap();
        assert_eq!((p.temperature, p.top_p, p.max_tokens), (0.0, 1.0, 1));
        assert_eq!(p.messages[0].role, Role::User);
        let p = validate_(request("system", None)).unwrap();
        assert_eq!((p.temperature, p.top_p, p.max_tokens), (0.6, 0.9, 512));
    }

    #[test]
    fn refuses_bad_requests() {
        let cases = [
            request("tool", sampling(0.6, 0.9, 10)),
            request("user", sampling(2.5, 0.9, 10)),
            request("user", sampling(-0.1, 0.9, 10)),
            request("user", sampling(f32::NAN, 0.9, 10)),
            request("user", sampling(0.6, 0.0, 10)),
            request("user", sampling(0.6, 1.1, 10)),
            request("user", sampling(0.6, 0.9, 0)),
            GenerateRequest::default(),
        ];
        for req in cases {
            let shown = format!("{req:?}");
            assert!(
                matches!(validate_(req), Err(InferenceError::InvalidArgument(_))),
                "accepted {shown}"
            );
        }
    }
}
