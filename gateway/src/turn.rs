//! Running one admitted request against session-svc and publishing its outcome.
//!
//! Each request runs in its own task holding a [`Permit`], so a slow model
//! never blocks the MQTT poll loop, and shutdown can wait for exactly these.

use std::error::Error as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use palaver_core::auth::Channel;
use palaver_core::trace_context;
use palaver_proto::session::v1::chat_event::Event;
use palaver_proto::session::v1::{
    sessions_client::SessionsClient, ChatReply, ChatRequest, ResetSessionRequest, SessionAction,
    SessionRef, UpdateProjectRequest,
};
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};
use tracing::Instrument;

use crate::ack::Ack;
use crate::backlog::Permit;
use crate::cancel::{InFlight, Registration, TurnKey};
use crate::control::{ControlOp, ControlRequest};
use crate::errors;
use crate::metrics::{Metrics, OutKind};
use crate::order::{SessionOrder, Ticket};
use crate::publish::Publisher;
use crate::request::ChatTurn;
use crate::stream::ReplyStream;

/// Extra time the local deadline allows past `grpc-timeout`, so that when
/// session-svc answers DEADLINE_EXCEEDED itself, its answer wins.
const LOCAL_DEADLINE_SLACK: Duration = Duration::from_millis(250);

/// Pauses between attempts at a turn while session-svc is unreachable.
const RETRY_FIRST_PAUSE: Duration = Duration::from_millis(100);
const RETRY_MAX_PAUSE: Duration = Duration::from_secs(1);

/// Deadline of a control call: they only touch the store.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);

/// What every request task needs; shared by all projects.
pub struct Turns {
    sessions: SessionsClient<Channel>,
    timeout: Duration,
    metrics: Metrics,
    /// Tripped when the shutdown grace period is over: remaining turns give up.
    abandon: CancellationToken,
    /// Keeps each session's messages in arrival order.
    order: Arc<SessionOrder>,
    /// Turns a client may cancel now.
    in_flight: Arc<InFlight>,
}

/// How a turn ended, as far as its task is concerned.
enum Outcome {
    /// The shutdown grace period ran out first.
    Abandoned,
    /// Its client cancelled it.
    Cancelled,
    /// session-svc answered.
    Answered(Result<ChatReply, Status>),
}

impl Outcome {
    /// What the turn's trace says of it: `ok`, or why there was no reply.
    fn name(&self) -> &'static str {
        match self {
            Self::Abandoned => "abandoned",
            Self::Cancelled => "cancelled",
            Self::Answered(Ok(_)) => "ok",
            Self::Answered(Err(status)) => errors::classify(status).0.as_str(),
        }
    }
}

impl Turns {
    /// `sessions` is cloned per call (a tonic channel is a cheap handle).
    pub fn new(
        sessions: SessionsClient<Channel>,
        timeout: Duration,
        metrics: Metrics,
        abandon: CancellationToken,
    ) -> Self {
        Self {
            sessions,
            timeout,
            metrics,
            abandon,
            order: Arc::default(),
            in_flight: Arc::default(),
        }
    }

    /// Makes `turn` cancellable until the registration is dropped; `None`
    /// for a turn without a request id (nothing can name it). Called where
    /// the request is read, so that a cancel read after it finds it.
    pub fn register(&self, project: &str, turn: &ChatTurn) -> Option<Registration> {
        TurnKey::of(project, turn).map(|key| self.in_flight.register(key))
    }

    /// Cancels the running turns `key` names; how many there were.
    pub fn cancel(&self, key: &TurnKey) -> usize {
        self.in_flight.cancel(key)
    }

    /// A place in line for a message of `session_id`; see [`crate::order`].
    pub fn ticket(&self, project: &str, session_id: &str) -> Ticket {
        self.order.ticket(project, session_id)
    }

