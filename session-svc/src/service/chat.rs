//! `Chat` and `ChatStream`: validation, phase 1 in the turn engine,
//! inference-svc between the two atomic phases, then phase 3.

use std::time::Duration;

use futures::StreamExt as _;
use palaver_proto::inference::v1 as inf;
use palaver_proto::session::v1 as pb;
use rand::Rng;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use palaver_core::projects::ProjectSettings;
use palaver_core::trace_context;
use tracing::field::Empty;
use tracing::Instrument as _;

use super::{EventStream, SessionService};
use crate::dialog::Role;
use crate::error::SessionError;
use crate::running;
use crate::store::Store;
use crate::turn::{Awaited, LogSafe, NewTurn, Prepared, TurnOwner};
use crate::validate::{max_tokens, validate_chat};

/// A span of one of the atomic phases, which says how many swaps lost to
/// another and were tried again.
macro_rules! phase_span {
    ($name:literal) => {
        tracing::debug_span!($name, swap_retries = Empty)
    };
}

/// Deadline of a turn whose caller set none: the gateway's default.
const DEFAULT_DEADLINE: Duration = Duration::from_secs(120);
/// Times a retry may find its turn gone and begin again.
const MAX_BEGINS: usize = 3;

impl<S: Store> SessionService<S> {
    /// `Chat`: one turn, answered whole; a cancel drops it.
    pub(super) async fn chat_unary(
        &self,
        request: Request<pb::ChatRequest>,
    ) -> Result<Response<pb::ChatReply>, Status> {
        let _in_flight = self.turns.metrics().turn_started();
        let deadline = deadline_of(request.metadata());
        let parent = trace_context::remote_parent(request.extensions());
        let req = request.into_inner();
        let span = turn_span(&req);
        trace_context::adopt(&span, parent);
        let entry = self
            .running
            .register(&req.project, &req.session_id, &req.request_id);
        let cancel = entry
            .as_ref()
            .map(|e| e.token().clone())
            .unwrap_or_default();
        async {
            tokio::select! {
                r = self.chat_inner(req, deadline) => r.map(Response::new).map_err(|e| self.fail(e)),
                // Dropping the turn takes it back, as a caller leaving does.
                _ = cancel.cancelled() => {
                    self.count_turn("cancelled");
                    Err(running::cancelled())
                }
            }
        }
        .instrument(span)
        .await
    }

    /// `ChatStream`: one turn as events (`accepted`, deltas, `done`).
    pub(super) async fn chat_events(
        &self,
        request: Request<pb::ChatRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let deadline = deadline_of(request.metadata());
        let parent = trace_context::remote_parent(request.extensions());
        let req = request.into_inner();
        // Refuse bad input as a plain error, before any stream exists.
        let settings = self.turns.project(&req.project).map_err(|e| self.fail(e))?;
        validate_chat(&req, settings.max_message_chars).map_err(|e| self.fail(e))?;
        let (tx, mut rx) = mpsc::channel(64);
        let this = self.clone();
        let in_flight = self.turns.metrics().turn_started();
        let entry = self
            .running
            .register(&req.project, &req.session_id, &req.request_id);
        let span = turn_span(&req);
        trace_context::adopt(&span, parent);
        tokio::spawn(
            async move {
                let _in_flight = in_flight;
                let cancel = entry
                    .as_ref()
                    .map(|e| e.token().clone())
                    .unwrap_or_default();
                tokio::select! {
                    // Dropping the turn takes it back, as a caller leaving does.
                    _ = cancel.cancelled() => {
                        this.count_turn("cancelled");
                        let _ = tx.send(Err(running::cancelled())).await;
                    }
                    outcome = this.stream_inner(req, deadline, &tx) => {
                        if let Err(e) = outcome {
                            let _ = tx.send(Err(this.fail(e))).await;
                        }
                    }
                    // The caller left (deadline, disconnect): dropping the turn
                    // cancels the generation and its owner takes the message
                    // back, as a dropped unary call does.
                    _ = tx.closed() => {}
                }
            }
            .instrument(span),
        );
        // Answer with the turn's first event in hand: the response headers
        // then leave with `accepted` in one write (not alone first, waking
        // the caller for nothing), and a turn refused at the door (rate
        // limit, busy, store down) is a plain error status, as bad input is.
        // Dropping this future (the caller left) drops `rx`, which the
        // turn's task notices as above.
        match rx.recv().await {
            Some(Ok(first)) => {
                let rest = ReceiverStream::new(rx);
                Ok(Response::new(Box::pin(
                    tokio_stream::once(Ok(first)).chain(rest),
                )))
            }
            Some(Err(status)) => Err(status),
            // Only if the turn's task panicked: it always sends first.
            None => Err(Status::internal("the turn ended before it began")),
        }
    }

