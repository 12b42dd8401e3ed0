//! The three-phase turn: the one rule of the design lives here.
//!
//! 1. **prepare** — append the user message, trim, snapshot the history for
//!    the model, store: one atomic step of the store (a *swap*);
//! 2. **generate** — nothing held (done by the caller);
//! 3. **store** — put the reply right after its message: one swap.
//!
//! The session is held exclusively only while a step runs inside the store,
//! never across a round trip (see `store/mod.rs` for why). Rarer two-step
//! changes (reset, delete, clear) take the session's lock with a random
//! holder token and a TTL, and release it by a compare-and-delete in the
//! same step that writes: a holder that stalled past its TTL writes nothing.
//! Both kinds retry a busy session with short jittered sleeps up to a
//! deadline, then give up with ABORTED.
//!
//! Each turn has one owner, a [`TurnOwner`]: an attempt token written into
//! the turn by phase 1, armed before phase 1 starts, settled by phase 3.
//! Whatever fails or is dropped in between, the owner's turn ends answered
//! and stored, or taken back — never half. Only the owner's attempt may
//! store a reply or take the turn back, so a retry can never undo another
//! attempt's turn; a retry of a turn in flight waits for its outcome
//! ([`Turns::await_turn`]), and takes the turn over only when the process
//! that owned it stopped beating ([`Turns::heartbeat`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use palaver_core::projects::{ProjectSettings, Projects};
use rand::Rng;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::dialog::{
    random_first_seq, Dialog, Ending, Failure, Limits, Opened, Opening, Role, ORPHAN_AFTER_MS,
};
use crate::error::SessionError;
use crate::metrics::{Metrics, PhaseLabel};
use crate::store::{LockAttempt, Quota, RateLimit, SessionId, Step, Store, StoreError};

/// Lock timing.
#[derive(Debug, Clone, Copy)]
pub struct LockConfig {
    /// How long a two-step change's lock lives if its holder dies. Far above
    /// any real hold time (a round trip to the store), short enough that a
    /// crash frees a session quickly.
    pub ttl: Duration,
    /// How long a change waits for a busy session before giving up (ABORTED).
    pub wait: Duration,
}

impl Default for LockConfig {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(5),
            wait: Duration::from_secs(3),
        }
    }
}

/// How often each process says it is alive, and how long that lasts: a
/// retry takes over a dead process's turn within this TTL.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(2);
const HEARTBEAT_TTL: Duration = Duration::from_secs(6);
/// How long a dropped owner keeps trying to take its turn back while the
/// store is unreachable.
const TAKE_BACK_PATIENCE: Duration = Duration::from_secs(30);

/// A user message on its way in.
#[derive(Debug, Clone)]
pub struct NewTurn<'a> {
    pub project: &'a str,
    pub session_id: &'a str,
    pub message: &'a str,
    pub request_id: Option<&'a str>,
    pub system_prompt: Option<&'a str>,
    /// Who asked (`ChatRequest.client`), for the per-client rate limit;
    /// `None`: an anonymous caller, limited per session only.
    pub client: Option<&'a str>,
    /// The caller's deadline: by then the turn is answered or taken back.
    pub deadline: Instant,
}

/// What phase 1 produced.
#[derive(Debug)]
pub enum Prepared {
    /// Generate the reply from `messages` (system prompt first).
    Generate { messages: Vec<(Role, String)> },
    /// A retried request whose reply is already stored.
    Replay(String),
    /// A retried request whose turn attempt `attempt` is generating: see
    /// [`Turns::await_turn`].
    InFlight { attempt: String },
}

/// What waiting for another attempt's turn came to.
#[derive(Debug)]
pub enum Awaited {
    /// It was answered: the stored reply.
    Reply(String),
    /// It failed: the same error.
    Failed(Status),
    /// Its process died and the waiting attempt took the turn over:
    /// generate the reply from `messages`.
    Generate { messages: Vec<(Role, String)> },
    /// It is gone with no failure recorded (its caller left, or the session
    /// was cleared): the request may open a new turn.
    Gone,
}

/// The turn engine over one store.
pub struct TurnEngine<S> {
    store: S,
    projects: Projects,
    lock: LockConfig,
    metrics: Arc<Metrics>,
    /// This process's name in attempt tokens and its heartbeat.
    replica: String,
}

