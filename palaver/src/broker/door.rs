//! The embedded broker's front door: palaver owns the public listener and
//! relays each connection to rumqttd on a loopback port, after reading its
//! CONNECT. That is where three limits rumqttd lacks are kept:
//! - connections: at most `max_connections` clients; a reserve of its own
//!   is kept for the gateway of `palaver up` (known by its client id
//!   prefix, random per process), so idle clients cannot lock it out;
//! - logins: a source address whose login failed waits before its next
//!   login is checked, twice as long after each failure (0.25 s up to 8 s,
//!   forgotten on success); refused logins get a CONNACK that says so;
//! - retained messages: what the broker keeps for later subscribers is
//!   capped in bytes; a retained PUBLISH beyond the cap is passed on with
//!   its retain flag cleared (delivered now, kept for no one).
//!
//! After the CONNECT, replies (broker to client) are copied as a byte
//! stream; requests (client to broker) are copied chunk by chunk too, with
//! the packet boundaries followed in the chunk: only a PUBLISH's first
//! byte must be looked at, and a retained one is held whole to learn its
//! topic.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::frame::{self, Connect, FixedHeader, Refusal};
use super::{same_bytes, same_secret};

/// Connections beyond `max_connections` that only the gateway may use.
pub const GATEWAY_RESERVE: usize = 64;
/// Sockets that have not yet sent their CONNECT (or wait for their login
/// to be checked); a new one beyond these closes the oldest, so sockets
/// held open without a word cannot keep the gateway or anyone else out.
const MAX_WAITING: usize = 256;
/// How long a new socket may take to send its CONNECT.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest CONNECT read: ids, login and a will, all small.
const MAX_CONNECT_BYTES: usize = 64 * 1024;
/// The first and the longest wait after a failed login.
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(8);
/// Addresses remembered for their failed logins before old ones go.
const PRUNE_ABOVE: usize = 10_000;
/// Failed logins are forgotten after this long without another attempt.
const FORGET_AFTER: Duration = Duration::from_secs(60);
/// Bytes read from a client at a time.
const RELAY_CHUNK: usize = 16 * 1024;
/// How long replies still flow to a client that closed its side.
const LINGER: Duration = Duration::from_secs(1);

/// The door's settings.
#[derive(Debug, Clone)]
pub struct DoorSettings {
    /// rumqttd's loopback address.
    pub broker: SocketAddr,
    /// The login every client must give, when set.
    pub credentials: Option<(String, String)>,
    /// Client connections at most (the gateway's reserve not included).
    pub max_connections: usize,
    /// Client ids starting with this are the gateway's: they may use the reserve.
    pub gateway_prefix: Option<String>,
    /// Bytes of retained messages (topic and payload) the broker may keep.
    pub max_retained_bytes: usize,
}

/// The state all connections share.
struct Door {
    settings: DoorSettings,
    /// Connections relayed, of clients and of the gateway: counted apart
    /// so that neither can take the other's.
    clients: AtomicUsize,
    gateway: AtomicUsize,
    waiting: Mutex<Waiting>,
    logins: Mutex<HashMap<IpAddr, Failures>>,
    retained: Mutex<Retained>,
    /// Refusals for want of room, and retained messages not kept, so far.
    refused_full: AtomicU64,
    not_kept: AtomicU64,
}

/// Counts one more event; true when its log line is due. A flood would log
/// a line per event: every doubling of the count is enough.
fn log_due(count: &AtomicU64) -> bool {
    (count.fetch_add(1, Ordering::Relaxed) + 1).is_power_of_two()
}

/// Failed logins of one source address.
#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    /// No login of this address is checked before this.
    next_check: Instant,
}

/// Connections that have not sent their CONNECT yet, oldest first.
#[derive(Default)]
struct Waiting {
    next: u64,
    /// Connections closed for want of a CONNECT, for the log.
    evicted: u64,
    queue: VecDeque<(u64, CancellationToken)>,
}

/// A connection's place among the waiting ones; left when dropped.
struct WaitingPlace<'a> {
    door: &'a Door,
    id: u64,
    evicted: CancellationToken,
}

