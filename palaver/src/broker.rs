//! The embedded MQTT broker of `palaver up`: rumqttd (MQTT 3.1.1) behind a
//! front door of ours, optionally with a user name and password.
//!
//! Clients connect to the door (the `door` module), which holds the public
//! address, reads each CONNECT, keeps the connection, login and retained
//! limits, and relays to rumqttd on a loopback port.
//!
//! rumqttd binds its listener itself, on its own threads, and has no stop:
//! [`start`] therefore picks its loopback port, and proves the listener is
//! rumqttd's own before opening the door: a probe client connects over TCP
//! and publishes a random token that a subscription inside the broker (a
//! rumqttd "local link") must see. A failed bind ends rumqttd's server
//! thread, which [`start`] notices and retries on another port. The broker
//! stops when the process exits.
//!
//! rumqttd keeps Nagle's algorithm on; the `nodelay` module turns it off
//! on the listener once the probe has passed.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::thread::JoinHandle;
use std::time::Duration;

use rumqttc::{AsyncClient, ConnectionError, Event, MqttOptions, Packet, QoS};
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::{Broker, Config, ConnectionSettings, Notification, RouterConfig, ServerSettings};
use tokio::time::Instant;

mod door;
mod frame;
mod nodelay;

pub use door::GATEWAY_RESERVE;

/// Largest MQTT payload the broker accepts, in bytes (1 MiB). It is also
/// what the gateway can read without dropping its connection (its default
/// limit is 4 x 256 KiB + 1 KiB), and the largest reply it publishes.
pub const MAX_PAYLOAD_BYTES: usize = 1024 * 1024;
/// Connections the router makes room for beyond the door's limit: the
/// start-up probe and slack for connections that are closing.
const ROUTER_SLACK: usize = 16;
/// Messages the router keeps per topic filter: `SEGMENT_BYTES` x
/// `SEGMENTS`. rumqttd keeps a log per filter; a bound keeps a long-running
/// local stack from growing without end.
const SEGMENT_BYTES: usize = 4 * 1024 * 1024;
const SEGMENTS: usize = 4;
/// Packets read from one connection in a batch before handing them over.
const READ_BATCH: usize = 500;
/// How long a new TCP connection may take to send its CONNECT.
const CONNECT_TIMEOUT_MS: u16 = 10_000;
/// Loopback ports tried for rumqttd, in case one was taken between our
/// check and rumqttd's bind.
const ATTEMPTS: usize = 5;
/// How long one attempt may take to come up and answer the probe.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Topic of the start-up probe: none of the topics a project uses (rumqttd
/// refuses `$` filters, so it cannot hide there).
const PROBE_TOPIC: &str = "palaver/broker-probe/start";

/// What the embedded broker should be.
#[derive(Debug, Clone)]
pub struct BrokerSettings {
    /// Address to listen on (loopback unless the user wants the LAN to connect).
    pub ip: IpAddr,
    /// Port; 0 picks a free one.
    pub port: u16,
    /// When set, every client must log in with exactly this user name and
    /// password; others are refused with a CONNACK that says so.
    pub credentials: Option<(String, String)>,
    /// Client connections at most; the gateway has [`GATEWAY_RESERVE`] more.
    pub max_connections: usize,
    /// Client ids starting with this are the gateway's (may use the reserve).
    pub gateway_prefix: Option<String>,
    /// Bytes of retained messages (topics and payloads) the broker keeps.
    pub max_retained_bytes: usize,
}

/// Why the broker did not start.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The chosen address cannot be bound (in use, no permission, ...).
    #[error("cannot listen for MQTT on {addr}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The operating system's answer.
        source: std::io::Error,
    },
    /// rumqttd did not come up in time or something else answered the probe.
    #[error("the embedded MQTT broker did not start on {addr}: {why}")]
    NotStarted {
        /// The address tried last.
        addr: SocketAddr,
        /// What went wrong.
        why: String,
    },
}

