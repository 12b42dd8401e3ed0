//! Keeps one session's messages in the order they arrived.
//!
//! Every request runs in its own task, and tasks start in any order; two
//! messages a user typed quickly could otherwise enter the history swapped.
//! So each message takes a [`Ticket`] in the MQTT poll loop, in arrival
//! order, and sends its turn only once the session's previous message is
//! *accepted* (stored by session-svc, the first event of `ChatStream`) —
//! not answered: the second message still does not wait for the first reply.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

type Key = (String, String);

/// The tail of each session's chain of messages not yet accepted.
#[derive(Default)]
pub struct SessionOrder {
    /// (project, session) → the latest ticket's id and the signal it sends
    /// when accepted. Only sessions with a message in phase 1 have an entry.
    tails: Mutex<HashMap<Key, (u64, oneshot::Receiver<()>)>>,
    next_id: AtomicU64,
}

impl SessionOrder {
    /// Takes the next place in the session's line. Call it in arrival order.
    pub fn ticket(self: &Arc<Self>, project: &str, session_id: &str) -> Ticket {
        let key = (project.to_owned(), session_id.to_owned());
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (done, rx) = oneshot::channel();
        let previous = self
            .tails
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.clone(), (id, rx))
            .map(|(_, rx)| rx);
        Ticket {
            previous,
            done: Some(done),
            key,
            id,
            order: self.clone(),
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.tails.lock().unwrap().len()
    }
}

/// One message's place in its session's line. Dropping it lets the next
/// message go once this one's predecessors have, so an error or a cancelled
/// task never blocks the session, and never lets a later message overtake
/// an earlier one still in phase 1.
pub struct Ticket {
    /// The previous message's signal; `None` once it came (our turn).
    previous: Option<oneshot::Receiver<()>>,
    done: Option<oneshot::Sender<()>>,
    key: Key,
    id: u64,
    order: Arc<SessionOrder>,
}

impl Ticket {
    /// Waits until the session's previous message was accepted (or failed).
    /// Cancel-safe: dropped while waiting, the ticket still waits in line.
    pub async fn wait_turn(&mut self) {
        if let Some(prev) = &mut self.previous {
            // An error means the previous ticket was dropped: our turn too.
            let _ = prev.await;
            self.previous = None;
        }
    }

    /// This message is accepted: the next one may go.
    pub fn release(&mut self) {
        if let Some(done) = self.done.take() {
            self.order.pass_on(&self.key, self.id, done);
        }
    }
}

impl SessionOrder {
    /// Signals the ticket after `id` and forgets the session's line if `id`
    /// was its last ticket.
    fn pass_on(&self, key: &Key, id: u64, done: oneshot::Sender<()>) {
        let _ = done.send(());
        let mut tails = self.tails.lock().unwrap_or_else(|p| p.into_inner());
        if tails.get(key).is_some_and(|(tail, _)| *tail == id) {
            tails.remove(key);
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let Some(done) = self.done.take() else {
            return;
        };
        match self.previous.take() {
            None => self.order.pass_on(&self.key, self.id, done),
            // Gone before its turn (a timeout that included the wait): the
            // next message still waits for this one's predecessor.
            Some(prev) => {
                let (order, key, id) = (self.order.clone(), self.key.clone(), self.id);
                match tokio::runtime::Handle::try_current() {
                    Ok(rt) => {
                        rt.spawn(async move {
                            let _ = prev.await;
                            order.pass_on(&key, id, done);
                        });
                    }
                    Err(_) => order.pass_on(&key, id, done),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_message_waits_for_the_previous_acceptance_only_in_its_session() {
        let order = Arc::new(SessionOrder::default());
        let mut first = order.ticket("p", "s");
        let mut second = order.ticket("p", "s");
        let mut other = order.ticket("p", "t");
        first.wait_turn().await;
        other.wait_turn().await;
        let blocked = tokio::time::timeout(Duration::from_millis(50), second.wait_turn()).await;
        assert!(blocked.is_err(), "second went before first was accepted");
        first.release();
        tokio::time::timeout(Duration::from_millis(500), second.wait_turn())
            .await
            .expect("released");
        drop((first, second, other));
        assert_eq!(order.len(), 0, "no entry outlives its messages");
    }

    #[tokio::test]
    async fn a_ticket_dropped_while_waiting_keeps_its_successor_waiting() {
        let order = Arc::new(SessionOrder::default());
        let mut first = order.ticket("p", "s");
        let mut second = order.ticket("p", "s");
        let mut third = order.ticket("p", "s");
        first.wait_turn().await;
        // The second times out while waiting for the first (still in phase 1).
        let waited = tokio::time::timeout(Duration::from_millis(20), second.wait_turn()).await;
        assert!(waited.is_err());
        drop(second);
        let overtook = tokio::time::timeout(Duration::from_millis(50), third.wait_turn()).await;
        assert!(overtook.is_err(), "third went before first was accepted");
        first.release();
        tokio::time::timeout(Duration::from_millis(500), third.wait_turn())
            .await
            .expect("goes once the first is accepted");
        drop((first, third));
        tokio::task::yield_now().await;
        assert_eq!(order.len(), 0, "no entry outlives its messages");
    }

    #[tokio::test]
    async fn a_dropped_ticket_lets_the_next_go() {
        let order = Arc::new(SessionOrder::default());
        let first = order.ticket("p", "s");
        let mut second = order.ticket("p", "s");
        drop(first);
        tokio::time::timeout(Duration::from_millis(500), second.wait_turn())
            .await
            .expect("not blocked by a failed predecessor");
    }
}
