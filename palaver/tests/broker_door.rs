//! The embedded broker's front door, on a free port in-process: the
//! connection limit with the gateway's reserve, the back-off after failed
//! logins, and the cap on retained bytes.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use palaver::broker::{self, BrokerSettings, EmbeddedBroker};
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, MqttOptions, Packet, QoS,
};
use tokio::time::Instant;

/// What a client saw when it tried to connect.
#[derive(Debug, PartialEq)]
enum Login {
    Accepted,
    Refused(ConnectReturnCode),
    Failed(String),
}

fn settings(max_connections: usize) -> BrokerSettings {
    BrokerSettings {
        ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        port: 0,
        credentials: None,
        max_connections,
        gateway_prefix: Some("gw-7f3a".into()),
        max_retained_bytes: 4 << 20,
    }
}

fn options(addr: SocketAddr, client_id: &str, login: Option<(&str, &str)>) -> MqttOptions {
    let mut opts = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_max_packet_size(2 << 20, 2 << 20);
    if let Some((user, password)) = login {
        opts.set_credentials(user, password);
    }
    opts
}

/// Connects and returns the client with its (still polled by the caller)
/// event loop once the broker answered.
async fn connect(
    addr: SocketAddr,
    client_id: &str,
    login: Option<(&str, &str)>,
) -> (Login, AsyncClient, EventLoop) {
    let (client, mut events) = AsyncClient::new(options(addr, client_id, login), 100);
    let outcome = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return Login::Accepted,
                Ok(_) => {}
                Err(ConnectionError::ConnectionRefused(code)) => return Login::Refused(code),
                Err(e) => return Login::Failed(e.to_string()),
            }
        }
    })
    .await
    .unwrap_or_else(|_| Login::Failed("no answer in 15 s".into()));
    (outcome, client, events)
}

/// Keeps a connected client's event loop running until the test ends.
fn keep(mut events: EventLoop) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move { while events.poll().await.is_ok() {} })
}