/// A running embedded broker.
pub struct EmbeddedBroker {
    addr: SocketAddr,
    /// The server thread; it ends only if rumqttd's listener fails.
    server: JoinHandle<()>,
    /// The front door's accept loop; it ends only if the listener fails.
    door: tokio::task::JoinHandle<()>,
    /// The probe's link into the router, kept open: closing a local link
    /// is not a path rumqttd's router is built for.
    _probe: (LinkTx, LinkRx),
}

impl EmbeddedBroker {
    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// False once rumqttd's or the door's listener has stopped (they never should).
    pub fn is_running(&self) -> bool {
        !self.server.is_finished() && !self.door.is_finished()
    }
}

/// rumqttd, listening on loopback, before the door is open.
struct Rumqttd {
    server: JoinHandle<()>,
    probe: (LinkTx, LinkRx),
}

/// rumqttd's configuration for one MQTT 3.1.1 listener on `addr`, with
/// room for `max_connections` clients and the gateway's reserve.
pub fn config(
    addr: SocketAddr,
    credentials: Option<&(String, String)>,
    max_connections: usize,
) -> Config {
    let mut server = ServerSettings {
        name: "palaver-mqtt".into(),
        listen: addr,
        tls: None,
        next_connection_delay_ms: 0,
        connections: ConnectionSettings {
            connection_timeout_ms: CONNECT_TIMEOUT_MS,
            max_payload_size: MAX_PAYLOAD_BYTES,
            max_inflight_count: READ_BATCH,
            auth: None,
            external_auth: None,
            // Without it rumqttd disconnects a client that publishes to a
            // topic nobody subscribed to (a reply whose client has gone, a
            // status message before any monitor listens).
            dynamic_filters: true,
        },
    };
    if let Some((user, password)) = credentials.cloned() {
        server.set_auth_handler(move |client_id: String, u: String, p: String| {
            let ok = same_secret(&u, &user) & same_secret(&p, &password);
            if !ok {
                tracing::warn!(client_id = %client_id, user = %u, "MQTT login refused: wrong user name or password");
            }
            std::future::ready(ok)
        });
    }
    Config {
        id: 0,
        router: RouterConfig {
            max_connections: max_connections + GATEWAY_RESERVE + ROUTER_SLACK,
            max_outgoing_packet_count: 200,
            max_segment_size: SEGMENT_BYTES,
            max_segment_count: SEGMENTS,
            ..RouterConfig::default()
        },
        v4: Some(HashMap::from([("palaver".to_owned(), server)])),
        ..Config::default()
    }
}

/// Compares secrets in time independent of where they differ.
pub(crate) fn same_secret(given: &str, expected: &str) -> bool {
    same_bytes(given.as_bytes(), expected.as_bytes())
}

/// [`same_secret`] for bytes (MQTT passwords are binary).
pub(crate) fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    for (i, x) in a.iter().enumerate() {
        diff |= x ^ b.get(i).copied().unwrap_or(!x);
    }
    diff == 0
}