    /// Phase 1 for `owner`. A refusal that wrote nothing (rate limit, busy,
    /// bad input) settles the owner; a store failure leaves it armed, since
    /// the swap may have gone through before the answer was lost.
    async fn prepare(
        &self,
        req: &pb::ChatRequest,
        owner: TurnOwner<S>,
        deadline: Instant,
    ) -> Result<(Prepared, TurnOwner<S>), SessionError> {
        match self.turns.prepare(&new_turn(req, deadline), &owner).await {
            Ok(prepared) => Ok((prepared, owner)),
            Err(e) => {
                if !matches!(e, SessionError::Store(_)) {
                    owner.forget();
                }
                Err(e)
            }
        }
    }

    /// What a retry of a turn in flight gets: that turn's reply or error, or
    /// (its process dead) the turn itself to generate; `None`: the turn is
    /// gone and the request may begin again.
    async fn await_turn(
        &self,
        req: &pb::ChatRequest,
        settings: &ProjectSettings,
        theirs: String,
        owner: TurnOwner<S>,
        deadline: Instant,
    ) -> Result<Option<Resumed<S>>, SessionError> {
        let awaited = self
            .turns
            .await_turn(&new_turn(req, deadline), &req.request_id, theirs, &owner)
            .await?;
        Ok(match awaited {
            Awaited::Generate { messages } => Some(Resumed::Generate(
                self.generation(req, settings, messages, owner),
            )),
            Awaited::Reply(text) => {
                owner.forget();
                Some(Resumed::Replay(text))
            }
            Awaited::Failed(status) => {
                owner.forget();
                return Err(SessionError::Inference(status));
            }
            Awaited::Gone => {
                owner.forget();
                None
            }
        })
    }

    /// Phase 1 until it says what to do: generate (this request owns a
    /// turn), or replay a stored reply. `accepted` is called once, as soon
    /// as the request's place in the session is settled.
    async fn begin(
        &self,
        req: &pb::ChatRequest,
        deadline: Instant,
        mut accepted: impl FnMut(),
    ) -> Result<Resumed<S>, SessionError> {
        let settings = self.turns.project(&req.project)?;
        validate_chat(req, settings.max_message_chars)?;
        // A retry whose turn vanished (its caller left) begins again; a
        // bound keeps a pathological clear-retry race from looping.
        for _ in 0..MAX_BEGINS {
            let owner = self.turns.owner(&req.project, &req.session_id);
            let (prepared, owner) = self.prepare(req, owner, deadline).await?;
            accepted();
            match prepared {
                Prepared::Replay(text) => {
                    owner.forget();
                    return Ok(Resumed::Replay(text));
                }
                Prepared::Generate { messages } => {
                    return Ok(Resumed::Generate(
                        self.generation(req, settings, messages, owner),
                    ))
                }
                Prepared::InFlight { attempt } => {
                    if let Some(resumed) = self
                        .await_turn(req, settings, attempt, owner, deadline)
                        .await?
                    {
                        return Ok(resumed);
                    }
                }
            }
        }
        Err(SessionError::LockTimeout)
    }

