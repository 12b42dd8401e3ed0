//! The three-phase turn: the one rule of the design lives here.
//!
//! 1. **prepare** — append the user message, trim, snapshot the history for
//!    the model, store: one atomic step of the store;
//! 2. **generate** — nothing held (done by the caller);
//! 3. **store** — put the reply right after its message, store: one atomic
//!    step.
//!
//! The session is held exclusively only while a step runs inside the store,
//! never across a round trip (see `store/mod.rs` for why). Rarer two-step
//! changes (reset, delete, clear) take the session's lock with a random
//! holder token and a TTL, and release it by a compare-and-delete in the
//! same step that writes: a holder that stalled past its TTL writes nothing.
//! Both kinds retry a busy session with short jittered sleeps up to a
//! deadline.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use palaver_core::projects::{ProjectSettings, Projects};
use rand::Rng;
use tokio::time::Instant;

use crate::dialog::{random_first_seq, Dialog, Ending, Limits, Opened, Opening, Role};
use crate::error::SessionError;
use crate::metrics::{Metrics, PhaseLabel};
use crate::store::{Admit, RateLimit, SessionId, Step, Store, StoreError};

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

/// A user message on its way in.
#[derive(Debug, Clone)]
pub struct NewTurn<'a> {
    pub project: &'a str,
    pub session_id: &'a str,
    pub message: &'a str,
    pub request_id: Option<&'a str>,
    pub system_prompt: Option<&'a str>,
}

/// What phase 1 produced.
#[derive(Debug)]
pub enum Prepared {
    /// Generate a reply for turn `seq` from `messages` (system prompt first).
    Generate {
        seq: u64,
        messages: Vec<(Role, String)>,
    },
    /// A retried request whose reply is already stored.
    Replay(String),
}

/// The turn engine over one store.
pub struct Turns<S> {
    store: S,
    projects: Projects,
    lock: LockConfig,
    metrics: Arc<Metrics>,
}

impl<S: Store> Turns<S> {
    pub fn new(store: S, projects: Projects, lock: LockConfig, metrics: Arc<Metrics>) -> Self {
        Self {
            store,
            projects,
            lock,
            metrics,
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

    /// Phase 1. Counts the rate limit, appends the message and returns what
    /// to send to the model.
    pub async fn prepare(&self, t: &NewTurn<'_>) -> Result<Prepared, SessionError> {
        let started = Instant::now();
        let settings = self.project(t.project)?;
        let id = SessionId {
            project: t.project,
            session_id: t.session_id,
        };
        let rate = (settings.rate_limit > 0).then_some(RateLimit {
            limit: settings.rate_limit,
            window: settings.rate_window,
        });
        let limits = Limits {
            max_messages: settings.max_history_messages,
            max_tokens: settings.max_history_tokens,
        };
        let opening = Opening {
            message: t.message,
            request_id: t.request_id,
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
            self.one_step(rate, |rate| {
                self.store
                    .open_turn(id, rate, &opening, settings.session_ttl)
            })
        );
        indexed?;
        let prepared = match opened? {
            Opened::Replay(reply) => Prepared::Replay(reply),
            Opened::Generate {
                seq,
                system_prompt,
                history,
            } => {
                let system = system_prompt
                    .or(project_prompt?)
                    .unwrap_or_else(|| settings.system_prompt.clone());
                let mut messages = Vec::with_capacity(history.len() + 1);
                if !system.is_empty() {
                    messages.push((Role::System, system));
                }
                messages.extend(history);
                Prepared::Generate { seq, messages }
            }
        };
        self.observe_phase("prepare", started);
        Ok(prepared)
    }

    /// Phase 3. Stores the reply of turn `seq` after its message. A session
    /// deleted or cleared meanwhile is left as it is.
    pub async fn store_reply(
        &self,
        project: &str,
        session_id: &str,
        seq: u64,
        reply: &str,
    ) -> Result<(), SessionError> {
        let started = Instant::now();
        let settings = self.project(project)?;
        let id = SessionId {
            project,
            session_id,
        };
        self.one_step(None, |_| {
            self.store
                .end_turn(id, seq, Ending::Reply(reply), settings.session_ttl)
        })
        .await?;
        self.observe_phase("store", started);
        Ok(())
    }

    /// Takes back turn `seq` after its generation failed.
    pub async fn abandon(
        &self,
        project: &str,
        session_id: &str,
        seq: u64,
    ) -> Result<(), SessionError> {
        let settings = self.project(project)?;
        let id = SessionId {
            project,
            session_id,
        };
        self.one_step(None, |_| {
            self.store
                .end_turn(id, seq, Ending::Abandon, settings.session_ttl)
        })
        .await
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

    /// Runs a one-step change, retrying while a two-step change holds the
    /// session. `attempt` gets the rate limit to count: on the first attempt
    /// only.
    async fn one_step<T, F, Fut>(
        &self,
        rate: Option<RateLimit>,
        mut attempt: F,
    ) -> Result<T, SessionError>
    where
        F: FnMut(Option<RateLimit>) -> Fut,
        Fut: Future<Output = Result<Step<T>, StoreError>>,
    {
        let first_try = Instant::now();
        let mut busy = Backoff::until(first_try + self.lock.wait);
        let mut rate = rate;
        loop {
            match attempt(rate.take()).await? {
                Step::RateLimited => return Err(SessionError::RateLimited),
                Step::Busy => busy.pause().await?,
                Step::Done { value, held } => {
                    self.metrics
                        .lock_wait
                        .observe(first_try.elapsed().as_secs_f64());
                    self.metrics.lock_hold.observe(held.as_secs_f64());
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
            match self.store.admit(id, &token, self.lock.ttl).await? {
                Admit::Busy => {
                    if let Err(e) = busy.pause().await {
                        held.disarm();
                        return Err(e);
                    }
                }
                Admit::Locked(mut dialog) => {
                    let acquired = Instant::now();
                    self.metrics
                        .lock_wait
                        .observe((acquired - first_try).as_secs_f64());
                    let out = f(&mut dialog);
                    let committed = self.store.commit(id, &token, dialog.as_ref(), ttl).await;
                    held.disarm();
                    self.metrics
                        .lock_hold
                        .observe(acquired.elapsed().as_secs_f64());
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

/// Takes back turn `seq` if dropped before disarmed: a caller that went away
/// mid-generation (disconnect, deadline, draining) leaves no orphaned message.
pub fn abandon_on_drop<S: Store>(
    turns: Arc<Turns<S>>,
    project: &str,
    session_id: &str,
    seq: u64,
) -> OnDrop {
    let (project, session_id) = (project.to_owned(), session_id.to_owned());
    OnDrop::new(async move {
        if let Err(e) = turns.abandon(&project, &session_id, seq).await {
            tracing::warn!(error = %e, "could not take back an abandoned turn");
        }
    })
}
