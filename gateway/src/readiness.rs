//! "Is every project subscribed?" as a watchable flag.
//!
//! Tests (and orchestration) must not publish before the broker knows the
//! gateway's subscriptions, or the message is lost; the flag turns true only
//! when every project's connection has its SubAck, and false again while any
//! of them is reconnecting.

use std::sync::Mutex;

use tokio::sync::watch;

/// Per-project subscription state, summarised in one watch channel.
pub struct Readiness {
    subscribed: Mutex<Vec<bool>>,
    all: watch::Sender<bool>,
}

impl Readiness {
    /// `projects` connections, none subscribed yet.
    pub fn new(projects: usize) -> Self {
        Self {
            subscribed: Mutex::new(vec![false; projects]),
            all: watch::Sender::new(false),
        }
    }

    /// Records whether project number `index` is subscribed.
    pub fn set(&self, index: usize, subscribed: bool) {
        let mut state = self.subscribed.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = state.get_mut(index) {
            *slot = subscribed;
        }
        let all = !state.is_empty() && state.iter().all(|s| *s);
        self.all.send_if_modified(|current| {
            let changed = *current != all;
            *current = all;
            changed
        });
    }

    /// Marks every project unsubscribed (shutdown).
    pub fn clear(&self) {
        let len = self
            .subscribed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len();
        for i in 0..len {
            self.set(i, false);
        }
    }

    /// A receiver of the summary flag.
    pub fn watch(&self) -> watch::Receiver<bool> {
        self.all.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn true_only_when_all_are_subscribed() {
        let r = Readiness::new(2);
        let rx = r.watch();
        r.set(0, true);
        assert!(!*rx.borrow());
        r.set(1, true);
        assert!(*rx.borrow());
        r.set(0, false);
        assert!(!*rx.borrow());
        r.set(0, true);
        assert!(*rx.borrow());
        r.clear();
        assert!(!*rx.borrow());
        r.set(7, true); // out of range: ignored, no panic
        assert!(!*rx.borrow());
    }
}