impl<S: Store> TurnEngine<S> {
    pub fn new(store: S, projects: Projects, lock: LockConfig, metrics: Arc<Metrics>) -> Self {
        Self {
            store,
            projects,
            lock,
            metrics,
            replica: format!("{:016x}", rand::rng().random::<u64>()),
        }
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The settings of a configured project.
    pub fn project(&self, project: &str) -> Result<&ProjectSettings, SessionError> {
        self.projects
            .get(project)
            .ok_or_else(|| SessionError::InvalidArgument(format!("unknown project {project:?}")))
    }

    /// Says this process is alive until `shutdown`, so that retries wait for
    /// its turns instead of taking them over.
    pub async fn heartbeat(&self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(HEARTBEAT_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.cancelled() => return,
            }
            if let Err(e) = self.store.heartbeat(&self.replica, HEARTBEAT_TTL).await {
                tracing::warn!(error = %e, "heartbeat not written");
            }
        }
    }

    /// A new owner for a turn about to begin in (`project`, `session_id`),
    /// armed: dropped before it is settled, it takes its turn back.
    pub fn owner(self: &Arc<Self>, project: &str, session_id: &str) -> TurnOwner<S> {
        TurnOwner {
            turns: self.clone(),
            project: project.to_owned(),
            session_id: session_id.to_owned(),
            attempt: format!("{}.{:016x}", self.replica, rand::rng().random::<u64>()),
            armed: true,
        }
    }

    /// Phase 1 for `owner`. Counts the rate limit, appends the message and
    /// returns what to send to the model.
    pub async fn prepare(
        &self,
        t: &NewTurn<'_>,
        owner: &TurnOwner<S>,
    ) -> Result<Prepared, SessionError> {
        let started = Instant::now();
        let settings = self.project(t.project)?;
        let id = SessionId {
            project: t.project,
            session_id: t.session_id,
        };
        let per = |limit: u32| {
            (limit > 0).then_some(RateLimit {
                limit,
                window: settings.rate_window,
            })
        };
        let quota = Quota {
            session: per(settings.rate_limit),
            client: t
                .client
                .and_then(|c| per(settings.client_rate_limit()).map(|r| (c, r))),
        };
        let limits = Limits {
            max_messages: settings.max_history_messages,
            max_tokens: settings.max_history_tokens,
        };
        let now_ms = unix_ms();
        let opening = Opening {
            message: t.message,
            request_id: t.request_id,
            attempt: &owner.attempt,
            ends_by: ends_by(now_ms, t.deadline),
            now_ms,
            system_prompt: t.system_prompt,
            limits,
            first_seq: random_first_seq(),
        };
        // The project's run-time prompt and the session index live under
        // other keys (another hash slot): read and written beside the turn's
        // step, not inside it.
        let (project_prompt, indexed, opened) = tokio::join!(
            self.store.project_prompt(t.project),
            self.index(id, settings.session_ttl),
            self.one_step(|| {
                self.store
                    .open_turn(id, quota, &opening, settings.session_ttl)
            })
        );
        if let Err(e) = indexed {
            // Only project-wide actions read the index: not worth a turn.
            tracing::warn!(error = %e, "session not indexed");
        }
        let prepared = match opened? {
            Opened::Replay(reply) => Prepared::Replay(reply),
            Opened::InFlight { attempt } => Prepared::InFlight { attempt },
            Opened::Generate {
                system_prompt,
                history,
                ..
            } => Prepared::Generate {
                messages: with_system(settings, system_prompt.or(project_prompt?), history),
            },
        };
        self.observe_phase("prepare", started);
        Ok(prepared)
    }

