//! The gRPC `Sessions` service: validation, then the turn engine, then
//! inference-svc between the two locked phases.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt as _};
use palaver_proto::inference::v1 as inf;
use palaver_proto::session::v1 as pb;
use palaver_proto::session::v1::sessions_server::Sessions;
use rand::Rng;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;

use tonic::{Request, Response, Status};

use palaver_core::projects::ProjectSettings;

use crate::balance::Balancer;
use crate::dialog::{random_first_seq, Dialog, Role};
use crate::error::SessionError;
use crate::metrics::{KindLabel, OutcomeLabel};
use crate::running::{self, Running};
use crate::store::{SessionId, Store};
use crate::turn::{Awaited, LogSafe, NewTurn, Prepared, TurnEngine, TurnOwner};
use crate::validate::{
    invalid, max_tokens, validate_chat, validate_session_id, MAX_ID_BYTES, MAX_SYSTEM_PROMPT_CHARS,
};

/// Deadline of a turn whose caller set none: the gateway's default.
const DEFAULT_DEADLINE: Duration = Duration::from_secs(120);
/// Longest lease: a holder that dies keeps others out for at most this.
const MAX_LEASE_TTL: Duration = Duration::from_secs(600);
/// Times a retry may find its turn gone and begin again.
const MAX_BEGINS: usize = 3;
/// Sessions a project-wide clear or delete works on at once.
const PROJECT_ACTION_CONCURRENCY: usize = 16;

/// The `Sessions` gRPC service over a store.
pub struct SessionService<S: Store> {
    turns: Arc<TurnEngine<S>>,
    inference: Balancer,
    /// The turns `CancelTurn` can stop.
    running: Arc<Running>,
}

impl<S: Store> Clone for SessionService<S> {
    fn clone(&self) -> Self {
        Self {
            turns: self.turns.clone(),
            inference: self.inference.clone(),
            running: self.running.clone(),
        }
    }
}

impl<S: Store> SessionService<S> {
    pub fn new(turns: Arc<TurnEngine<S>>, inference: Balancer) -> Self {
        Self {
            turns,
            inference,
            running: Arc::default(),
        }
    }

    fn count_error(&self, e: &SessionError) {
        self.turns
            .metrics()
            .errors
            .get_or_create(&KindLabel { kind: e.kind() })
            .inc();
    }

    fn count_turn(&self, outcome: &'static str) {
        self.turns
            .metrics()
            .turns
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
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

    /// A configured project's settings and a valid session address, or the
    /// INVALID_ARGUMENT status saying which is wrong.
    fn address<'a>(
        &self,
        project: &'a str,
        session_id: &'a str,
    ) -> Result<(&ProjectSettings, SessionId<'a>), Status> {
        let settings = self.turns.project(project).map_err(|e| self.fail(e))?;
        validate_session_id(session_id).map_err(|e| self.fail(e))?;
        Ok((
            settings,
            SessionId {
                project,
                session_id,
            },
        ))
    }

    fn fail(&self, e: SessionError) -> Status {
        self.count_error(&e);
        self.count_turn("error");
        if matches!(e, SessionError::Store(_)) {
            tracing::error!(error = %e, "store failure");
        }
        e.into()
    }

