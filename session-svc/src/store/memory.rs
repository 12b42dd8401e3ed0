//! The in-memory store of the local stack: one process, no Redis, the same
//! semantics (locks with holder tokens and TTLs, expiring sessions, the same
//! sliding-window rate limit).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::{Lease, LockAttempt, Quota, RateLimit, SessionId, Step, Store, StoreError};
use crate::dialog::{Dialog, Ending, Opened, Opening};

#[derive(Default)]
struct Session {
    dialog: Option<(Dialog, Instant)>,
    lock: Option<(String, Instant)>,
    rate: Window,
}

/// A sliding rate-limit window: the instants at which each counted request
/// leaves it.
#[derive(Default)]
struct Window(VecDeque<Instant>);

impl Window {
    fn prune(&mut self, now: Instant) {
        while self.0.front().is_some_and(|t| *t <= now) {
            self.0.pop_front();
        }
    }

    /// Whether one more request fits under `rate` (0: no limit).
    fn has_room(&mut self, rate: RateLimit, now: Instant) -> bool {
        self.prune(now);
        rate.limit == 0 || self.0.len() < rate.limit as usize
    }

    fn count(&mut self, rate: RateLimit, now: Instant) {
        if rate.limit > 0 {
            self.0.push_back(now + rate.window);
        }
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Session {
    /// Forgets the dialog once its TTL has passed, as Redis would.
    fn expire(&mut self, now: Instant) {
        if matches!(self.dialog, Some((_, exp)) if exp <= now) {
            self.dialog = None;
        }
    }

    fn live_dialog(&mut self, now: Instant) -> Option<&Dialog> {
        self.expire(now);
        self.dialog.as_ref().map(|(d, _)| d)
    }

    fn locked(&self, now: Instant) -> bool {
        matches!(&self.lock, Some((_, exp)) if *exp > now)
    }

    fn holds(&self, token: &str, now: Instant) -> bool {
        matches!(&self.lock, Some((t, exp)) if t == token && *exp > now)
    }

    fn is_empty(&self, now: Instant) -> bool {
        let dialog_gone = self.dialog.as_ref().is_none_or(|(_, exp)| *exp <= now);
        let lock_gone = self.lock.as_ref().is_none_or(|(_, exp)| *exp <= now);
        dialog_gone && lock_gone && self.rate.is_empty()
    }
}

#[derive(Default)]
struct Project {
    prompt: Option<String>,
    /// Like the Redis sorted set: session id → when its entry expires.
    /// Expired entries go in the same periodic sweep as expired sessions.
    sessions: HashMap<String, Instant>,
}

/// A lease's holder (with its expiry) and epoch.
#[derive(Default)]
struct LeaseState {
    holder: Option<(String, Instant)>,
    epoch: u64,
}

#[derive(Default)]
struct State {
    sessions: HashMap<(String, String), Session>,
    /// Rate windows per (project, client).
    clients: HashMap<(String, String), Window>,
    projects: HashMap<String, Project>,
    leases: HashMap<String, LeaseState>,
}

/// Dialogs in this process's memory. Lost on restart, by design. Clones
/// share the same dialogs.
#[derive(Default, Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    /// A plain mutex: it is never held across an await, only for a map update.
    state: Mutex<State>,
    /// Counts turns opened, to sweep expired sessions now and then.
    opened: AtomicU64,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        // A panic while holding the lock cannot leave a half-written dialog
        // (dialogs are replaced whole), so a poisoned lock is still usable.
        let mut guard = self.inner.state.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    }

    fn sweep(state: &mut State, now: Instant) {
        for s in state.sessions.values_mut() {
            s.rate.prune(now);
        }
        state.sessions.retain(|_, s| !s.is_empty(now));
        state.clients.retain(|_, w| {
            w.prune(now);
            !w.is_empty()
        });
        for p in state.projects.values_mut() {
            p.sessions.retain(|_, exp| *exp > now);
        }
    }
}