    /// Runs one chat turn and publishes the reply or the error text; the
    /// request is acknowledged (`ack` dropped) only after that. A cancelled
    /// turn (see [`crate::cancel`]) is answered `Error: Cancelled.`: its
    /// call to session-svc is dropped, which takes the turn back there.
    pub async fn chat(
        &self,
        publisher: Publisher,
        turn: ChatTurn,
        permit: Permit,
        ack: Ack,
        ticket: Ticket,
        registration: Option<Registration>,
    ) {
        // A debug span: at the default level it costs nothing, where an
        // info span's fields are formatted when it is made, on every turn.
        // The warnings below name the turn themselves.
        // It is also the root of the turn's trace (see `palaver_core::telemetry`).
        let span = tracing::debug_span!(
            "turn",
            project = publisher.project(),
            session_id = ?turn.session_id,
            request_id = turn.request_id.as_deref().unwrap_or(""),
            client_id = turn.client_id.as_deref().unwrap_or(""),
            message_bytes = turn.message.len(),
            outcome = tracing::field::Empty,
            trace_id = tracing::field::Empty,
        );
        // An MQTT 5 request's `traceparent` user property makes the client's
        // trace the parent of the turn.
        trace_context::adopt(
            &span,
            trace_context::parent_from_traceparent(turn.traceparent.as_deref()),
        );
        async move {
            let who = TurnName(publisher.project(), &turn);
            tracing::debug!(message = %turn.message, "turn started");
            let started = Instant::now();
            let mut stream = turn
                .stream
                .then(|| {
                    ReplyStream::new(
                        publisher.clone(),
                        &turn.reply_topic,
                        turn.correlation_data.clone(),
                    )
                })
                .flatten();
            // A turn nothing can name gets a token that never fires.
            let cancel = registration
                .as_ref()
                .map(|r| r.token().clone())
                .unwrap_or_default();
            let outcome = tokio::select! {
                _ = self.abandon.cancelled() => Outcome::Abandoned,
                _ = cancel.cancelled() => Outcome::Cancelled,
                r = self.call_chat(publisher.project(), &turn, ticket, stream.as_mut()) => Outcome::Answered(r),
            };
            drop(registration);
            self.metrics.observe_turn(started.elapsed().as_secs_f64());
            if trace_context::enabled() {
                tracing::Span::current().record("outcome", outcome.name());
            }
            match outcome {
                Outcome::Abandoned if ack.redeliverable() => {
                    // Unacknowledged, it goes to the gateway that consumes
                    // the project next, which answers it.
                    tracing::warn!(turn = %who, "turn left to the next consumer at shutdown");
                    self.metrics.dropped("abandoned_at_shutdown");
                    ack.withhold();
                    drop(permit);
                    return;
                }
                Outcome::Abandoned => {
                    tracing::warn!(turn = %who, "turn abandoned at shutdown");
                    self.metrics.dropped("abandoned_at_shutdown");
                    let kind = errors::ErrorKind::ShuttingDown;
                    if let Some(stream) = &mut stream {
                        stream.fail_now(kind, errors::OVERLOADED_TEXT);
                    }
                    // Nothing else will answer it: say so in the words
                    // clients retry on, ahead of the "offline" status.
                    let _ = publisher.try_publish_error(
                        &turn.reply_topic,
                        &turn.correlation_data,
                        kind,
                        errors::OVERLOADED_TEXT,
                    );
                }
                Outcome::Cancelled => {
                    tracing::info!(turn = %who, "turn cancelled by its client");
                    let kind = errors::ErrorKind::Cancelled;
                    self.metrics.error(kind.as_str());
                    if let Some(stream) = &mut stream {
                        stream.fail(kind, errors::CANCELLED_TEXT).await;
                    }
                    let _ = publisher
                        .publish_error(
                            &turn.reply_topic,
                            &turn.correlation_data,
                            kind,
                            errors::CANCELLED_TEXT,
                        )
                        .await;
                }
                Outcome::Answered(Ok(reply)) => {
                    tracing::debug!(
                        reply = %reply.text,
                        finish_reason = %reply.finish_reason,
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "turn done"
                    );
                    // The stream ends before the reply: a client reading
                    // both has every piece once the reply is there.
                    if let Some(stream) = &mut stream {
                        stream.finish(&reply.text, &reply.finish_reason).await;
                    }
                    let _ = publisher
                        .publish_reply(&turn.reply_topic, &turn.correlation_data, reply.text)
                        .await;
                }
                Outcome::Answered(Err(status)) => {
                    let (kind, text) = errors::classify(&status);
                    tracing::warn!(turn = %who, code = ?status.code(), kind = kind.as_str(), detail = status.message(), "turn failed");
                    self.metrics.error(kind.as_str());
                    if let Some(stream) = &mut stream {
                        stream.fail(kind, &text).await;
                    }
                    let _ = publisher
                        .publish_error(&turn.reply_topic, &turn.correlation_data, kind, &text)
                        .await;
                }
            }
            // Freed only now: shutdown's drain then also covers the publish.
            drop(ack);
            drop(permit);
        }
        .instrument(span)
        .await
    }