impl Drop for WaitingPlace<'_> {
    fn drop(&mut self) {
        let mut waiting = self.door.waiting.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = waiting.queue.iter().position(|(id, _)| *id == self.id) {
            waiting.queue.remove(i);
        }
    }
}

/// What the broker keeps retained, as far as the door let it through.
#[derive(Default)]
struct Retained {
    bytes: usize,
    topics: HashMap<Vec<u8>, usize>,
}

/// Serves `listener` until the process ends (or the listener fails).
pub async fn serve(listener: TcpListener, settings: DoorSettings) -> io::Result<()> {
    let door = Arc::new(Door {
        settings,
        clients: AtomicUsize::new(0),
        gateway: AtomicUsize::new(0),
        waiting: Mutex::new(Waiting::default()),
        logins: Mutex::new(HashMap::new()),
        retained: Mutex::new(Retained::default()),
        refused_full: AtomicU64::new(0),
        not_kept: AtomicU64::new(0),
    });
    loop {
        let (socket, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            // Out of descriptors and the like: the socket is lost, the
            // listener is not; pause instead of spinning.
            Err(e) if is_per_connection(&e) => {
                tracing::warn!(error = %e, "embedded broker: cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        let waiting = door.wait(peer);
        let door = door.clone();
        tokio::spawn(async move {
            if let Err(e) = door.serve_one(socket, peer, waiting).await {
                tracing::debug!(%peer, error = %e, "embedded broker connection ended");
            }
        });
    }
}

fn is_per_connection(e: &io::Error) -> bool {
    !matches!(
        e.kind(),
        io::ErrorKind::InvalidInput | io::ErrorKind::PermissionDenied
    )
}

/// Takes a connection's place; gives it back when dropped.
struct Slot<'a>(&'a AtomicUsize);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Door {
    /// Registers a new connection as waiting for its CONNECT; closes the
    /// oldest waiting one if there are too many.
    fn wait(&self, peer: SocketAddr) -> (u64, CancellationToken) {
        let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        if waiting.queue.len() >= MAX_WAITING {
            if let Some((_, oldest)) = waiting.queue.pop_front() {
                oldest.cancel();
                waiting.evicted += 1;
                // A flood would log a line per socket: every doubling is enough.
                if waiting.evicted.is_power_of_two() {
                    tracing::warn!(%peer, closed = waiting.evicted, "embedded broker: too many connections without a CONNECT; closing the oldest");
                }
            }
        }
        let id = waiting.next;
        waiting.next += 1;
        let evicted = CancellationToken::new();
        waiting.queue.push_back((id, evicted.clone()));
        (id, evicted)
    }

    async fn serve_one(
        &self,
        mut client: TcpStream,
        peer: SocketAddr,
        (id, evicted): (u64, CancellationToken),
    ) -> io::Result<()> {
        let place = WaitingPlace {
            door: self,
            id,
            evicted,
        };
        let _ = client.set_nodelay(true);
        let greeted = async {
            let (header, body, connect) =
                match tokio::time::timeout(CONNECT_TIMEOUT, read_connect(&mut client)).await {
                    Ok(read) => read?,
                    Err(_) => return Ok(None),
                };
            let ok = self.settings.credentials.is_none()
                || self
                    .login(&connect, peer.ip(), self.is_gateway(&connect))
                    .await;
            Ok::<_, io::Error>(Some((header, body, connect, ok)))
        };
        let greeted = tokio::select! {
            greeted = greeted => greeted?,
            _ = place.evicted.cancelled() => None,
        };
        drop(place);
        let Some((header, body, connect, login_ok)) = greeted else {
            return Ok(());
        };
        if !login_ok {
            tracing::warn!(%peer, client_id = ?connect.client_id, user = ?connect.username, "MQTT login refused: wrong user name or password");
            return refuse(client, connect.level, Refusal::BadLogin).await;
        }
        let Some(_slot) = self.take_slot(self.is_gateway(&connect)) else {
            if log_due(&self.refused_full) {
                tracing::warn!(%peer, client_id = ?connect.client_id, max = self.settings.max_connections, refused = self.refused_full.load(Ordering::Relaxed), "MQTT connection refused: the broker is full (--mqtt-max-connections)");
            }
            return refuse(client, connect.level, Refusal::Full).await;
        };
        let mut broker = TcpStream::connect(self.settings.broker).await?;
        let _ = broker.set_nodelay(true);
        broker.write_all(&header.bytes()).await?;
        broker.write_all(&body).await?;
        self.relay(client, broker).await
    }

    /// Whether `connect` comes from the gateway of `palaver up`.
    fn is_gateway(&self, connect: &Connect) -> bool {
        self.settings
            .gateway_prefix
            .as_deref()
            .is_some_and(|p| connect.client_id.starts_with(p))
    }

    /// Whether `connect` logs in rightly; waits first while `ip` is backing
    /// off, unless `exempt` (the gateway, which shares loopback with local
    /// clients and must not queue behind their failures).
    async fn login(&self, connect: &Connect, ip: IpAddr, exempt: bool) -> bool {
        let Some((user, password)) = &self.settings.credentials else {
            return true;
        };
        let check_at = if exempt {
            None
        } else {
            let mut logins = self.logins.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            if logins
                .get(&ip)
                .is_some_and(|f| now > f.next_check + FORGET_AFTER)
            {
                logins.remove(&ip);
            }
            match logins.get_mut(&ip) {
                Some(f) => {
                    // Concurrent attempts queue behind each other, each a
                    // back-off apart, so parallel sockets gain nothing.
                    let at = f.next_check.max(now);
                    f.next_check = at + backoff(f.count);
                    Some(at)
                }
                None => None,
            }
        };
        if let Some(at) = check_at {
            tokio::time::sleep_until(at).await;
        }
        let ok = connect
            .username
            .as_deref()
            .is_some_and(|u| same_secret(u, user))
            & connect
                .password
                .as_deref()
                .is_some_and(|p| same_bytes(p, password.as_bytes()));
        if exempt {
            return ok;
        }
        let mut logins = self.logins.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if ok {
            logins.remove(&ip);
        } else {
            if logins.len() >= PRUNE_ABOVE {
                logins.retain(|_, f| f.next_check + FORGET_AFTER > now);
            }
            let f = logins.entry(ip).or_insert(Failures {
                count: 0,
                next_check: now,
            });
            f.count = f.count.saturating_add(1);
            f.next_check = f.next_check.max(now + backoff(f.count));
        }
        ok
    }

    fn take_slot(&self, is_gateway: bool) -> Option<Slot<'_>> {
        let (count, limit) = if is_gateway {
            (&self.gateway, GATEWAY_RESERVE)
        } else {
            (&self.clients, self.settings.max_connections)
        };
        count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(count))
    }

    async fn relay(&self, client: TcpStream, broker: TcpStream) -> io::Result<()> {
        let (client_read, mut client_write) = client.into_split();
        let (mut broker_read, mut broker_write) = broker.into_split();
        let mut up = std::pin::pin!(async {
            let sent = self.requests(client_read, &mut broker_write).await;
            let _ = broker_write.shutdown().await;
            sent
        });
        let mut down = std::pin::pin!(async {
            let copied = tokio::io::copy(&mut broker_read, &mut client_write).await;
            let _ = client_write.shutdown().await;
            copied.map(|_| ())
        });
        tokio::select! {
            // The broker closed (a DISCONNECT, a protocol error): so does the client.
            copied = &mut down => copied,
            sent = &mut up => {
                // The client closed its side: the broker's last replies still go out.
                let _ = tokio::time::timeout(LINGER, down).await;
                sent
            }
        }
    }

    /// Copies the client's bytes to the broker as they come, one write per
    /// read like a plain copy, while following packet boundaries: only a
    /// retained PUBLISH is held until it is complete, to be looked at.
    async fn requests<R, W>(&self, mut client: R, broker: &mut W) -> io::Result<()>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut pending: Vec<u8> = Vec::with_capacity(RELAY_CHUNK);
        // Bytes of the current packet's body still to pass through unread.
        let mut skip = 0usize;
        loop {
            if pending.capacity() - pending.len() < RELAY_CHUNK / 2 {
                pending.reserve(RELAY_CHUNK);
            }
            if client.read_buf(&mut pending).await? == 0 {
                return Ok(());
            }
            let mut at = 0;
            loop {
                let through = skip.min(pending.len() - at);
                at += through;
                skip -= through;
                if skip > 0 {
                    break;
                }
                let Some(header) = frame::parse_fixed_header(&pending[at..])? else {
                    break;
                };
                let retained = header.kind() == frame::PUBLISH && header.first & frame::RETAIN != 0;
                if !retained {
                    at += header.len();
                    skip = header.remaining;
                    continue;
                }
                // rumqttd refuses payloads over its own limit; holding
                // more than that in memory is never needed.
                if header.remaining > super::MAX_PAYLOAD_BYTES + MAX_CONNECT_BYTES {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "a retained PUBLISH over the broker's size limit",
                    ));
                }
                let end = at + header.len() + header.remaining;
                if pending.len() < end {
                    break; // read the rest first
                }
                let body = &pending[at + header.len()..end];
                if !self.keep_retained(header.first, body) {
                    pending[at] &= !frame::RETAIN;
                }
                at = end;
            }
            broker.write_all(&pending[..at]).await?;
            pending.drain(..at);
        }
    }

    /// Whether the broker may keep this retained PUBLISH; counts it if so.
    fn keep_retained(&self, first: u8, body: &[u8]) -> bool {
        let Ok(topic) = frame::publish_topic(body) else {
            return true; // malformed: rumqttd refuses it
        };
        // Topic, its length and (QoS 1, 2) the packet id come before the payload.
        let id_len = if first & 0x06 != 0 { 2 } else { 0 };
        let payload = body.len().saturating_sub(2 + topic.len() + id_len);
        let mut retained = self.retained.lock().unwrap_or_else(|e| e.into_inner());
        let before = retained.topics.get(topic).copied().unwrap_or(0);
        if payload == 0 {
            // An empty retained message deletes the topic's: always allowed.
            retained.topics.remove(topic);
            retained.bytes -= before;
            return true;
        }
        let size = topic.len() + payload;
        let total = retained.bytes - before + size;
        if total > self.settings.max_retained_bytes {
            if log_due(&self.not_kept) {
                tracing::warn!(
                    topic = ?String::from_utf8_lossy(topic),
                    bytes = size,
                    held = retained.bytes,
                    max = self.settings.max_retained_bytes,
                    not_kept = self.not_kept.load(Ordering::Relaxed),
                    "retained message not kept: over --mqtt-max-retained-bytes (delivered without its retain flag)"
                );
            }
            return false;
        }
        retained.bytes = total;
        retained.topics.insert(topic.to_vec(), size);
        true
    }
}