    /// The inference request for the turn `owner` owns.
    fn generation(
        &self,
        req: &pb::ChatRequest,
        settings: &ProjectSettings,
        messages: Vec<(Role, String)>,
        owner: TurnOwner<S>,
    ) -> Generation<S> {
        let request = inf::GenerateRequest {
            messages: messages
                .into_iter()
                .map(|(role, content)| inf::ChatMessage {
                    role: role.as_str().to_owned(),
                    content,
                })
                .collect(),
            sampling: Some(inf::Sampling {
                temperature: req.temperature.unwrap_or(settings.temperature),
                top_p: req.top_p.unwrap_or(settings.top_p),
                max_tokens: max_tokens(req.max_tokens, settings.max_tokens),
            }),
            // Unique per attempt: vLLM refuses duplicate ids in flight.
            request_id: format!("palaver-{:016x}", rand::rng().random::<u64>()),
            // Unique across projects: routers in front of several model
            // servers see it as the session (x-session-id, OpenAI `user`).
            affinity_key: format!("{}/{}", req.project, req.session_id),
            client: req.client.clone(),
        };
        Generation { request, owner }
    }

    /// Phase 3, or taking the turn back when generation failed.
    async fn finish(
        &self,
        req: &pb::ChatRequest,
        owner: TurnOwner<S>,
        outcome: Result<String, Status>,
        deadline: Instant,
    ) -> Result<String, SessionError> {
        match outcome {
            Ok(text) => match owner.store_reply(&text, deadline).await {
                Ok(()) => {
                    self.count_turn("ok");
                    Ok(text)
                }
                Err(e) => {
                    // Delivered but not stored would leave its message
                    // unanswered in history: the turn is taken back instead.
                    tracing::error!(
                        error = %e,
                        turn = %LogSafe(&req.project, &req.session_id),
                        request = %req.request_id.escape_debug(),
                        "reply not stored; the turn is taken back"
                    );
                    Err(e)
                }
            },
            Err(status) => {
                owner.fail(&status, deadline).await;
                Err(SessionError::Inference(status))
            }
        }
    }

    async fn chat_inner(
        &self,
        req: pb::ChatRequest,
        deadline: Instant,
    ) -> Result<pb::ChatReply, SessionError> {
        match self
            .begin(&req, deadline, || {})
            .instrument(phase_span!("phase1"))
            .await?
        {
            Resumed::Replay(text) => {
                self.count_turn("replay");
                Ok(reply(&req, text, "stop", None))
            }
            Resumed::Generate(g) => self.generate_and_store(&req, g, deadline).await,
        }
    }

    /// Phases 2 and 3 with a unary generation.
    async fn generate_and_store(
        &self,
        req: &pb::ChatRequest,
        g: Generation<S>,
        deadline: Instant,
    ) -> Result<pb::ChatReply, SessionError> {
        let generated = Instant::now();
        let mut backoff = InferenceBackoff::new(deadline);
        let result = async {
            loop {
                match self.inference.clone().generate(g.request.clone()).await {
                    Err(s) if inference_unreachable(&s) && backoff.wait().await => {
                        tracing::warn!(
                            error = %s,
                            turn = %LogSafe(&req.project, &req.session_id),
                            "inference-svc unreachable; asking again"
                        );
                    }
                    Err(s) if inference_unreachable(&s) => {
                        break Err(Status::unavailable(format!(
                            "inference-svc unreachable: {s}"
                        )))
                    }
                    r => break r,
                }
            }
        }
        .instrument(tracing::debug_span!("generate"))
        .await;
        self.turns.observe_phase("generate", generated);
        let (result, meta) = match result {
            Ok(r) => {
                let r = r.into_inner();
                let meta = (r.finish_reason, r.usage);
                (Ok(r.text), Some(meta))
            }
            Err(s) => (Err(s), None),
        };
        let text = self
            .finish(req, g.owner, result, deadline)
            .instrument(phase_span!("phase3"))
            .await?;
        let (finish, usage) = meta.unwrap_or_default();
        Ok(reply(req, text, &finish, usage))
    }