    /// Waits for attempt `theirs` to end the turn of `request_id`, polling
    /// the store (the attempt may run in another replica). When its process
    /// stops beating, `mine` takes the turn over and generates it.
    pub async fn await_turn(
        &self,
        t: &NewTurn<'_>,
        request_id: &str,
        mut theirs: String,
        mine: &TurnOwner<S>,
    ) -> Result<Awaited, SessionError> {
        let settings = self.project(t.project)?;
        let id = SessionId {
            project: t.project,
            session_id: t.session_id,
        };
        let mut pause = Duration::from_millis(20);
        loop {
            tokio::time::sleep(pause).await;
            pause = (pause * 3 / 2).min(Duration::from_millis(250));
            let dialog = self.store.load(id).await?;
            let turn = dialog.as_ref().and_then(|d| {
                d.turns
                    .iter()
                    .find(|turn| turn.request_id.as_deref() == Some(request_id))
            });
            let now_ms = unix_ms();
            // Past its deadline and the owner's grace, alive or not.
            let orphaned = match turn {
                Some(turn) => {
                    if let Some(reply) = &turn.reply {
                        return Ok(Awaited::Reply(reply.clone()));
                    }
                    match &turn.attempt {
                        Some(a) if *a != theirs => theirs = a.clone(),
                        _ => {}
                    }
                    turn.ends_by
                        .is_some_and(|end| end.saturating_add(ORPHAN_AFTER_MS) < now_ms)
                }
                None => {
                    let failure = dialog
                        .as_ref()
                        .and_then(|d| d.failure_of(request_id, &theirs));
                    return Ok(match failure {
                        Some(f) => Awaited::Failed(failure_status(f)),
                        None => Awaited::Gone,
                    });
                }
            };
            let owner_process = theirs.split_once('.').map_or("", |(r, _)| r);
            if !orphaned && self.store.alive(owner_process).await? {
                continue;
            }
            tracing::warn!(
                turn = %LogSafe(t.project, t.session_id),
                "the attempt generating this turn stopped; a retry takes it over"
            );
            let taken = self
                .one_step(|| {
                    self.store.take_over(
                        id,
                        request_id,
                        &theirs,
                        &mine.attempt,
                        ends_by(now_ms, t.deadline),
                        settings.session_ttl,
                    )
                })
                .await?;
            if let Some(Opened::Generate {
                system_prompt,
                history,
                ..
            }) = taken
            {
                let project_prompt = match system_prompt {
                    Some(_) => None,
                    None => self.store.project_prompt(t.project).await?,
                };
                return Ok(Awaited::Generate {
                    messages: with_system(settings, system_prompt.or(project_prompt), history),
                });
            }
        }
    }