    async fn chat_inner(
        &self,
        req: pb::ChatRequest,
        deadline: Instant,
    ) -> Result<pb::ChatReply, SessionError> {
        match self.begin(&req, deadline, || {}).await? {
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
        let result = loop {
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
        };
        self.turns.observe_phase("generate", generated);
        let (result, meta) = match result {
            Ok(r) => {
                let r = r.into_inner();
                let meta = (r.finish_reason, r.usage);
                (Ok(r.text), Some(meta))
            }
            Err(s) => (Err(s), None),
        };
        let text = self.finish(req, g.owner, result, deadline).await?;
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
        let begun = self.begin(&req, deadline, move || {
            if let Some(t) = accepted_tx.take() {
                let _ = t.send(());
            }
        });
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
        .await;
        self.turns.observe_phase("generate", generated);
        if caller_left {
            return Ok(()); // dropping the owner takes the turn back
        }
        let text = self
            .finish(&req, g.owner, outcome.map(|()| text), deadline)
            .await?;
        let _ = tx
            .send(Ok(event_done(reply(&req, text, &finish, usage))))
            .await;
        Ok(())
    }
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

fn history_message((role, content): (Role, String)) -> pb::HistoryMessage {
    let role = match role {
        Role::System => pb::Role::System,
        Role::User => pb::Role::User,
        Role::Assistant => pb::Role::Assistant,
    };
    pb::HistoryMessage {
        role: role as i32,
        content,
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::ChatEvent, Status>> + Send>>;

#[tonic::async_trait]
impl<S: Store> Sessions for SessionService<S> {
    async fn chat(
        &self,
        request: Request<pb::ChatRequest>,
    ) -> Result<Response<pb::ChatReply>, Status> {
        let _in_flight = self.turns.metrics().turn_started();
        let deadline = deadline_of(request.metadata());
        let req = request.into_inner();
        let entry = self
            .running
            .register(&req.project, &req.session_id, &req.request_id);
        let cancel = entry
            .as_ref()
            .map(|e| e.token().clone())
            .unwrap_or_default();
        tokio::select! {
            r = self.chat_inner(req, deadline) => r.map(Response::new).map_err(|e| self.fail(e)),
            // Dropping the turn takes it back, as a caller leaving does.
            _ = cancel.cancelled() => {
                self.count_turn("cancelled");
                Err(running::cancelled())
            }
        }
    }

    type ChatStreamStream = EventStream;

    async fn chat_stream(
        &self,
        request: Request<pb::ChatRequest>,
    ) -> Result<Response<Self::ChatStreamStream>, Status> {
        let deadline = deadline_of(request.metadata());
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
        tokio::spawn(async move {
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
        });
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

    async fn get_history(
        &self,
        request: Request<pb::SessionRef>,
    ) -> Result<Response<pb::History>, Status> {
        let r = request.into_inner();
        let (settings, id) = self.address(&r.project, &r.session_id)?;
        let store = self.turns.store();
        let (dialog, project_prompt) =
            tokio::join!(store.load(id), store.project_prompt(&r.project));
        // No dialog reads as an empty one; its numbering is never used.
        let dialog = dialog
            .map_err(|e| self.fail(e.into()))?
            .unwrap_or_else(|| Dialog::starting_at(0));
        let project_prompt = project_prompt.map_err(|e| self.fail(e.into()))?;
        let system_prompt = dialog
            .system_prompt
            .clone()
            .or(project_prompt)
            .unwrap_or_else(|| settings.system_prompt.clone());
        Ok(Response::new(pb::History {
            system_prompt,
            messages: dialog.history().into_iter().map(history_message).collect(),
        }))
    }

    async fn reset_session(
        &self,
        request: Request<pb::ResetSessionRequest>,
    ) -> Result<Response<pb::ResetSessionReply>, Status> {
        let r = request.into_inner();
        let (settings, id) = self.address(&r.project, &r.session_id)?;
        // The limit a chat's system prompt has: a reset is no way around it.
        if let Some(p) = &r.system_prompt {
            if p.chars().count() > MAX_SYSTEM_PROMPT_CHARS {
                return Err(self.fail(invalid(format!(
                    "system prompt is too long (at most {MAX_SYSTEM_PROMPT_CHARS} characters)"
                ))));
            }
        }
        let (prompt, keep_history) = (r.system_prompt, r.keep_history);
        self.turns
            .locked(id, settings.session_ttl, move |d| {
                if let Some(p) = prompt {
                    d.get_or_insert_with(|| Dialog::starting_at(random_first_seq()))
                        .system_prompt = Some(p);
                }
                if let (Some(d), false) = (d, keep_history) {
                    d.clear();
                }
            })
            .await
            .map_err(|e| self.fail(e))?;
        Ok(Response::new(pb::ResetSessionReply {}))
    }

    async fn delete_session(
        &self,
        request: Request<pb::SessionRef>,
    ) -> Result<Response<pb::DeleteSessionReply>, Status> {
        let r = request.into_inner();
        let (settings, id) = self.address(&r.project, &r.session_id)?;
        let existed = self
            .turns
            .locked(id, settings.session_ttl, |d| d.take().is_some())
            .await
            .map_err(|e| self.fail(e))?;
        self.turns
            .store()
            .forget(id)
            .await
            .map_err(|e| self.fail(e.into()))?;
        Ok(Response::new(pb::DeleteSessionReply { existed }))
    }

    async fn update_project(
        &self,
        request: Request<pb::UpdateProjectRequest>,
    ) -> Result<Response<pb::UpdateProjectReply>, Status> {
        let r = request.into_inner();
        let settings = self.turns.project(&r.project).map_err(|e| self.fail(e))?;
        let store = self.turns.store();
        if let Some(p) = &r.system_prompt {
            if p.chars().count() > MAX_SYSTEM_PROMPT_CHARS {
                return Err(self.fail(invalid(format!(
                    "system prompt is too long (at most {MAX_SYSTEM_PROMPT_CHARS} characters)"
                ))));
            }
            store
                .set_project_prompt(&r.project, p)
                .await
                .map_err(|e| self.fail(e.into()))?;
        }
        let action = pb::SessionAction::try_from(r.sessions).unwrap_or(pb::SessionAction::None);
        if action == pb::SessionAction::None {
            return Ok(Response::new(pb::UpdateProjectReply { sessions: 0 }));
        }
        let ids = store
            .sessions(&r.project)
            .await
            .map_err(|e| self.fail(e.into()))?;
        // A new project prompt with a reset also drops the sessions' own
        // prompts, so every session speaks with the new one from now on.
        let new_prompt = r.system_prompt.is_some();
        let project = r.project.as_str();
        let changes = ids.into_iter().map(|sid| async move {
            let id = SessionId {
                project,
                session_id: &sid,
            };
            let changed = self
                .turns
                .locked(id, settings.session_ttl, |d| match action {
                    pb::SessionAction::Delete => d.take().is_some(),
                    _ => match d {
                        Some(d) => {
                            d.clear();
                            if new_prompt {
                                d.system_prompt = None;
                            }
                            true
                        }
                        None => false,
                    },
                })
                .await?;
            if action == pb::SessionAction::Delete || !changed {
                store.forget(id).await?;
            }
            Ok::<_, SessionError>(u32::from(changed))
        });
        // A few sessions at a time: one by one, each its lock's round trips,
        // a project of thousands of sessions outlasts the caller's deadline.
        let mut done = futures::stream::iter(changes).buffer_unordered(PROJECT_ACTION_CONCURRENCY);
        let mut touched = 0u32;
        while let Some(changed) = done.next().await {
            touched += changed.map_err(|e| self.fail(e))?;
        }
        Ok(Response::new(pb::UpdateProjectReply { sessions: touched }))
    }

    async fn cancel_turn(
        &self,
        request: Request<pb::CancelTurnRequest>,
    ) -> Result<Response<pb::CancelTurnReply>, Status> {
        let r = request.into_inner();
        let cancelled = self
            .running
            .cancel(&r.project, &r.session_id, &r.request_id);
        tracing::info!(session = %LogSafe(&r.project, &r.session_id), cancelled, "cancel turn");
        Ok(Response::new(pb::CancelTurnReply { cancelled }))
    }

    async fn hold_lease(
        &self,
        request: Request<pb::LeaseRequest>,
    ) -> Result<Response<pb::LeaseReply>, Status> {
        let r = request.into_inner();
        for (what, v) in [("lease name", &r.name), ("lease holder", &r.holder)] {
            if v.trim().is_empty() || v.len() > MAX_ID_BYTES {
                return Err(self.fail(invalid(format!("{what} must be 1 to {MAX_ID_BYTES} bytes"))));
            }
        }
        let ttl = Duration::from_millis(u64::from(r.ttl_ms));
        if ttl > MAX_LEASE_TTL {
            return Err(self.fail(invalid(format!(
                "lease ttl_ms must be at most {}",
                MAX_LEASE_TTL.as_millis()
            ))));
        }
        let lease = self
            .turns
            .store()
            .hold_lease(&r.name, &r.holder, ttl)
            .await
            .map_err(|e| self.fail(e.into()))?;
        Ok(Response::new(pb::LeaseReply {
            held: lease.held,
            epoch: lease.epoch,
            holder: lease.holder.unwrap_or_default(),
        }))
    }
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