    async fn stream_inner(
        &self,
        req: pb::ChatRequest,
        deadline: Instant,
        tx: &mpsc::Sender<Result<pb::ChatEvent, Status>>,
    ) -> Result<(), SessionError> {
        let (accepted_tx, accepted_rx) = tokio::sync::oneshot::channel();
        let mut accepted_tx = Some(accepted_tx);
        // Sent once the request's place is settled; dropped unsent (when
        // phase 1 fails) it lets `accepted` end without an event.
        let accepted = async {
            if accepted_rx.await.is_ok() {
                let ev = pb::ChatEvent {
                    event: Some(pb::chat_event::Event::Accepted(pb::Accepted {})),
                };
                // The caller leaving is noticed by the task's select.
                let _ = tx.send(Ok(ev)).await;
            }
        };
        let begun = self
            .begin(&req, deadline, move || {
                if let Some(t) = accepted_tx.take() {
                    let _ = t.send(());
                }
            })
            .instrument(phase_span!("phase1"));
        // `accepted` goes out while a retry still waits for its turn.
        let (begun, ()) = tokio::join!(begun, accepted);
        let g = match begun? {
            Resumed::Replay(text) => {
                self.count_turn("replay");
                let done = reply(&req, text, "stop", None);
                let _ = tx.send(Ok(event_done(done))).await;
                return Ok(());
            }
            Resumed::Generate(g) => g,
        };
        if req.final_only {
            let done = self.generate_and_store(&req, g, deadline).await?;
            let _ = tx.send(Ok(event_done(done))).await;
            return Ok(());
        }
        let generated = Instant::now();
        let mut text = String::new();
        let mut finish = String::new();
        let mut usage = None;
        let mut caller_left = false;
        let outcome: Result<(), Status> = async {
            let mut stream = self
                .inference
                .clone()
                .generate_stream(g.request)
                .await?
                .into_inner();
            while let Some(chunk) = stream.message().await? {
                if !chunk.delta.is_empty() {
                    text.push_str(&chunk.delta);
                    let ev = pb::ChatEvent {
                        event: Some(pb::chat_event::Event::Delta(chunk.delta)),
                    };
                    if tx.send(Ok(ev)).await.is_err() {
                        // The caller left: dropping `stream` cancels the
                        // generation, and the owner takes the turn back.
                        caller_left = true;
                        return Err(Status::cancelled("caller went away"));
                    }
                }
                if !chunk.finish_reason.is_empty() {
                    finish = chunk.finish_reason;
                }
                if chunk.usage.is_some() {
                    usage = chunk.usage;
                }
            }
            Ok(())
        }
        .instrument(tracing::debug_span!("generate"))
        .await;
        self.turns.observe_phase("generate", generated);
        if caller_left {
            return Ok(()); // dropping the owner takes the turn back
        }
        let text = self
            .finish(&req, g.owner, outcome.map(|()| text), deadline)
            .instrument(phase_span!("phase3"))
            .await?;
        let _ = tx
            .send(Ok(event_done(reply(&req, text, &finish, usage))))
            .await;
        Ok(())
    }
}

/// The span of a turn in session-svc, a child of the gateway's (see
/// `palaver_core::telemetry`); debug, so that it costs nothing in logs.
fn turn_span(req: &pb::ChatRequest) -> tracing::Span {
    tracing::debug_span!(
        "turn",
        project = %req.project,
        session_id = ?req.session_id,
        request_id = ?req.request_id,
        trace_id = Empty,
    )
}

/// A failure of the connection to inference-svc itself (the process died,
/// restarts or is not up yet), as opposed to an answer from it: tonic keeps
/// the transport error as the status's source. No generation of the turn
/// runs there any more, so asking again starts no second one.
fn inference_unreachable(status: &Status) -> bool {
    std::error::Error::source(status).is_some()
}

