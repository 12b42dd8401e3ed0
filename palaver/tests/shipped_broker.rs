//! The broker as shipped (deploy/mosquitto: login, ACL) with the logins that
//! scripts/make-secrets writes, in front of `palaver up`: the gateway's login
//! serves turns, an end user's login chats but cannot use control topics,
//! the admin's can, and anonymous clients are refused.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use palaver_testkit::process::free_port;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

const PALAVER: &str = env!("CARGO_BIN_EXE_palaver");

/// `palaver` without the caller's `PALAVER_*` settings (see
/// [`palaver_testkit::process::palaver_command`]).
fn palaver() -> Command {
    Command::from(palaver_testkit::process::palaver_command(PALAVER))
}
const WAIT: Duration = Duration::from_secs(30);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

/// A scratch folder, removed on drop.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn mosquitto_program() -> PathBuf {
    ["/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("mosquitto"))
}

/// The shipped mosquitto.conf with its paths moved into `dir` and its two
/// listeners on `port` and a free health port.
fn shipped_config(dir: &Path, port: u16) -> PathBuf {
    let shipped = repo().join("deploy/mosquitto");
    for file in ["acl", "health.acl"] {
        std::fs::copy(shipped.join(file), dir.join(file)).expect("copy ACL");
    }
    std::fs::create_dir_all(dir.join("data")).expect("data dir");
    let conf = std::fs::read_to_string(shipped.join("mosquitto.conf")).expect("shipped conf");
    let mut out = String::new();
    for line in conf.lines() {
        let line = line
            .replace("/mosquitto/config/", &format!("{}/", dir.display()))
            .replace("/mosquitto/data/", &format!("{}/data/", dir.display()));
        let line = match line.as_str() {
            "listener 1883" => format!("listener {port} 127.0.0.1"),
            l if l.starts_with("listener 1880 ") => format!("listener {} 127.0.0.1", free_port()),
            _ => line,
        };
        out.push_str(&line);
        out.push('\n');
    }
    // As root, mosquitto reads the password file after dropping to its own
    // user, who cannot read this scratch folder.
    if rustix::process::getuid().is_root() {
        out.push_str("user root\n");
    }
    let path = dir.join("mosquitto.conf");
    std::fs::write(&path, out).expect("write conf");
    path
}

/// An MQTT client with a login; what it receives arrives on the channel.
async fn client(
    port: u16,
    user: &str,
    password: &str,
) -> (AsyncClient, mpsc::UnboundedReceiver<(String, String)>) {
    let mut opts = MqttOptions::new(
        format!("t-{user}-{:08x}", rand::random::<u32>()),
        "127.0.0.1",
        port,
    );
    opts.set_credentials(user, password);
    let (client, mut events) = AsyncClient::new(opts, 64);
    let (tx, rx) = mpsc::unbounded_channel();
    let (connected, is_connected) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut connected = Some(connected);
        while let Ok(event) = events.poll().await {
            match event {
                Event::Incoming(Packet::ConnAck(_)) => {
                    if let Some(c) = connected.take() {
                        let _ = c.send(());
                    }
                }
                Event::Incoming(Packet::Publish(p)) => {
                    let _ = tx.send((
                        p.topic.clone(),
                        String::from_utf8_lossy(&p.payload).into_owned(),
                    ));
                }
                _ => {}
            }
        }
    });
    tokio::time::timeout(WAIT, is_connected)
        .await
        .expect("connected in time")
        .expect("login accepted");
    (client, rx)
}

