//! Where dialogs live: Redis in production, memory for the local stack.
//!
//! A store offers the few atomic steps the turn engine needs and nothing
//! more. Both implementations keep the same semantics — one-step turn
//! changes, a short per-session lock with a holder token and a TTL for the
//! rarer two-step changes, TTLs on session data, a sliding-window rate
//! limit — and one contract test suite (`tests/store_contract.rs`) runs
//! against both.
//!
//! Why two kinds of change: the two held phases of a turn (open, end) are
//! each one atomic step inside the store (in Redis, a compare-and-set script
//! that swaps in the dialog the rules produced), so a session is held only
//! while its data changes, never for a round trip between processes. Under
//! load a single round trip on a busy host takes milliseconds (see
//! BENCHMARKS.md); a lock spanning one would too. Control
//! actions (reset, delete, clear) are rare and free-form, so they load,
//! change and store under the lock, and the one-step changes wait for that
//! lock like any other holder.

mod memory;
mod redis;

use std::future::Future;
use std::time::Duration;

pub use self::memory::MemoryStore;
pub use self::redis::RedisStore;
use crate::dialog::{Dialog, Ending, Opened, Opening};

/// A sliding-window rate limit: at most `limit` requests per `window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub limit: u32,
    pub window: Duration,
}

/// The limits a new turn counts against; a turn goes ahead only if it is
/// within all of them, and then counts in each.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Quota<'a> {
    /// Per session.
    pub session: Option<RateLimit>,
    /// Per client of the project: the client's id and its limit. Keyed on
    /// the client, not the session, so that fresh session ids do not
    /// multiply it; `None` for a caller without a client id.
    pub client: Option<(&'a str, RateLimit)>,
}

/// Outcome of one attempt at taking a session's lock.
#[derive(Debug)]
pub enum LockAttempt {
    /// Another change holds the lock.
    Busy,
    /// The lock is ours; here is the dialog (`None`: no such session yet).
    Locked(Option<Dialog>),
}

/// Outcome of one attempt at a one-step change.
#[derive(Debug, PartialEq)]
pub enum Step<T> {
    /// The request was over the session's or its client's rate limit;
    /// nothing changed.
    RateLimited,
    /// A two-step change holds the session's lock; nothing changed.
    Busy,
    /// Another change got in first (Redis: the stored dialog was not the one
    /// expected); nothing changed, and the next attempt starts from what is
    /// stored now.
    Changed,
    /// Done. `held` is how long the session was held exclusively for it, by
    /// the store's own clock.
    Done { value: T, held: Duration },
}

impl<T> Step<T> {
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Step<U> {
        match self {
            Step::RateLimited => Step::RateLimited,
            Step::Busy => Step::Busy,
            Step::Changed => Step::Changed,
            Step::Done { value, held } => Step::Done {
                value: f(value),
                held,
            },
        }
    }
}

/// A named lease as it stands after [`Store::hold_lease`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// Whether the asking holder holds it now.
    pub held: bool,
    /// Times the lease changed hands; a new holder gets a larger number.
    pub epoch: u64,
    /// The current holder, if any.
    pub holder: Option<String>,
}

/// Why a store call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("dialog store unavailable: {0}")]
    Unavailable(String),
    #[error("stored dialog is corrupt: {0}")]
    Corrupt(String),
}

/// Addresses one session.
#[derive(Debug, Clone, Copy)]
pub struct SessionId<'a> {
    pub project: &'a str,
    pub session_id: &'a str,
}

/// The atomic steps of the turn engine.
///
/// `token` is a random value naming the lock holder: only the holder may
/// write or release, so a holder that stalled past the lock TTL cannot
/// overwrite a newer holder's work. Clones share one store (a connection or
/// a map), so a clone can release a lock from a spawned task.
pub trait Store: Clone + Send + Sync + 'static {
    /// Phase 1 of a turn in one atomic step: unless locked, opens the turn
    /// ([`Dialog::open`]) and stores the dialog with `ttl`. A new turn counts
    /// against `quota` and is refused over any of its limits; a retry of a
    /// stored request is not counted, so it always gets its reply.
    fn open_turn(
        &self,
        id: SessionId<'_>,
        quota: Quota<'_>,
        opening: &Opening<'_>,
        ttl: Duration,
    ) -> impl Future<Output = Result<Step<Opened>, StoreError>> + Send;

    /// Phase 3 of a turn in one atomic step: unless locked, ends the turn
    /// `attempt` owns ([`Dialog::end`]) and stores the dialog with `ttl`. A
    /// session that is gone (deleted, expired) stays gone.
    fn end_turn(
        &self,
        id: SessionId<'_>,
        attempt: &str,
        ending: Ending<'_>,
        ttl: Duration,
    ) -> impl Future<Output = Result<Step<()>, StoreError>> + Send;

    /// Moves the unanswered turn of `request_id` from attempt `from`, whose
    /// process died, to `to` in one atomic step ([`Dialog::take_over`]).
    fn take_over(
        &self,
        id: SessionId<'_>,
        request_id: &str,
        from: &str,
        to: &str,
        ends_by: u64,
        ttl: Duration,
    ) -> impl Future<Output = Result<Step<Option<Opened>>, StoreError>> + Send;

    /// Says that session-svc process `replica` is alive, for `ttl`.
    fn heartbeat(
        &self,
        replica: &str,
        ttl: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Takes lease `name` for `holder` if it is free (a new epoch), renews it
    /// for `ttl` if `holder` has it, or with a zero `ttl` releases it if
    /// `holder` has it; says where it stands.
    fn hold_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> impl Future<Output = Result<Lease, StoreError>> + Send;

    /// Whether process `replica` said it was alive within its last `ttl`.
    fn alive(&self, replica: &str) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Tries once to take the session's lock for `lock_ttl`, loading the
    /// dialog in the same step.
    fn try_lock(
        &self,
        id: SessionId<'_>,
        token: &str,
        lock_ttl: Duration,
    ) -> impl Future<Output = Result<LockAttempt, StoreError>> + Send;

    /// Reads the dialog without locking (a consistent snapshot: dialogs are
    /// written whole).
    fn load(
        &self,
        id: SessionId<'_>,
    ) -> impl Future<Output = Result<Option<Dialog>, StoreError>> + Send;

    /// Writes `dialog` (or deletes the session's data when `None`) with
    /// `ttl`, and releases the lock — only if `token` still holds it. Returns
    /// false, writing nothing, when the lock was lost.
    fn commit(
        &self,
        id: SessionId<'_>,
        token: &str,
        dialog: Option<&Dialog>,
        ttl: Duration,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Releases the lock without writing, if `token` still holds it.
    fn release(
        &self,
        id: SessionId<'_>,
        token: &str,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Keeps the session in its project's index, for project-wide actions,
    /// until `ttl` from now.
    fn touch_index(
        &self,
        id: SessionId<'_>,
        ttl: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Ids of the project's sessions touched within their TTL.
    fn sessions(
        &self,
        project: &str,
    ) -> impl Future<Output = Result<Vec<String>, StoreError>> + Send;

    /// Removes a session from the project's index. Its rate-limit window
    /// (and its client's) stays: deleting a session must not reset a limit.
    fn forget(&self, id: SessionId<'_>) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The project's default system prompt, if one was set at run time.
    fn project_prompt(
        &self,
        project: &str,
    ) -> impl Future<Output = Result<Option<String>, StoreError>> + Send;

    /// Sets the project's default system prompt for every replica.
    fn set_project_prompt(
        &self,
        project: &str,
        prompt: &str,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
}
