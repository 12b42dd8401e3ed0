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
async fn palaver_up(port: u16, password: &str) -> Child {
    let mut child = Command::new(PALAVER)
        .args(["up", "--session-port", "0", "--inference-port", "0"])
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

#[tokio::test]
async fn logins_and_acl_of_the_shipped_broker() {
    let dir = std::env::temp_dir().join(format!("palaver-shipped-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(dir.join("scripts")).expect("scratch");
    let _scratch = Scratch(dir.clone());
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
    let secret = |name: &str| std::fs::read_to_string(secrets.join(name)).expect(name);
    std::fs::copy(secrets.join("mqtt_passwd"), dir.join("passwd")).expect("password file");

    let port = free_port();
    let conf = shipped_config(&dir, port);
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

    let _up = palaver_up(port, &secret("mqtt-gateway-password")).await;

    // An end user chats with palaver send, as the README shows.
    let sent = Command::new(PALAVER)
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
    let _ = broker.start_kill();
}
