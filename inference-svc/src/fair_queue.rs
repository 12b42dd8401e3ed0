//! Who gets a freed generation slot: the waiting client with the fewest
//! generations running (ties: the one waiting longest), so that a client
//! with many sessions cannot hold every slot while others wait. With fair
//! share off it is plain first come, first served.
//!
//! Pure bookkeeping, no I/O and no clock: [`crate::limit`] wraps it in a
//! mutex and does the waiting. A client is the `client` of a
//! `GenerateRequest`; the empty one is every anonymous caller together.

use std::collections::{HashMap, VecDeque};

/// Slots, the generations running per client, and the waiters per client.
/// `T` is what a waiter is woken with (a channel in the service, a label in
/// tests).
#[derive(Debug)]
pub struct FairQueue<T> {
    free: usize,
    fair: bool,
    running: HashMap<String, usize>,
    waiting: HashMap<String, VecDeque<Waiter<T>>>,
    waiters: usize,
    next_seq: u64,
}

#[derive(Debug)]
struct Waiter<T> {
    seq: u64,
    wake: T,
}

/// A waiter's place in the queue, to leave it by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket(u64);

/// What [`FairQueue::admit`] decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Admit {
    /// A slot was free: it is the caller's now.
    Now,
    /// Queued: the caller waits to be woken (given the slot) or leaves.
    Queued(Ticket),
    /// `max_queue` callers wait already.
    Full,
}

impl<T> FairQueue<T> {
    /// `slots` generations may run at once; `fair` picks the next one by
    /// client (else by arrival only).
    pub fn new(slots: usize, fair: bool) -> Self {
        Self {
            free: slots,
            fair,
            running: HashMap::new(),
            waiting: HashMap::new(),
            waiters: 0,
            next_seq: 0,
        }
    }

