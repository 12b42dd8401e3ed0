//! Where dialogs live: Redis in production, memory for the local stack.
//!
//! A store offers the few atomic steps the turn engine needs and nothing
//! more. Both implementations keep the same semantics — a short per-session
//! lock with a holder token and a TTL, TTLs on session data, a sliding-window
//! rate limit — and one contract test suite (`tests/store_contract.rs`) runs
//! against both.

mod memory;
mod redis;

use std::future::Future;
use std::time::Duration;

pub use self::memory::MemoryStore;
pub use self::redis::RedisStore;
use crate::dialog::Dialog;

/// A sliding-window rate limit: at most `limit` requests per `window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub limit: u32,
    pub window: Duration,
}

/// Outcome of one attempt at entering a session.
#[derive(Debug)]
pub enum Admit {
    /// The request was over the session's rate limit; nothing was locked.
    RateLimited,
    /// Another turn holds the lock. A rate limit, if asked for, was counted.
    Busy,
    /// The lock is ours; here is the dialog (`None`: no such session yet).
    Locked(Option<Dialog>),
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
    /// Counts this request against `rate` (if given) and, unless limited,
    /// tries once to take the session's lock for `lock_ttl`, loading the
    /// dialog in the same step.
    fn admit(
        &self,
        id: SessionId<'_>,
        rate: Option<RateLimit>,
        token: &str,
        lock_ttl: Duration,
    ) -> impl Future<Output = Result<Admit, StoreError>> + Send;

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

    /// Records that the session exists (for project-wide actions) for `ttl`.
    fn touch_index(
        &self,
        id: SessionId<'_>,
        ttl: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Ids of the project's sessions (may include a few that expired).
    fn sessions(
        &self,
        project: &str,
    ) -> impl Future<Output = Result<Vec<String>, StoreError>> + Send;

    /// Removes a session from the project's index and drops its rate-limit state.
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
