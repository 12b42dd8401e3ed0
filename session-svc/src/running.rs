//! The turns running in this replica, by (project, session, request id), so
//! that `Sessions/CancelTurn` can stop one.
//!
//! Stopping a turn is dropping it, as when its caller goes away: its call to
//! inference-svc is dropped (the model server aborts the generation) and its
//! owner takes the turn back. The registry is in-process: a cancel reaches
//! only the turns of the replica that serves it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use palaver_core::{ERROR_KIND_CANCELLED, ERROR_KIND_HEADER};
use tokio_util::sync::CancellationToken;
use tonic::Status;

type Key = (String, String, String);

/// Running turns that carry a request id.
#[derive(Default)]
pub struct Running {
    /// Several entries per key while a retry waits for the first attempt.
    turns: Mutex<HashMap<Key, Vec<(u64, CancellationToken)>>>,
    next: AtomicU64,
}

/// One turn's entry; removed when dropped.
pub struct Entry {
    running: Arc<Running>,
    key: Key,
    id: u64,
    token: CancellationToken,
}

impl Entry {
    /// Fires when `CancelTurn` names this turn.
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        let mut turns = lock(&self.running.turns);
        if let Some(entries) = turns.get_mut(&self.key) {
            entries.retain(|(id, _)| *id != self.id);
            if entries.is_empty() {
                turns.remove(&self.key);
            }
        }
    }
}

impl Running {
    /// Registers a turn; `None` without a request id (nothing can name it).
    pub fn register(
        self: &Arc<Self>,
        project: &str,
        session_id: &str,
        request_id: &str,
    ) -> Option<Entry> {
        if request_id.is_empty() {
            return None;
        }
        let key = (
            project.to_owned(),
            session_id.to_owned(),
            request_id.to_owned(),
        );
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let token = CancellationToken::new();
        lock(&self.turns)
            .entry(key.clone())
            .or_default()
            .push((id, token.clone()));
        Some(Entry {
            running: self.clone(),
            key,
            id,
            token,
        })
    }

    /// Cancels the turns under this name; whether there was one.
    pub fn cancel(&self, project: &str, session_id: &str, request_id: &str) -> bool {
        let key = (
            project.to_owned(),
            session_id.to_owned(),
            request_id.to_owned(),
        );
        let turns = lock(&self.turns);
        let Some(entries) = turns.get(&key) else {
            return false;
        };
        for (_, token) in entries {
            token.cancel();
        }
        true
    }
}

/// What the caller of a cancelled turn receives.
pub fn cancelled() -> Status {
    let mut s = Status::cancelled("the turn was cancelled");
    s.metadata_mut().insert(
        ERROR_KIND_HEADER,
        tonic::metadata::MetadataValue::from_static(ERROR_KIND_CANCELLED),
    );
    s
}

/// Plain data behind the lock: a panic elsewhere cannot leave it half-changed.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_turn_is_cancelled_by_its_full_name_only_while_it_runs() {
        let running = Arc::new(Running::default());
        assert!(running.register("p", "s", "").is_none());
        let entry = running.register("p", "s", "r1").unwrap();
        assert!(!running.cancel("p", "s", "r2"));
        assert!(!running.cancel("p", "t", "r1"));
        assert!(!running.cancel("q", "s", "r1"));
        assert!(!entry.token().is_cancelled());
        assert!(running.cancel("p", "s", "r1"));
        assert!(entry.token().is_cancelled());
        drop(entry);
        assert!(!running.cancel("p", "s", "r1"), "finished: a no-op");
    }

    #[test]
    fn the_status_says_cancelled() {
        let s = cancelled();
        assert_eq!(s.code(), tonic::Code::Cancelled);
        assert_eq!(
            s.metadata().get(ERROR_KIND_HEADER).unwrap(),
            ERROR_KIND_CANCELLED
        );
    }
}