/// Starts `palaver up` against the broker with the gateway's login and
/// waits for its ready line.
async fn palaver_up(port: u16, password: &str, extra: &[&str]) -> Child {
    let mut child = palaver()
        .args(["up", "--session-port", "0", "--inference-port", "0"])
        .args(extra)
        .args(["--mqtt-broker", &format!("mqtt://127.0.0.1:{port}")])
        .args(["--mqtt-username", "palaver-gateway"])
        .env("PALAVER_MQTT_PASSWORD", password)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("palaver up starts");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let ready = tokio::time::timeout(WAIT, async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.starts_with("palaver ready ") {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(
        ready,
        Ok(true),
        "palaver up became ready behind the shipped broker"
    );
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    child
}

/// The shipped broker running on a free port, with the logins of
/// scripts/make-secrets; killed and its folder removed on drop.
struct Shipped {
    port: u16,
    secrets: PathBuf,
    _broker: Child,
    _scratch: Scratch,
}

impl Shipped {
    fn secret(&self, name: &str) -> String {
        std::fs::read_to_string(self.secrets.join(name)).expect(name)
    }
}

/// Starts the shipped mosquitto with `acl` made from the shipped ACL and
/// `users` added to the password file.
async fn shipped(acl: impl Fn(&str) -> String, users: &[(&str, &str)]) -> Shipped {
    let dir = std::env::temp_dir().join(format!("palaver-shipped-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(dir.join("scripts")).expect("scratch");
    let scratch = Scratch(dir.clone());
    std::fs::copy(
        repo().join("scripts/make-secrets"),
        dir.join("scripts/make-secrets"),
    )
    .expect("copy make-secrets");
    let made = std::process::Command::new("python3")
        .arg(dir.join("scripts/make-secrets"))
        .arg("compose")
        .output()
        .expect("python3 runs make-secrets");
    assert!(made.status.success(), "make-secrets: {made:?}");
    let secrets = dir.join("secrets");
    std::fs::copy(secrets.join("mqtt_passwd"), dir.join("passwd")).expect("password file");
    for (user, password) in users {
        let added = std::process::Command::new("mosquitto_passwd")
            .arg("-b")
            .arg(dir.join("passwd"))
            .args([user, password])
            .status()
            .expect("mosquitto_passwd runs");
        assert!(added.success(), "mosquitto_passwd {user}");
    }

    let port = free_port();
    let conf = shipped_config(&dir, port);
    let shipped_acl = std::fs::read_to_string(dir.join("acl")).expect("acl");
    std::fs::write(dir.join("acl"), acl(&shipped_acl)).expect("write acl");
    let log = std::fs::File::create(dir.join("mosquitto.log")).expect("log file");
    let mut broker = Command::new(mosquitto_program())
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("mosquitto starts (scripts/test installs it)");
    let deadline = tokio::time::Instant::now() + WAIT;
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "mosquitto listens in time"
        );
        assert!(
            broker.try_wait().expect("poll").is_none(),
            "mosquitto exited: {}",
            std::fs::read_to_string(dir.join("mosquitto.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Shipped {
        port,
        secrets,
        _broker: broker,
        _scratch: scratch,
    }
}

#[tokio::test]
async fn logins_and_acl_of_the_shipped_broker() {
    let broker = shipped(str::to_owned, &[]).await;
    let port = broker.port;
    let secret = |name: &str| broker.secret(name);
    let _up = palaver_up(port, &secret("mqtt-gateway-password"), &[]).await;

    // An end user chats with palaver send, as the README shows.
    let sent = palaver()
        .args(["send", "--mqtt-url", &format!("mqtt://127.0.0.1:{port}")])
        .args([
            "--project",
            "general",
            "--session",
            "s1",
            "--timeout-secs",
            "20",
            "Hello",
        ])
        .env("PALAVER_MQTT_USERNAME", "client")
        .env("PALAVER_MQTT_PASSWORD", secret("mqtt-client-password"))
        .output()
        .await
        .expect("palaver send runs");
    assert_eq!(
        sent.status.code(),
        Some(0),
        "a reply for the client login: {sent:?}"
    );
    assert!(String::from_utf8_lossy(&sent.stdout).contains("Hello"));

    // Control topics: the admin's template is acknowledged, an end user's is
    // refused by the broker and never reaches the gateway.
    let (admin, mut hints) = client(port, "palaver-admin", &secret("mqtt-admin-password")).await;
    admin
        .subscribe("general/hint/#", QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (user, _) = client(port, "client", &secret("mqtt-client-password")).await;
    user.publish(
        "general/template/from-user",
        QoS::AtLeastOnce,
        false,
        r#"{"template":"be rude"}"#,
    )
    .await
    .expect("publish queued");
    tokio::time::sleep(Duration::from_millis(500)).await;
    admin
        .publish(
            "general/template/from-admin",
            QoS::AtLeastOnce,
            false,
            r#"{"template":"be kind"}"#,
        )
        .await
        .expect("publish queued");
    let (topic, _) = tokio::time::timeout(WAIT, hints.recv())
        .await
        .expect("a hint in time")
        .expect("hint");
    assert_eq!(
        topic, "general/hint/from-admin",
        "only the admin's template is served"
    );

    // No login, no connection.
    let mut opts = MqttOptions::new("t-anonymous", "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(5));
    let (_anonymous, mut events) = AsyncClient::new(opts, 8);
    let refused = tokio::time::timeout(WAIT, async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    return format!("{:?}", ack.code);
                }
                Ok(_) => {}
                Err(e) => return e.to_string(),
            }
        }
    })
    .await
    .expect("an answer in time");
    assert!(
        refused.contains("NotAuthorized") || refused.contains("Refused"),
        "anonymous refused: {refused}"
    );
}

/// The shipped ACL as its comment says to run with `--identity-binding only`:
/// without the shared-topics section.
fn without_shared_topics(acl: &str) -> String {
    let (before, rest) = acl
        .split_once("# BEGIN shared topics")
        .expect("BEGIN marker");
    let (_, after) = rest.split_once("# END shared topics").expect("END marker");
    format!("{before}{after}")
}

/// Everything `rx` receives within `window`.
async fn drain(
    rx: &mut mpsc::UnboundedReceiver<(String, String)>,
    window: Duration,
) -> Vec<(String, String)> {
    let mut got = Vec::new();
    let _ = tokio::time::timeout(window, async {
        while let Some(m) = rx.recv().await {
            got.push(m);
        }
    })
    .await;
    got
}

#[tokio::test]
async fn identity_binding_under_the_shipped_acl() {
    let broker = shipped(
        without_shared_topics,
        &[("alice", "alice-pw"), ("bob", "bob-pw")],
    )
    .await;
    let port = broker.port;
    let _up = palaver_up(
        port,
        &broker.secret("mqtt-gateway-password"),
        &["--identity-binding", "only", "--sim-ttft-ms", "0"],
    )
    .await;

    let (alice, mut alice_rx) = client(port, "alice", "alice-pw").await;
    let (bob, mut bob_rx) = client(port, "bob", "bob-pw").await;
    let (admin, mut admin_rx) =
        client(port, "palaver-admin", &broker.secret("mqtt-admin-password")).await;
    for (c, filter) in [
        (&alice, "general/assistant_response/alice/#"),
        (&bob, "general/assistant_response/alice/#"),
        (&bob, "general/assistant_response/#"),
        (&admin, "general/assistant_response/#"),
    ] {
        c.subscribe(filter, QoS::AtLeastOnce)
            .await
            .expect("subscribe");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Alice's request on her own topic is answered in her namespace ...
    alice
        .publish(
            "general/user_input/alice",
            QoS::AtLeastOnce,
            false,
            r#"{"sessionId":"s1","message":"Hello from alice"}"#,
        )
        .await
        .expect("publish queued");
    let (topic, reply) = tokio::time::timeout(WAIT, alice_rx.recv())
        .await
        .expect("alice's reply in time")
        .expect("reply");
    assert_eq!(topic, "general/assistant_response/alice/s1");
    assert!(reply.contains("Hello from alice"), "{reply}");
    // ... which the admin (read #) sees and bob, subscribed to it, does not.
    let seen = drain(&mut admin_rx, Duration::from_secs(1)).await;
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(drain(&mut bob_rx, Duration::from_millis(200)).await, []);

    // Bob cannot send on alice's topic (the broker drops it), nor on the
    // shared one, and the admin's message on the shared topic is not read.
    bob.publish(
        "general/user_input/alice",
        QoS::AtLeastOnce,
        false,
        r#"{"sessionId":"s1","message":"bob as alice"}"#,
    )
    .await
    .expect("publish queued");
    bob.publish(
        "general/user_input",
        QoS::AtLeastOnce,
        false,
        r#"{"sessionId":"s1","message":"bob shared"}"#,
    )
    .await
    .expect("publish queued");
    admin
        .publish(
            "general/user_input",
            QoS::AtLeastOnce,
            false,
            r#"{"sessionId":"shared","message":"on the shared topic"}"#,
        )
        .await
        .expect("publish queued");
    // Bob's own topic still works for bob, in his namespace: the gateway
    // is serving, so silence above is the ACL and the binding.
    bob.publish(
        "general/user_input/bob",
        QoS::AtLeastOnce,
        false,
        r#"{"sessionId":"s1","message":"Hello from bob"}"#,
    )
    .await
    .expect("publish queued");
    let seen = drain(&mut admin_rx, Duration::from_secs(3)).await;
    let topics: Vec<&str> = seen.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(topics, ["general/assistant_response/bob/s1"], "{seen:?}");
    assert!(seen[0].1.contains("Hello from bob"), "{seen:?}");
    assert_eq!(drain(&mut alice_rx, Duration::from_millis(200)).await, []);
    // Bob's wide subscription brings his own reply, never alice's.
    let bobs = drain(&mut bob_rx, Duration::from_millis(200)).await;
    let topics: Vec<&str> = bobs.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(topics, ["general/assistant_response/bob/s1"], "{bobs:?}");
}
