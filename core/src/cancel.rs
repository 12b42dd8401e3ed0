//! Running turns that a cancel can name: the one registry behind the
//! gateway's MQTT cancel and session-svc's `CancelTurn`.
//!
//! A turn registers under its name (the caller chooses what names it) and
//! holds the returned [`Registration`] while it runs; cancelling the name
//! fires the token of every turn registered under it (a retry may run
//! beside its first delivery). Dropping the registration removes it, so a
//! cancel that comes after the turn finished finds nothing.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

/// The turns running now, by name.
pub struct Registry<K> {
    /// Several entries per name while a retry runs beside its first try.
    turns: Mutex<HashMap<K, Vec<(u64, CancellationToken)>>>,
    next: AtomicU64,
}

impl<K> Default for Registry<K> {
    fn default() -> Self {
        Self {
            turns: Mutex::new(HashMap::new()),
            next: AtomicU64::new(0),
        }
    }
}

/// One turn's entry: its token, removed from the registry on drop.
pub struct Registration<K: Hash + Eq> {
    registry: Arc<Registry<K>>,
    key: K,
    id: u64,
    token: CancellationToken,
}

impl<K: Hash + Eq> Registration<K> {
    /// Fires when a cancel names this turn.
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }
}

impl<K: Hash + Eq> Drop for Registration<K> {
    fn drop(&mut self) {
        let mut turns = lock(&self.registry.turns);
        if let Some(entries) = turns.get_mut(&self.key) {
            entries.retain(|(id, _)| *id != self.id);
            if entries.is_empty() {
                turns.remove(&self.key);
            }
        }
    }
}

impl<K: Hash + Eq + Clone> Registry<K> {
    /// Registers a turn under `key` until the returned guard is dropped.
    pub fn register(self: &Arc<Self>, key: K) -> Registration<K> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let token = CancellationToken::new();
        lock(&self.turns)
            .entry(key.clone())
            .or_default()
            .push((id, token.clone()));
        Registration {
            registry: self.clone(),
            key,
            id,
            token,
        }
    }

    /// Cancels every running turn under `key`; how many there were (0: a
    /// finished or unknown turn).
    pub fn cancel(&self, key: &K) -> usize {
        let turns = lock(&self.turns);
        let Some(entries) = turns.get(key) else {
            return 0;
        };
        for (_, token) in entries {
            token.cancel();
        }
        entries.len()
    }

    /// Turns registered now.
    pub fn len(&self) -> usize {
        lock(&self.turns).values().map(Vec::len).sum()
    }

    /// Whether no turn is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Plain data behind the lock: a panic elsewhere cannot leave it half-changed.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cancel_fires_every_turn_under_its_name_while_they_run() {
        let reg = Arc::new(Registry::default());
        let first = reg.register("a");
        let retry = reg.register("a");
        let other = reg.register("b");
        assert_eq!(reg.len(), 3);
        assert_eq!(reg.cancel(&"c"), 0);
        assert_eq!(reg.cancel(&"a"), 2);
        assert!(first.token().is_cancelled() && retry.token().is_cancelled());
        assert!(!other.token().is_cancelled());
        drop((first, retry));
        assert_eq!(reg.cancel(&"a"), 0, "finished: a no-op");
        drop(other);
        assert!(reg.is_empty());
    }
}