/// Waits between attempts to reach inference-svc, doubling from
/// [`InferenceBackoff::FIRST`] up to [`InferenceBackoff::MAX`], while a
/// retry can still finish before the turn's deadline.
struct InferenceBackoff {
    next: Duration,
    deadline: Instant,
}

impl InferenceBackoff {
    const FIRST: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(1);
    /// Left for the generation itself and storing its reply.
    const MARGIN: Duration = Duration::from_secs(2);

    fn new(deadline: Instant) -> Self {
        Self {
            next: Self::FIRST,
            deadline,
        }
    }

    /// Sleeps before the next attempt; false (at once) when that attempt
    /// would start too close to the deadline.
    async fn wait(&mut self) -> bool {
        if Instant::now() + self.next + Self::MARGIN > self.deadline {
            return false;
        }
        tokio::time::sleep(self.next).await;
        self.next = (self.next * 2).min(Self::MAX);
        true
    }
}

/// Where a request goes after phase 1.
enum Resumed<S: Store> {
    Replay(String),
    Generate(Generation<S>),
}

/// A turn this request owns, with its inference request.
struct Generation<S: Store> {
    request: inf::GenerateRequest,
    owner: TurnOwner<S>,
}

fn new_turn(req: &pb::ChatRequest, deadline: Instant) -> NewTurn<'_> {
    NewTurn {
        project: &req.project,
        session_id: &req.session_id,
        message: &req.message,
        request_id: non_empty(&req.request_id),
        system_prompt: req.system_prompt.as_deref(),
        client: non_empty(&req.client),
        deadline,
    }
}

/// A turn's deadline: the caller's `grpc-timeout`, else [`DEFAULT_DEADLINE`].
fn deadline_of(metadata: &tonic::metadata::MetadataMap) -> Instant {
    let timeout = metadata
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout)
        .unwrap_or(DEFAULT_DEADLINE);
    Instant::now() + timeout
}

/// `grpc-timeout`: at most 8 digits and a unit (H, M, S, m, u, n).
fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

fn reply(
    req: &pb::ChatRequest,
    text: String,
    finish: &str,
    usage: Option<inf::Usage>,
) -> pb::ChatReply {
    let usage = usage.unwrap_or_default();
    pb::ChatReply {
        text,
        session_id: req.session_id.clone(),
        finish_reason: finish.to_owned(),
        prompt_tokens: usage.prompt_tokens,
        completion_tokens: usage.completion_tokens,
    }
}

fn event_done(r: pb::ChatReply) -> pb::ChatEvent {
    pb::ChatEvent {
        event: Some(pb::chat_event::Event::Done(r)),
    }
}

fn non_empty(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_dead_inference_svc_reads_as_unreachable_an_answer_from_it_does_not() {
        // Nothing listens on a port just freed: the connection is refused.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
            .unwrap()
            .connect_lazy();
        let mut client =
            palaver_proto::inference::v1::inference_client::InferenceClient::new(channel);
        let refused = client
            .generate(inf::GenerateRequest::default())
            .await
            .unwrap_err();
        assert!(inference_unreachable(&refused), "{refused:?}");
        assert!(!inference_unreachable(&Status::unavailable(
            "the model is down"
        )));
        assert!(!inference_unreachable(&Status::internal("backend")));
    }

    #[tokio::test]
    async fn inference_retries_back_off_and_stop_before_the_deadline() {
        let start = Instant::now();
        let mut b = InferenceBackoff::new(start + Duration::from_millis(2500));
        let mut waits = 0;
        while b.wait().await {
            waits += 1;
        }
        // 0.1 s, 0.2 s; then 0.4 s more would start past the deadline less the margin.
        assert_eq!(waits, 2);
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(300), "{took:?}");
        assert!(took < Duration::from_millis(2500), "{took:?}");
        let mut late = InferenceBackoff::new(Instant::now() + Duration::from_secs(1));
        assert!(!late.wait().await, "no retry within the margin");
    }
}
