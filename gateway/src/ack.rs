//! Acknowledging requests to the broker: once answered, and in the order
//! they came.
//!
//! With the consumer lease the project's MQTT session is persistent and a
//! request is acknowledged (PUBACK) only once answered, so that one a
//! gateway received but did not finish — it died, or lost the lease — is
//! delivered again to whichever gateway consumes the project next. Turns end
//! in any order, but MQTT (3.1.1 and 5, section 4.6) wants PUBACKs in the
//! order the PUBLISHes arrived, and brokers hold to it: rumqttd, the embedded
//! broker, drops a connection that acknowledges out of order. So an answered
//! request's PUBACK waits for those that came before it on its connection.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::mqtt::{Client, Message, QoS};

/// One link's acknowledgements.
#[derive(Clone)]
pub struct Acks {
    client: Client,
    /// Whether requests are acknowledged by us (persistent session) rather
    /// than by rumqttc on arrival.
    manual: bool,
    ledger: Arc<Mutex<Ledger>>,
}

/// What is owed to the broker on the current connection.
#[derive(Default)]
struct Ledger {
    /// Deliveries on the current connection not acknowledged yet, in the
    /// order they arrived.
    owed: VecDeque<Delivery>,
    /// Requests still being answered, by packet id, each with the number of
    /// its latest delivery: a broker delivers an unfinished request again
    /// (same packet id, DUP set) after a reconnect, and the running turn
    /// then acknowledges that delivery instead.
    running: HashMap<u16, Arc<AtomicU64>>,
    /// Numbers deliveries, so that an answer finds its own.
    next: u64,
}

struct Delivery {
    number: u64,
    pkid: u16,
    qos: QoS,
    /// Answered (or refused): its PUBACK goes out when every delivery before
    /// it has gone.
    answered: bool,
}

impl Acks {
    /// `manual`: the session is persistent and rumqttc was told not to
    /// acknowledge on its own.
    pub fn new(client: Client, manual: bool) -> Self {
        Self {
            client,
            manual,
            ledger: Arc::default(),
        }
    }

    /// A new connection (or none): packet ids of the old one mean nothing
    /// any more, and the broker delivers again what was not acknowledged.
    pub fn reset(&self) {
        self.lock().owed.clear();
    }

    /// The acknowledgement of `publish`, or `None` when it is a broker's
    /// delivery again of a request this gateway is still answering (whose
    /// turn then acknowledges this delivery).
    pub fn receive(&self, publish: &Message) -> Option<Ack> {
        if !self.manual || publish.qos == QoS::AtMostOnce {
            return Some(Ack::nothing(self.clone()));
        }
        let mut ledger = self.lock();
        let number = ledger.next;
        ledger.next += 1;
        ledger.owed.push_back(Delivery {
            number,
            pkid: publish.pkid,
            qos: publish.qos,
            answered: false,
        });
        if publish.dup {
            if let Some(latest) = ledger.running.get(&publish.pkid) {
                latest.store(number, Ordering::SeqCst);
                return None;
            }
        }
        let latest = Arc::new(AtomicU64::new(number));
        ledger.running.insert(publish.pkid, latest.clone());
        Some(Ack {
            acks: self.clone(),
            owed: Some((publish.pkid, latest)),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ends the request `pkid` whose latest delivery is `latest`: marks that
    /// delivery answered when `answered` (else leaves it owed, for the broker
    /// to deliver again after this connection), then sends every PUBACK no
    /// longer waiting for an earlier one.
    fn end(&self, pkid: u16, latest: &Arc<AtomicU64>, answered: bool) {
        let mut ledger = self.lock();
        if ledger
            .running
            .get(&pkid)
            .is_some_and(|l| Arc::ptr_eq(l, latest))
        {
            ledger.running.remove(&pkid);
        }
        if !answered {
            return;
        }
        let number = latest.load(Ordering::SeqCst);
        if let Some(d) = ledger.owed.iter_mut().find(|d| d.number == number) {
            d.answered = true;
        }
        while ledger.owed.front().is_some_and(|d| d.answered) {
            let Some(d) = ledger.owed.pop_front() else {
                break;
            };
            // Queued in this order under the lock, so sent in this order.
            let _ = self.client.try_ack(d.pkid, d.qos);
        }
    }
}

/// A request's acknowledgement to the broker, sent when this is dropped
/// (after those of the requests that came before it), never before.
pub struct Ack {
    acks: Acks,
    /// The packet id and the number of its latest delivery; `None`:
    /// nothing to send (QoS 0, or rumqttc acknowledges).
    owed: Option<(u16, Arc<AtomicU64>)>,
}

impl Ack {
    fn nothing(acks: Acks) -> Self {
        Self { acks, owed: None }
    }

    /// Whether the broker delivers the request again if it is not
    /// acknowledged (a QoS 1 or 2 request on a persistent session).
    pub fn redeliverable(&self) -> bool {
        self.owed.is_some()
    }

    /// Leaves the request unacknowledged, for the broker to deliver again
    /// (to the next consumer) after this connection ends. The requests after
    /// it on this connection then wait too: MQTT has no way to skip one.
    pub fn withhold(mut self) {
        if let Some((pkid, latest)) = self.owed.take() {
            self.acks.end(pkid, &latest, false);
        }
    }
}

impl Drop for Ack {
    fn drop(&mut self) {
        if let Some((pkid, latest)) = self.owed.take() {
            self.acks.end(pkid, &latest, true);
        }
    }
}