impl MemoryStore {
    /// A one-step change of a stored dialog, in place; a session that is
    /// gone stays gone (the value is then `None`).
    fn change_existing<R>(
        &self,
        id: SessionId<'_>,
        ttl: Duration,
        f: impl FnOnce(&mut Dialog) -> R,
    ) -> Step<Option<R>> {
        let now = Instant::now();
        self.with(|st| {
            let entered = Instant::now();
            let mut value = None;
            if let Some(s) = st.sessions.get_mut(&key(id)) {
                if s.locked(now) {
                    return Step::Busy;
                }
                s.expire(now);
                if let Some((dialog, exp)) = &mut s.dialog {
                    value = Some(f(dialog));
                    *exp = now + ttl;
                }
            }
            Step::Done {
                value,
                held: entered.elapsed(),
            }
        })
    }
}

fn key(id: SessionId<'_>) -> (String, String) {
    (id.project.to_owned(), id.session_id.to_owned())
}

impl Store for MemoryStore {
    async fn open_turn(
        &self,
        id: SessionId<'_>,
        quota: Quota<'_>,
        opening: &Opening<'_>,
        ttl: Duration,
    ) -> Result<Step<Opened>, StoreError> {
        let now = Instant::now();
        if self.inner.opened.fetch_add(1, Ordering::Relaxed) % 4096 == 4095 {
            self.with(|st| Self::sweep(st, now));
        }
        Ok(self.with(|st| {
            let entered = Instant::now();
            let State {
                sessions, clients, ..
            } = st;
            let s = sessions.entry(key(id)).or_default();
            if s.locked(now) {
                return Step::Busy;
            }
            if !opening.is_retry_in(s.live_dialog(now)) {
                let mut client = quota
                    .client
                    .map(|(c, r)| (clients.entry((id.project.to_owned(), c.to_owned())), r))
                    .map(|(w, r)| (w.or_default(), r));
                // Both windows are checked before either counts: a refused
                // request counts nowhere.
                let session_ok = quota.session.is_none_or(|r| s.rate.has_room(r, now));
                let client_ok = client.as_mut().is_none_or(|(w, r)| w.has_room(*r, now));
                if !(session_ok && client_ok) {
                    return Step::RateLimited;
                }
                if let Some(r) = quota.session {
                    s.rate.count(r, now);
                }
                if let Some((w, r)) = client {
                    w.count(r, now);
                }
            }
            // Changed in place: no copy of the dialog under the store's mutex.
            s.expire(now);
            let (dialog, exp) = s
                .dialog
                .get_or_insert_with(|| (Dialog::starting_at(opening.first_seq), now));
            let value = dialog.open(opening);
            *exp = now + ttl;
            Step::Done {
                value,
                held: entered.elapsed(),
            }
        }))
    }

    async fn end_turn(
        &self,
        id: SessionId<'_>,
        attempt: &str,
        ending: Ending<'_>,
        ttl: Duration,
    ) -> Result<Step<()>, StoreError> {
        Ok(self
            .change_existing(id, ttl, |d| {
                d.end(attempt, ending);
            })
            .map(drop))
    }

    async fn take_over(
        &self,
        id: SessionId<'_>,
        request_id: &str,
        from: &str,
        to: &str,
        ends_by: u64,
        ttl: Duration,
    ) -> Result<Step<Option<Opened>>, StoreError> {
        Ok(self
            .change_existing(id, ttl, |d| d.take_over(request_id, from, to, ends_by))
            .map(Option::flatten))
    }

    async fn heartbeat(&self, _replica: &str, _ttl: Duration) -> Result<(), StoreError> {
        Ok(())
    }