/// Starts the broker and returns once it answers on its address.
pub async fn start(settings: &BrokerSettings) -> Result<EmbeddedBroker, BrokerError> {
    let addr = SocketAddr::new(settings.ip, settings.port);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| BrokerError::Bind { addr, source })?;
    let addr = listener
        .local_addr()
        .map_err(|source| BrokerError::Bind { addr, source })?;
    // Accepted sockets inherit it: no Nagle stalls between client and door.
    if let Err(e) = rustix::net::sockopt::set_tcp_nodelay(&listener, true) {
        tracing::warn!(error = %e, "cannot turn off Nagle's algorithm for the embedded broker's listener");
    }
    let mut last = None;
    let mut rumqttd = None;
    for _ in 0..ATTEMPTS {
        // A free loopback port, taken by rumqttd a moment later; the
        // probe notices if someone else took it in between.
        let internal = SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, 0));
        let internal = TcpListener::bind(internal)
            .and_then(|l| l.local_addr())
            .map_err(|source| BrokerError::Bind {
                addr: internal,
                source,
            })?;
        match start_on(
            internal,
            settings.credentials.as_ref(),
            settings.max_connections,
        )
        .await
        {
            Ok(started) => {
                rumqttd = Some((internal, started));
                break;
            }
            Err(e) => {
                tracing::debug!(error = %e, "embedded broker attempt failed");
                last = Some(e);
            }
        }
    }
    let Some((internal, started)) = rumqttd else {
        return Err(last.expect("at least one attempt"));
    };
    let door_settings = door::DoorSettings {
        broker: internal,
        credentials: settings.credentials.clone(),
        max_connections: settings.max_connections,
        gateway_prefix: settings.gateway_prefix.clone(),
        max_retained_bytes: settings.max_retained_bytes,
    };
    let door = tokio::spawn(async move {
        if let Err(e) = door::serve(listener, door_settings).await {
            tracing::error!(error = %e, "the embedded MQTT broker's listener failed");
        }
    });
    Ok(EmbeddedBroker {
        addr,
        server: started.server,
        door,
        _probe: started.probe,
    })
}

/// Starts rumqttd on the loopback address `addr` and proves it answers there.
async fn start_on(
    addr: SocketAddr,
    credentials: Option<&(String, String)>,
    max_connections: usize,
) -> Result<Rumqttd, BrokerError> {
    let not_started = |why: String| BrokerError::NotStarted { addr, why };
    let config = config(addr, credentials, max_connections);
    // Broker::new spawns the router thread and `link` waits for its answer:
    // both block, so keep them off the async workers.
    let (broker, link) = tokio::task::spawn_blocking(move || {
        let broker = Broker::new(config);
        let link = broker.link("palaver-broker-probe").map(|(mut tx, rx)| {
            let subscribed = tx.subscribe(PROBE_TOPIC);
            (tx, rx, subscribed)
        });
        (broker, link)
    })
    .await
    .map_err(|e| not_started(format!("setup panicked: {e}")))?;
    let (tx, mut rx) = match link {
        Ok((tx, rx, Ok(_))) => (tx, rx),
        Ok((_, _, Err(e))) | Err(e) => return Err(not_started(format!("local link: {e:?}"))),
    };
    let server = std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            let mut broker = broker;
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded MQTT broker failed");
            }
        })
        .map_err(|e| not_started(format!("cannot spawn its thread: {e}")))?;

    let token = format!("{:016x}", rand::random::<u64>());
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if server.is_finished() {
            return Err(not_started(
                "its listener stopped: the port was taken in the meantime".into(),
            ));
        }
        if Instant::now() > deadline {
            return Err(not_started(format!("no answer within {START_TIMEOUT:?}")));
        }
        match probe(addr, credentials, &token).await {
            Ok(()) => break,
            Err(ProbeError::NotListening) => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(ProbeError::Other(why)) => return Err(not_started(why)),
        }
    }
    // The probe published: our router must see the token, or the port
    // belongs to another program.
    let seen = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            match rx.next().await {
                Ok(Some(Notification::Forward(f)))
                    if f.publish.payload[..] == *token.as_bytes() =>
                {
                    return true
                }
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    })
    .await;
    if seen != Ok(true) {
        return Err(not_started("another program answered on its port".into()));
    }
    // Only the probe has connected so far: every client from now on gets
    // a connection without Nagle's 40 ms stalls. Without it the broker
    // still works, only slower, so a failure is a warning.
    if let Err(e) = nodelay::set_on_listener(addr) {
        tracing::warn!(error = %e, "cannot turn off Nagle's algorithm for the embedded broker: replies may come about 40 ms late");
    }
    Ok(Rumqttd {
        server,
        probe: (tx, rx),
    })
}