/// The wait after `failures` failed logins in a row.
fn backoff(failures: u32) -> Duration {
    if failures == 0 {
        return Duration::ZERO;
    }
    let doublings = (failures - 1).min(16);
    (FIRST_BACKOFF * 2u32.pow(doublings)).min(MAX_BACKOFF)
}

/// Reads the first packet, which must be a CONNECT of a sane size.
async fn read_connect(client: &mut TcpStream) -> io::Result<(FixedHeader, Vec<u8>, Connect)> {
    let header = frame::read_fixed_header(client)
        .await?
        .ok_or(io::ErrorKind::UnexpectedEof)?;
    if header.kind() != frame::CONNECT || header.remaining > MAX_CONNECT_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the first packet is not a CONNECT of at most 64 KiB",
        ));
    }
    let mut body = vec![0; header.remaining];
    client.read_exact(&mut body).await?;
    let connect = frame::parse_connect(&body)?;
    Ok((header, body, connect))
}

async fn refuse(mut client: TcpStream, level: u8, refusal: Refusal) -> io::Result<()> {
    client.write_all(&frame::connack(level, refusal)).await?;
    client.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_a_quarter_second_to_eight() {
        let waits: Vec<u128> = (0..9).map(|n| backoff(n).as_millis()).collect();
        assert_eq!(waits, [0, 250, 500, 1000, 2000, 4000, 8000, 8000, 8000]);
        assert_eq!(backoff(u32::MAX), MAX_BACKOFF);
    }
}