    async fn hold_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<Lease, StoreError> {
        let now = Instant::now();
        Ok(self.with(|st| {
            let l = st.leases.entry(name.to_owned()).or_default();
            if l.holder.as_ref().is_some_and(|(_, exp)| *exp <= now) {
                l.holder = None;
            }
            let mine = l.holder.as_ref().is_some_and(|(h, _)| h == holder);
            if ttl.is_zero() {
                if mine {
                    l.holder = None;
                }
            } else if mine {
                l.holder = Some((holder.to_owned(), now + ttl));
            } else if l.holder.is_none() {
                l.holder = Some((holder.to_owned(), now + ttl));
                l.epoch += 1;
            }
            Lease {
                held: l.holder.as_ref().is_some_and(|(h, _)| h == holder),
                epoch: l.epoch,
                holder: l.holder.as_ref().map(|(h, _)| h.clone()),
            }
        }))
    }

    async fn alive(&self, _replica: &str) -> Result<bool, StoreError> {
        // One process holds every turn of this store, and the turns die with it.
        Ok(true)
    }

    async fn try_lock(
        &self,
        id: SessionId<'_>,
        token: &str,
        lock_ttl: Duration,
    ) -> Result<LockAttempt, StoreError> {
        let now = Instant::now();
        Ok(self.with(|st| {
            let s = st.sessions.entry(key(id)).or_default();
            if s.locked(now) {
                return LockAttempt::Busy;
            }
            s.lock = Some((token.to_owned(), now + lock_ttl));
            LockAttempt::Locked(s.live_dialog(now).cloned())
        }))
    }

    async fn load(&self, id: SessionId<'_>) -> Result<Option<Dialog>, StoreError> {
        let now = Instant::now();
        Ok(self.with(|st| {
            st.sessions
                .get_mut(&key(id))
                .and_then(|s| s.live_dialog(now).cloned())
        }))
    }

    async fn commit(
        &self,
        id: SessionId<'_>,
        token: &str,
        dialog: Option<&Dialog>,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let now = Instant::now();
        Ok(self.with(|st| {
            let Some(s) = st.sessions.get_mut(&key(id)) else {
                return false;
            };
            if !s.holds(token, now) {
                return false;
            }
            s.dialog = dialog.map(|d| (d.clone(), now + ttl));
            s.lock = None;
            true
        }))
    }

    async fn release(&self, id: SessionId<'_>, token: &str) -> Result<(), StoreError> {
        let now = Instant::now();
        self.with(|st| {
            if let Some(s) = st.sessions.get_mut(&key(id)) {
                if s.holds(token, now) {
                    s.lock = None;
                }
            }
        });
        Ok(())
    }

    async fn touch_index(&self, id: SessionId<'_>, ttl: Duration) -> Result<(), StoreError> {
        let exp = Instant::now() + ttl;
        self.with(|st| {
            let p = st.projects.entry(id.project.to_owned()).or_default();
            p.sessions.insert(id.session_id.to_owned(), exp);
        });
        Ok(())
    }

    async fn sessions(&self, project: &str) -> Result<Vec<String>, StoreError> {
        let now = Instant::now();
        Ok(self.with(|st| {
            st.projects.get(project).map_or_else(Vec::new, |p| {
                p.sessions
                    .iter()
                    .filter(|(_, exp)| **exp > now)
                    .map(|(id, _)| id.clone())
                    .collect()
            })
        }))
    }

    async fn forget(&self, id: SessionId<'_>) -> Result<(), StoreError> {
        self.with(|st| {
            if let Some(p) = st.projects.get_mut(id.project) {
                p.sessions.remove(id.session_id);
            }
        });
        Ok(())
    }

    async fn project_prompt(&self, project: &str) -> Result<Option<String>, StoreError> {
        Ok(self.with(|st| st.projects.get(project).and_then(|p| p.prompt.clone())))
    }

    async fn set_project_prompt(&self, project: &str, prompt: &str) -> Result<(), StoreError> {
        self.with(|st| {
            st.projects.entry(project.to_owned()).or_default().prompt = Some(prompt.to_owned());
        });
        Ok(())
    }
}