enum ProbeError {
    /// Nothing accepts connections on the address yet.
    NotListening,
    /// Something answered, but not as our broker would.
    Other(String),
}

/// Connects to `addr`, publishes `token` on the probe topic and disconnects.
async fn probe(
    addr: SocketAddr,
    credentials: Option<&(String, String)>,
    token: &str,
) -> Result<(), ProbeError> {
    let mut opts = MqttOptions::new(
        format!("palaver-probe-{token}"),
        addr.ip().to_string(),
        addr.port(),
    );
    opts.set_keep_alive(Duration::from_secs(5));
    if let Some((user, password)) = credentials {
        opts.set_credentials(user.clone(), password.clone());
    }
    let (client, mut events) = AsyncClient::new(opts, 10);
    let run = async {
        let mut published = false;
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    client
                        .publish(
                            PROBE_TOPIC,
                            QoS::AtLeastOnce,
                            false,
                            token.as_bytes().to_vec(),
                        )
                        .await
                        .map_err(|e| ProbeError::Other(e.to_string()))?;
                    published = true;
                }
                Ok(Event::Incoming(Packet::PubAck(_))) if published => {
                    let _ = client.disconnect().await;
                    // Flush the DISCONNECT; the error that follows is the
                    // connection closing as asked.
                    let _ = tokio::time::timeout(Duration::from_millis(200), events.poll()).await;
                    return Ok(());
                }
                Ok(_) => {}
                Err(ConnectionError::Io(e))
                    if e.kind() == std::io::ErrorKind::ConnectionRefused =>
                {
                    return Err(ProbeError::NotListening)
                }
                Err(e) => return Err(ProbeError::Other(format!("probe client: {e}"))),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .unwrap_or_else(|_| Err(ProbeError::Other("the probe got no answer".into())))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A broker for one test: loopback, a free port, no logins.
    const LOOPBACK_ANY_PORT: BrokerSettings = BrokerSettings {
        ip: IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
        port: 0,
        credentials: None,
        max_connections: 100,
        gateway_prefix: None,
        max_retained_bytes: 1 << 20,
    };

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn never_claims_a_port_another_broker_serves() {
        let other = palaver_testkit::process::Mosquitto::start().expect("mosquitto starts");
        let addr = SocketAddr::from(([127, 0, 0, 1], other.port()));
        // Skips our own bind check, as in the race it exists to survive.
        let claimed = start_on(addr, None, 10).await;
        assert!(
            matches!(claimed, Err(BrokerError::NotStarted { .. })),
            "claimed mosquitto's port"
        );
        let ours = start(&LOOPBACK_ANY_PORT)
            .await
            .expect("starts on a free port");
        assert_ne!(ours.addr().port(), other.port());
        assert!(ours.is_running());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_are_accepted_without_nagle() {
        let broker = start(&LOOPBACK_ANY_PORT).await.expect("starts");
        let client = tokio::net::TcpStream::connect(broker.addr()).await.unwrap();
        let ours = client.local_addr().unwrap();
        assert!(!client.nodelay().unwrap(), "the client side is left alone");
        // The broker's end of it, once rumqttd has accepted it.
        let deadline = Instant::now() + Duration::from_secs(5);
        let accepted = loop {
            let found = nodelay::own_socket(|fd| nodelay::peer_addr(fd) == Some(ours)).unwrap();
            match found {
                Some(fd) => break fd,
                None if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(10)).await
                }
                None => panic!("rumqttd never accepted the connection"),
            }
        };
        assert!(rustix::net::sockopt::tcp_nodelay(&accepted).unwrap());
    }

    #[test]
    fn secrets_compare_exactly() {
        assert!(same_secret("pw", "pw"));
        assert!(same_secret("", ""));
        assert!(!same_secret("pw", "pW"));
        assert!(!same_secret("pw", "pw2"));
        assert!(!same_secret("pw2", "pw"));
        assert!(!same_secret("", "x"));
        assert!(!same_secret("x", ""));
    }
}