    /// Ends the turn `attempt` owns, retrying while the session is busy or
    /// the store unreachable, until `deadline`.
    async fn settle(
        &self,
        project: &str,
        session_id: &str,
        attempt: &str,
        ending: Ending<'_>,
        deadline: Instant,
    ) -> Result<(), SessionError> {
        let started = Instant::now();
        let settings = self.project(project)?;
        let id = SessionId {
            project,
            session_id,
        };
        let mut pause = Duration::from_millis(50);
        loop {
            let ended = self
                .one_step(|| {
                    self.store
                        .end_turn(id, attempt, ending, settings.session_ttl)
                })
                .await;
            match ended {
                Ok(()) => break,
                Err(e @ SessionError::Store(StoreError::Corrupt(_))) => return Err(e),
                Err(e) if Instant::now() + pause > deadline => return Err(e),
                Err(e) => {
                    tracing::debug!(error = %e, "turn not ended yet; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
            }
        }
        if matches!(ending, Ending::Reply(_)) {
            self.observe_phase("store", started);
        }
        Ok(())
    }

    /// Keeps the session in its project's index for two TTLs, called where a
    /// turn begins (phase 1) and where a control action changes the dialog.
    ///
    /// Two, because the end of a turn starts the dialog's TTL over as well,
    /// but only while the dialog still exists: within one TTL of the turn's
    /// start, so the dialog lives less than two TTLs past it. Phase 3, on
    /// every reply's path, then needs no index write of its own.
    async fn index(&self, id: SessionId<'_>, ttl: Duration) -> Result<(), StoreError> {
        self.store.touch_index(id, ttl.saturating_mul(2)).await
    }

    /// Runs a one-step change (a swap), retrying with jittered backoff while
    /// a two-step change holds the session or another swap got in first, up
    /// to the lock wait; then ABORTED.
    async fn one_step<T, F, Fut>(&self, mut attempt: F) -> Result<T, SessionError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<Step<T>, StoreError>>,
    {
        let first_try = Instant::now();
        let mut busy = Backoff::until(first_try + self.lock.wait);
        let mut lost = 0u32;
        loop {
            match attempt().await? {
                Step::RateLimited => return Err(SessionError::RateLimited),
                Step::Busy => busy.pause().await?,
                Step::Changed => {
                    self.metrics.swap_retries.inc();
                    lost += 1;
                    // The first loss usually means this process's copy of
                    // the dialog was stale: the retry has the stored one.
                    if lost > 1 {
                        busy.pause().await?;
                    }
                }
                Step::Done { value, held } => {
                    if lost > 0 {
                        // On the phase's span, in a trace.
                        tracing::Span::current().record("swap_retries", lost);
                    }
                    self.metrics
                        .hold_wait
                        .observe(first_try.elapsed().as_secs_f64());
                    self.metrics.hold.observe(held.as_secs_f64());
                    return Ok(value);
                }
            }
        }
    }

    /// A two-step change: runs `f` on the session's dialog (`None`: no
    /// session) under the session's lock, then stores what `f` left (`None`
    /// deletes). This is the only place a lock is taken.
    pub async fn locked<R>(
        &self,
        id: SessionId<'_>,
        ttl: Duration,
        f: impl FnOnce(&mut Option<Dialog>) -> R,
    ) -> Result<R, SessionError> {
        let token = format!("{:032x}", rand::rng().random::<u128>());
        let first_try = Instant::now();
        let mut busy = Backoff::until(first_try + self.lock.wait);
        // If this future is dropped while the lock may be ours — an admit in
        // flight, or between admit and commit — release it at once rather
        // than leave the session blocked until the TTL. Built before the
        // first attempt so that nothing is allocated inside the lock window;
        // releasing a lock we do not hold is a no-op (compare-and-delete).
        let held = {
            let (store, token) = (self.store.clone(), token.clone());
            let (project, session_id) = (id.project.to_owned(), id.session_id.to_owned());
            OnDrop::new(async move {
                let id = SessionId {
                    project: &project,
                    session_id: &session_id,
                };
                if let Err(e) = store.release(id, &token).await {
                    tracing::warn!(error = %e, "could not release an abandoned lock");
                }
            })
        };
        loop {
            match self.store.try_lock(id, &token, self.lock.ttl).await? {
                LockAttempt::Busy => {
                    if let Err(e) = busy.pause().await {
                        held.disarm();
                        return Err(e);
                    }
                }
                LockAttempt::Locked(mut dialog) => {
                    let acquired = Instant::now();
                    self.metrics
                        .hold_wait
                        .observe((acquired - first_try).as_secs_f64());
                    let out = f(&mut dialog);
                    let committed = self.store.commit(id, &token, dialog.as_ref(), ttl).await;
                    held.disarm();
                    self.metrics.hold.observe(acquired.elapsed().as_secs_f64());
                    return match committed {
                        Ok(true) => {
                            if dialog.is_some() {
                                if let Err(e) = self.index(id, ttl).await {
                                    tracing::warn!(error = %e, "session changed but not indexed");
                                }
                            }
                            Ok(out)
                        }
                        Ok(false) => Err(SessionError::LockLost),
                        Err(e) => {
                            // Free the session now rather than at the TTL.
                            let _ = self.store.release(id, &token).await;
                            Err(e.into())
                        }
                    };
                }
            }
        }
    }

    pub fn observe_phase(&self, phase: &'static str, since: Instant) {
        self.metrics
            .phase
            .get_or_create(&PhaseLabel { phase })
            .observe(since.elapsed().as_secs_f64());
    }
}

/// Short jittered sleeps between attempts at a busy session, doubling up to
/// 20 ms, until a deadline.
struct Backoff {
    pause: Duration,
    deadline: Instant,
}

impl Backoff {
    fn until(deadline: Instant) -> Self {
        Self {
            pause: Duration::from_micros(250),
            deadline,
        }
    }

    /// Sleeps before the next attempt, or gives up (ABORTED) when that
    /// would pass the deadline.
    async fn pause(&mut self) -> Result<(), SessionError> {
        if Instant::now() + self.pause > self.deadline {
            return Err(SessionError::LockTimeout);
        }
        // Jitter keeps contending changes from retrying in step.
        let jittered = self.pause.mul_f64(rand::rng().random_range(0.5..1.5));
        tokio::time::sleep(jittered).await;
        self.pause = (self.pause * 2).min(Duration::from_millis(20));
        Ok(())
    }
}

/// Runs a clean-up future in the background if dropped before
/// [`OnDrop::disarm`]: how a turn undoes what it started when its caller goes
/// away in the middle of an await (a dropped future runs no more code).
pub struct OnDrop(Option<Pin<Box<dyn Future<Output = ()> + Send>>>);

impl OnDrop {
    pub fn new(cleanup: impl Future<Output = ()> + Send + 'static) -> Self {
        Self(Some(Box::pin(cleanup)))
    }

    /// Finished normally: nothing to undo.
    pub fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for OnDrop {
    fn drop(&mut self) {
        if let (Some(cleanup), Ok(rt)) = (self.0.take(), tokio::runtime::Handle::try_current()) {
            rt.spawn(cleanup);
        }
    }
}

/// The one owner of a turn, from before phase 1 until the turn is settled.
///
/// Its attempt token goes into the turn in phase 1. Dropped unsettled — the
/// caller left, a step failed with an unknown outcome, the task was
/// cancelled between two awaits — it takes its turn back in the background
/// (a no-op if phase 1 never wrote it). Settled, it does nothing more.
pub struct TurnOwner<S: Store> {
    turns: Arc<TurnEngine<S>>,
    project: String,
    session_id: String,
    attempt: String,
    armed: bool,
}

impl<S: Store> TurnOwner<S> {
    pub fn attempt(&self) -> &str {
        &self.attempt
    }

    /// Phase 3: stores the reply right after its message, retrying while the
    /// store is unreachable until `deadline`. On failure the turn is taken
    /// back (the reply must then not be delivered as an answer).
    pub async fn store_reply(mut self, text: &str, deadline: Instant) -> Result<(), SessionError> {
        let ending = Ending::Reply(text);
        let stored = self.settle(ending, deadline).await;
        if stored.is_ok() {
            self.armed = false;
        }
        stored
    }

    /// Takes the turn back after its generation failed with `status`, which
    /// a retry waiting on this attempt then gets too.
    pub async fn fail(mut self, status: &Status, deadline: Instant) {
        let kind = status
            .metadata()
            .get(palaver_core::ERROR_KIND_HEADER)
            .and_then(|v| v.to_str().ok());
        let ending = Ending::Fail {
            code: status.code() as i32,
            message: status.message(),
            kind,
        };
        match self.settle(ending, deadline).await {
            Ok(()) => self.armed = false,
            Err(e) => tracing::warn!(error = %e, "could not take back a failed turn yet"),
        }
    }

    /// Nothing of this attempt's is stored (a replay, a refused request):
    /// nothing to take back.
    pub fn forget(mut self) {
        self.armed = false;
    }

    async fn settle(&self, ending: Ending<'_>, deadline: Instant) -> Result<(), SessionError> {
        self.turns
            .settle(
                &self.project,
                &self.session_id,
                &self.attempt,
                ending,
                deadline,
            )
            .await
    }
}

impl<S: Store> Drop for TurnOwner<S> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let turns = self.turns.clone();
        let project = std::mem::take(&mut self.project);
        let session_id = std::mem::take(&mut self.session_id);
        let attempt = std::mem::take(&mut self.attempt);
        rt.spawn(async move {
            let deadline = Instant::now() + TAKE_BACK_PATIENCE;
            let ended = turns
                .settle(&project, &session_id, &attempt, Ending::Abandon, deadline)
                .await;
            if let Err(e) = ended {
                tracing::error!(
                    error = %e,
                    turn = %LogSafe(&project, &session_id),
                    "could not take back an abandoned turn"
                );
            }
        });
    }
}

/// This process's clock in Unix milliseconds, for turns' deadlines (which
/// other replicas read: their clocks differ by far less than
/// [`ORPHAN_AFTER_MS`]).
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// `deadline` as Unix ms, `now_ms` being now.
fn ends_by(now_ms: u64, deadline: Instant) -> u64 {
    let left = deadline.saturating_duration_since(Instant::now());
    now_ms.saturating_add(u64::try_from(left.as_millis()).unwrap_or(u64::MAX))
}

/// The error a failed attempt ended with, for a retry that waited on it.
fn failure_status(f: &Failure) -> Status {
    let mut status = Status::new(tonic::Code::from(f.code), f.message.clone());
    if let Some(kind) = f.kind.as_deref().and_then(|k| k.parse().ok()) {
        status
            .metadata_mut()
            .insert(palaver_core::ERROR_KIND_HEADER, kind);
    }
    status
}

/// The system prompt first (the session's, else the project's run-time one,
/// else the projects file's), then the history.
fn with_system(
    settings: &ProjectSettings,
    system: Option<String>,
    history: Vec<(Role, String)>,
) -> Vec<(Role, String)> {
    let system = system.unwrap_or_else(|| settings.system_prompt.clone());
    let mut messages = Vec::with_capacity(history.len() + 1);
    if !system.is_empty() {
        messages.push((Role::System, system));
    }
    messages.extend(history);
    messages
}

/// A session named in a log line: `project/session`, with control
/// characters escaped so that an id cannot forge log lines.
pub struct LogSafe<'a>(pub &'a str, pub &'a str);

impl std::fmt::Display for LogSafe<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.0.escape_debug(), self.1.escape_debug())
    }
}