    /// Runs the turn as a `ChatStream` so that the session's next message can
    /// go as soon as this one is accepted, long before its reply.
    ///
    /// A turn with a request id is retried with backoff, under the same id,
    /// while session-svc (or what is behind it) is unreachable, until the
    /// deadline: the same id never makes a second turn (session-svc answers
    /// a retry with the stored reply, or waits for the turn in flight), so
    /// an outage shorter than the deadline costs the client nothing but time.
    async fn call_chat(
        &self,
        project: &str,
        turn: &ChatTurn,
        mut ticket: Ticket,
        mut stream: Option<&mut ReplyStream>,
    ) -> Result<ChatReply, Status> {
        let request_id = turn.idempotency_key();
        let retry = request_id.is_some();
        let message = ChatRequest {
            project: project.to_owned(),
            session_id: turn.session_id.clone(),
            message: turn.message.clone(),
            request_id: request_id.unwrap_or_default(),
            system_prompt: turn.system_prompt.clone(),
            temperature: turn.temperature,
            top_p: turn.top_p,
            max_tokens: turn.max_tokens,
            final_only: stream.is_none(),
            client: turn
                .user
                .clone()
                .or_else(|| turn.client_id.clone())
                .unwrap_or_default(),
        };
        let started = Instant::now();
        let deadline = started + self.timeout;
        let call = async {
            ticket.wait_turn().await;
            let mut pause = RETRY_FIRST_PAUSE;
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                let mut request = tonic::Request::new(message.clone());
                request.set_timeout(left.max(Duration::from_millis(1)));
                if let Some(stream) = stream.as_deref_mut() {
                    stream.new_attempt();
                }
                let outcome = self
                    .chat_once(request, &mut ticket, stream.as_deref_mut())
                    .await;
                match outcome {
                    Err(status)
                        if retry && is_transient(&status) && Instant::now() + pause < deadline =>
                    {
                        tracing::debug!(code = ?status.code(), detail = status.message(), "session-svc unreachable; retrying the turn");
                        self.metrics.retried();
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(RETRY_MAX_PAUSE);
                    }
                    outcome => return outcome,
                }
            }
        };
        match tokio::time::timeout(self.timeout + LOCAL_DEADLINE_SLACK, call).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(status)) => Err(deadline_as_such(status, started.elapsed(), self.timeout)),
            Err(_) => Err(Status::deadline_exceeded("gateway deadline passed")),
        }
    }

    /// One attempt at the turn; releases the ticket once it is accepted,
    /// and passes deltas on to `stream`, sending its pieces when they are due.
    async fn chat_once(
        &self,
        request: tonic::Request<ChatRequest>,
        ticket: &mut Ticket,
        mut stream: Option<&mut ReplyStream>,
    ) -> Result<ChatReply, Status> {
        let mut events = self
            .sessions
            .clone()
            .chat_stream(request)
            .await?
            .into_inner();
        loop {
            let due = stream.as_ref().and_then(|s| s.due());
            let event = match due {
                // `message` keeps its state in `events`, so losing the race
                // to the timer loses nothing.
                Some(at) => tokio::select! {
                    ev = events.message() => ev?,
                    () = tokio::time::sleep_until(at) => {
                        if let Some(s) = stream.as_deref_mut() {
                            s.flush().await;
                        }
                        continue;
                    }
                },
                None => events.message().await?,
            };
            let Some(event) = event else { break };
            match event.event {
                Some(Event::Accepted(_)) => ticket.release(),
                Some(Event::Done(reply)) => return Ok(reply),
                Some(Event::Delta(delta)) => {
                    if let Some(s) = stream.as_deref_mut() {
                        s.push(&delta).await;
                    }
                }
                None => {}
            }
        }
        Err(Status::internal(
            "session-svc ended the turn without a reply",
        ))
    }

    /// Applies one control action and publishes its acknowledgement. With a
    /// ticket (a session's action), it waits for the session's previous
    /// message to be stored, and the next one waits until the action is done.
    pub async fn control(
        &self,
        publisher: Publisher,
        request: ControlRequest,
        permit: Permit,
        ack: Ack,
        ticket: Option<Ticket>,
    ) {
        let project = publisher.project().to_owned();
        let span = tracing::info_span!("control", project = %project, op = op_name(&request.op));
        async move {
            // The ticket goes with this future: the session's next message
            // may go once the action is done (or abandoned).
            let in_line = async {
                let mut ticket = ticket;
                if let Some(t) = &mut ticket {
                    t.wait_turn().await;
                }
                self.call_control(&project, &request.op).await
            };
            let outcome = tokio::select! {
                _ = self.abandon.cancelled() => None,
                r = in_line => Some(r),
            };
            match outcome {
                None => {
                    self.metrics.dropped("abandoned_at_shutdown");
                    ack.withhold();
                    drop(permit);
                    return;
                }
                Some(Ok(())) => {
                    tracing::info!(ack_topic = ?request.ack_topic, "control applied");
                    let _ = publisher
                        .publish(OutKind::Hint, &request.ack_topic, request.ack_payload.as_bytes().to_vec())
                        .await;
                }
                Some(Err(status)) => {
                    let (kind, _) = errors::classify(&status);
                    tracing::warn!(code = ?status.code(), detail = status.message(), "control failed; no acknowledgement sent");
                    self.metrics.error(kind.as_str());
                }
            }
            drop(ack);
            drop(permit);
        }
        .instrument(span)
        .await
    }

    async fn call_control(&self, project: &str, op: &ControlOp) -> Result<(), Status> {
        let mut client = self.sessions.clone();
        let project = project.to_owned();
        let call = async move {
            match op.clone() {
                ControlOp::SetSessionPrompt {
                    session_id,
                    prompt,
                    keep_history,
                } => client
                    .reset_session(timed(ResetSessionRequest {
                        project,
                        session_id,
                        system_prompt: Some(prompt),
                        keep_history,
                    }))
                    .await
                    .map(drop),
                ControlOp::SetProjectPrompt {
                    prompt,
                    clear_sessions,
                } => client
                    .update_project(timed(UpdateProjectRequest {
                        project,
                        system_prompt: Some(prompt),
                        sessions: if clear_sessions {
                            SessionAction::Clear
                        } else {
                            SessionAction::None
                        }
                        .into(),
                    }))
                    .await
                    .map(drop),
                ControlOp::ClearSession { session_id } => client
                    .reset_session(timed(ResetSessionRequest {
                        project,
                        session_id,
                        system_prompt: None,
                        keep_history: false,
                    }))
                    .await
                    .map(drop),
                ControlOp::ClearProject => client
                    .update_project(timed(UpdateProjectRequest {
                        project,
                        system_prompt: None,
                        sessions: SessionAction::Clear.into(),
                    }))
                    .await
                    .map(drop),
                ControlOp::DeleteSession { session_id } => client
                    .delete_session(timed(SessionRef {
                        project,
                        session_id,
                    }))
                    .await
                    .map(drop),
                ControlOp::DeleteProject => client
                    .update_project(timed(UpdateProjectRequest {
                        project,
                        system_prompt: None,
                        sessions: SessionAction::Delete.into(),
                    }))
                    .await
                    .map(drop),
            }
        };
        match tokio::time::timeout(CONTROL_TIMEOUT + LOCAL_DEADLINE_SLACK, call).await {
            Ok(result) => result,
            Err(_) => Err(Status::deadline_exceeded("gateway deadline passed")),
        }
    }
}