    /// Takes a free slot for `client`, or queues it (if fewer than
    /// `max_queue` wait) with `wake`, which [`release`](Self::release)
    /// hands back once the slot is given to it.
    pub fn admit(&mut self, client: &str, max_queue: usize, wake: T) -> Admit {
        // A free slot with waiters cannot happen: a release hands its slot
        // on at once. So a free slot is the arriving caller's.
        if self.free > 0 {
            self.free -= 1;
            *self.running.entry(client.to_owned()).or_default() += 1;
            return Admit::Now;
        }
        if self.waiters >= max_queue {
            return Admit::Full;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.waiting
            .entry(client.to_owned())
            .or_default()
            .push_back(Waiter { seq, wake });
        self.waiters += 1;
        Admit::Queued(Ticket(seq))
    }

    /// `client`'s generation ended: its slot goes to the next waiter, whose
    /// client and `wake` are returned (it now holds the slot), or becomes free.
    pub fn release(&mut self, client: &str) -> Option<(String, T)> {
        if let Some(n) = self.running.get_mut(client) {
            *n -= 1;
            if *n == 0 {
                self.running.remove(client);
            }
        }
        let Some(next) = self.pick() else {
            self.free += 1;
            return None;
        };
        let queue = self.waiting.get_mut(&next)?;
        let waiter = queue.pop_front()?;
        if queue.is_empty() {
            self.waiting.remove(&next);
        }
        self.waiters -= 1;
        *self.running.entry(next.clone()).or_default() += 1;
        Some((next, waiter.wake))
    }

    /// Takes `client`'s waiter `ticket` out of the queue (it timed out or
    /// its caller left). False if it is no longer there: it was given a
    /// slot, which the caller must now [`release`](Self::release).
    pub fn leave(&mut self, client: &str, ticket: Ticket) -> bool {
        let Some(queue) = self.waiting.get_mut(client) else {
            return false;
        };
        let Some(at) = queue.iter().position(|w| w.seq == ticket.0) else {
            return false;
        };
        queue.remove(at);
        if queue.is_empty() {
            self.waiting.remove(client);
        }
        self.waiters -= 1;
        true
    }

    /// Callers waiting now.
    pub fn waiters(&self) -> usize {
        self.waiters
    }

    /// Slots free now.
    pub fn free(&self) -> usize {
        self.free
    }

    /// Generations running now for `client`.
    pub fn running(&self, client: &str) -> usize {
        self.running.get(client).copied().unwrap_or(0)
    }

    /// The client whose first waiter goes next. A scan over waiting clients:
    /// the queue is bounded (a few hundred), and a release is per generation.
    fn pick(&self) -> Option<String> {
        self.waiting
            .iter()
            .filter_map(|(client, q)| q.front().map(|w| (client, w.seq)))
            .min_by_key(|(client, seq)| {
                let running = if self.fair { self.running(client) } else { 0 };
                (running, *seq)
            })
            .map(|(client, _)| client.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queued(q: &mut FairQueue<&'static str>, client: &str, label: &'static str) -> Ticket {
        match q.admit(client, 100, label) {
            Admit::Queued(t) => t,
            other => panic!("{label}: {other:?}"),
        }
    }

    #[test]
    fn a_freed_slot_goes_to_the_client_with_fewest_running() {
        let mut q = FairQueue::new(2, true);
        assert_eq!(q.admit("flood", 100, "f1"), Admit::Now);
        assert_eq!(q.admit("flood", 100, "f2"), Admit::Now);
        queued(&mut q, "flood", "f3");
        queued(&mut q, "flood", "f4");
        queued(&mut q, "calm", "c1");
        // "calm" came last but runs nothing; "flood" runs two.
        assert_eq!(q.release("flood"), Some(("calm".into(), "c1")));
        assert_eq!(q.release("flood"), Some(("flood".into(), "f3")));
        assert_eq!((q.running("flood"), q.running("calm")), (1, 1));
        assert_eq!(q.waiters(), 1);
    }

    #[test]
    fn ties_go_to_the_longest_waiting() {
        let mut q = FairQueue::new(1, true);
        assert_eq!(q.admit("x", 100, "x1"), Admit::Now);
        queued(&mut q, "b", "b1");
        queued(&mut q, "a", "a1");
        queued(&mut q, "b", "b2");
        assert_eq!(q.release("x"), Some(("b".into(), "b1")));
        // Now "b" runs one, "a" none.
        assert_eq!(q.release("b"), Some(("a".into(), "a1")));
        assert_eq!(q.release("a"), Some(("b".into(), "b2")));
        assert_eq!(q.release("b"), None);
        assert_eq!(q.free(), 1);
    }

    #[test]
    fn without_fair_share_the_order_is_arrival() {
        let mut q = FairQueue::new(1, false);
        assert_eq!(q.admit("flood", 100, "f1"), Admit::Now);
        queued(&mut q, "flood", "f2");
        queued(&mut q, "calm", "c1");
        assert_eq!(q.release("flood"), Some(("flood".into(), "f2")));
        assert_eq!(q.release("flood"), Some(("calm".into(), "c1")));
    }

    #[test]
    fn the_queue_is_bounded_across_clients() {
        let mut q = FairQueue::new(1, true);
        assert_eq!(q.admit("a", 2, "a1"), Admit::Now);
        assert!(matches!(q.admit("a", 2, "a2"), Admit::Queued(_)));
        assert!(matches!(q.admit("b", 2, "b1"), Admit::Queued(_)));
        assert_eq!(q.admit("c", 2, "c1"), Admit::Full);
        assert_eq!(q.waiters(), 2);
    }

    #[test]
    fn a_waiter_that_leaves_is_skipped_and_a_granted_one_cannot_leave() {
        let mut q = FairQueue::new(1, true);
        assert_eq!(q.admit("a", 100, "a1"), Admit::Now);
        let b1 = queued(&mut q, "b", "b1");
        let c1 = queued(&mut q, "c", "c1");
        assert!(q.leave("b", b1));
        assert!(!q.leave("b", b1), "left twice");
        assert_eq!(q.waiters(), 1);
        assert_eq!(q.release("a"), Some(("c".into(), "c1")));
        // Given the slot already: leaving fails, so the caller releases it.
        assert!(!q.leave("c", c1));
        assert_eq!(q.release("c"), None);
        assert_eq!((q.free(), q.waiters(), q.running("c")), (1, 0, 0));
    }

    #[test]
    fn the_anonymous_client_is_one_bucket() {
        let mut q = FairQueue::new(2, true);
        assert_eq!(q.admit("", 100, "anon1"), Admit::Now);
        assert_eq!(q.admit("", 100, "anon2"), Admit::Now);
        queued(&mut q, "", "anon3");
        queued(&mut q, "named", "n1");
        assert_eq!(q.release(""), Some(("named".into(), "n1")));
    }
}