async fn start(settings: BrokerSettings) -> EmbeddedBroker {
    broker::start(&settings).await.expect("the broker starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_are_refused_while_the_gateway_gets_in() {
    let broker = start(settings(5)).await;
    let addr = broker.addr();
    // Sockets that never send a CONNECT, more than the door keeps waiting:
    // held to the end, they must not keep anyone out.
    let mut silent = Vec::new();
    for _ in 0..300 {
        silent.push(
            tokio::net::TcpStream::connect(addr)
                .await
                .expect("tcp connect"),
        );
    }
    let mut held = Vec::new();
    for i in 0..5 {
        let (login, client, events) = connect(addr, &format!("idle-{i}"), None).await;
        assert_eq!(login, Login::Accepted, "client {i} of 5");
        held.push((client, keep(events)));
    }
    let (login, _, _) = connect(addr, "one-too-many", None).await;
    assert_eq!(
        login,
        Login::Refused(ConnectReturnCode::ServiceUnavailable),
        "a sixth client"
    );

    // The real gateway, known by its client id prefix, still subscribes.
    let mut config = gateway::Config::new(
        addr.ip().to_string(),
        addr.port(),
        "http://127.0.0.1:1",
        vec!["general".into(), "tutor".into()],
    );
    config.client_id = "gw-7f3a".into();
    config.consumer_lease = None;
    // rumqttd serves MQTT 3.1.1 only, as `palaver up` configures its gateway.
    config.mqtt_protocol = gateway::config::Protocol::V311;
    let mut registry = prometheus_client::registry::Registry::default();
    let gw = gateway::Gateway::new(config, &mut registry).expect("gateway settings");
    let ready = gw.ready();
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(gw.run(stop.clone()));
    assert!(
        tokio::time::timeout(Duration::from_secs(15), ready)
            .await
            .unwrap_or(false),
        "the gateway could not connect to a full broker"
    );
    // A client id that merely looks like the gateway's does not get in.
    let (login, _, _) = connect(addr, "gw-7f3", None).await;
    assert_eq!(login, Login::Refused(ConnectReturnCode::ServiceUnavailable));

    // A client that leaves frees its place.
    let (client, events) = held.pop().unwrap();
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(5), events).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (login, _, _) = connect(addr, "after-one-left", None).await;
        if login == Login::Accepted {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the place was not freed: {login:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
    drop(silent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_wrong_passwords_are_slowed_and_a_right_one_resets_the_wait() {
    let mut s = settings(100);
    s.credentials = Some(("alice".into(), "s3cret".into()));
    let broker = start(s).await;
    let addr = broker.addr();

    // Each refusal comes a back-off after the one before: 0, 0.25, 0.5, 1, 2 s.
    let mut at = Vec::new();
    for i in 0..5 {
        let (login, _, _) = connect(addr, &format!("guess-{i}"), Some(("alice", "wrong"))).await;
        assert_eq!(
            login,
            Login::Refused(ConnectReturnCode::BadUserNamePassword)
        );
        at.push(Instant::now());
    }
    let gaps: Vec<Duration> = at.windows(2).map(|w| w[1] - w[0]).collect();
    for (gap, want_ms) in gaps.iter().zip([250u64, 500, 1000, 2000]) {
        let want = Duration::from_millis(want_ms);
        assert!(
            *gap >= want - Duration::from_millis(20) && *gap < want + Duration::from_millis(1500),
            "gaps {gaps:?}: expected about {want:?}"
        );
    }

    // The gateway (its client id prefix) does not queue behind them: it is
    // answered well before the 4 s back-off it would otherwise wait.
    let asked = Instant::now();
    let (login, client, events) = connect(addr, "gw-7f3a-general", Some(("alice", "s3cret"))).await;
    assert_eq!(login, Login::Accepted);
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "{:?}",
        asked.elapsed()
    );
    let _ = client.disconnect().await;
    drop(events);

    // The right password is checked after the same wait, then accepted ...
    let (login, client, events) = connect(addr, "alice", Some(("alice", "s3cret"))).await;
    assert_eq!(login, Login::Accepted);
    let waited = at[4].elapsed();
    assert!(waited >= Duration::from_millis(3900), "{waited:?}");
    let _ = client.disconnect().await;
    drop(events);
    // ... which forgets the failures: the next mistake is answered at once,
    // not after the back-off of 4 s or more the failures had reached.
    let asked = Instant::now();
    let (login, _, _) = connect(addr, "typo", Some(("alice", "s3cre"))).await;
    assert_eq!(
        login,
        Login::Refused(ConnectReturnCode::BadUserNamePassword)
    );
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "{:?}",
        asked.elapsed()
    );
    // No login at all is a wrong login too.
    let (login, _, _) = connect(addr, "anonymous", None).await;
    assert_eq!(
        login,
        Login::Refused(ConnectReturnCode::BadUserNamePassword)
    );
}

/// Subscribes `topic` on a new connection and collects what arrives within
/// `wait`: (topic, payload length, retain flag).
async fn collect(addr: SocketAddr, topic: &str, wait: Duration) -> Vec<(String, usize, bool)> {
    let (login, client, mut events) =
        connect(addr, &format!("reader-{:08x}", rand::random::<u32>()), None).await;
    assert_eq!(login, Login::Accepted);
    client.subscribe(topic, QoS::AtLeastOnce).await.unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(wait, async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    got.push((p.topic.clone(), p.payload.len(), p.retain))
                }
                Ok(_) => {}
                Err(e) => panic!("reader: {e}"),
            }
        }
    })
    .await;
    got.sort();
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_beyond_the_cap_are_delivered_but_not_kept() {
    let mut s = settings(100);
    s.max_retained_bytes = 100_000;
    let broker = start(s).await;
    let addr = broker.addr();

    // Someone listening now gets every message, kept or not.
    let live = tokio::spawn(collect(addr, "r/#", Duration::from_secs(4)));
    tokio::time::sleep(Duration::from_millis(500)).await;

    let (login, client, mut events) = connect(addr, "writer", None).await;
    assert_eq!(login, Login::Accepted);
    let publish = |topic: String, bytes: usize| {
        let client = client.clone();
        async move {
            client
                .publish(topic, QoS::AtLeastOnce, true, vec![b'x'; bytes])
                .await
                .unwrap()
        }
    };
    // 30,003 bytes each (topic and payload): three fit in 100,000, five do not.
    for i in 0..5 {
        publish(format!("r/{i}"), 30_000).await;
    }
    let mut acked = 0;
    while acked < 5 {
        if let Event::Incoming(Packet::PubAck(_)) = events.poll().await.unwrap() {
            acked += 1;
        }
    }
    let later = collect(addr, "r/#", Duration::from_secs(1)).await;
    let kept: Vec<&str> = later.iter().map(|(t, _, _)| t.as_str()).collect();
    assert_eq!(kept, ["r/0", "r/1", "r/2"], "{later:?}");
    assert!(later.iter().all(|(_, n, retain)| *n == 30_000 && *retain));

    let live = live.await.unwrap();
    assert_eq!(
        live.len(),
        5,
        "a subscriber already there gets all: {live:?}"
    );

    // An empty retained message deletes one, which makes room again.
    publish("r/0".into(), 0).await;
    publish("r/4".into(), 30_000).await;
    let mut acked = 0;
    while acked < 2 {
        if let Event::Incoming(Packet::PubAck(_)) = events.poll().await.unwrap() {
            acked += 1;
        }
    }
    let later = collect(addr, "r/#", Duration::from_secs(1)).await;
    let kept: Vec<&str> = later.iter().map(|(t, _, _)| t.as_str()).collect();
    assert_eq!(kept, ["r/1", "r/2", "r/4"], "{later:?}");
}