/// A turn as its warnings name it: project, session, and the request and
/// client ids when the client sent them.
struct TurnName<'a>(&'a str, &'a ChatTurn);

impl std::fmt::Display for TurnName<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Ids are the client's: escaped, so a newline cannot forge a log line.
        let TurnName(project, turn) = self;
        write!(f, "{project}/{}", turn.session_id.escape_debug())?;
        if let Some(id) = &turn.request_id {
            write!(f, " request {}", id.escape_debug())?;
        }
        if let Some(id) = &turn.client_id {
            write!(f, " client {}", id.escape_debug())?;
        }
        Ok(())
    }
}

/// A tonic server whose `grpc-timeout` expires answers CANCELLED ("Timeout
/// expired"), not DEADLINE_EXCEEDED; once the deadline has passed, that is
/// what it means, and the client should hear "timed out".
fn deadline_as_such(status: Status, elapsed: Duration, deadline: Duration) -> Status {
    if status.code() == Code::Cancelled && elapsed + DEADLINE_TOLERANCE >= deadline {
        Status::deadline_exceeded(status.message().to_owned())
    } else {
        status
    }
}

/// Whether a failed call may go through if tried again: session-svc (or
/// Redis, or inference-svc behind it) unreachable, or the connection to it
/// broken mid-call (a local transport error, which carries its cause).
fn is_transient(status: &Status) -> bool {
    match status.code() {
        Code::Unavailable => true,
        Code::Unknown | Code::Internal | Code::Cancelled => status.source().is_some(),
        _ => false,
    }
}

/// Timer granularity allowed when comparing elapsed time with the deadline.
const DEADLINE_TOLERANCE: Duration = Duration::from_millis(10);

fn timed<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(CONTROL_TIMEOUT);
    request
}

fn op_name(op: &ControlOp) -> &'static str {
    match op {
        ControlOp::SetSessionPrompt { .. } => "set_session_prompt",
        ControlOp::SetProjectPrompt { .. } => "set_project_prompt",
        ControlOp::ClearSession { .. } => "clear_session",
        ControlOp::ClearProject => "clear_project",
        ControlOp::DeleteSession { .. } => "delete_session",
        ControlOp::DeleteProject => "delete_project",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_turn_is_named_by_project_session_and_the_ids_it_has() {
        let mut turn = ChatTurn::plain("p", "s1".into(), "hi".into());
        assert_eq!(TurnName("p", &turn).to_string(), "p/s1");
        turn.request_id = Some("r7".into());
        turn.client_id = Some("game-2".into());
        assert_eq!(
            TurnName("p", &turn).to_string(),
            "p/s1 request r7 client game-2"
        );
    }

    #[test]
    fn only_unreachable_and_broken_calls_are_retried() {
        assert!(is_transient(&Status::unavailable("connection refused")));
        let broken = Status::from_error(Box::new(std::io::Error::other("connection reset")));
        assert!(broken.source().is_some());
        assert!(is_transient(&broken));
        // Said by session-svc itself: final.
        assert!(!is_transient(&Status::internal("a bug")));
        assert!(!is_transient(&Status::invalid_argument("too long")));
        assert!(!is_transient(&Status::resource_exhausted("rate limited")));
        assert!(!is_transient(&Status::deadline_exceeded("late")));
    }

    #[test]
    fn cancelled_after_the_deadline_is_a_timeout() {
        let d = Duration::from_millis(300);
        let late = deadline_as_such(Status::cancelled("Timeout expired"), d, d);
        assert_eq!(late.code(), Code::DeadlineExceeded);
        let early = deadline_as_such(Status::cancelled("gone"), Duration::from_millis(100), d);
        assert_eq!(early.code(), Code::Cancelled);
        let other = deadline_as_such(Status::internal("x"), d * 2, d);
        assert_eq!(other.code(), Code::Internal);
    }

    #[test]
    fn turn_names_escape_control_characters() {
        let mut turn = ChatTurn::plain("p", "s\nERROR forged".into(), "hi".into());
        turn.client_id = Some("c\r\x1b[31m".into());
        let name = TurnName("p", &turn).to_string();
        assert!(!name.chars().any(char::is_control), "{name:?}");
        assert!(name.contains("s\\nERROR forged"), "{name}");
    }
}
