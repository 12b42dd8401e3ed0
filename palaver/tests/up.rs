//! `palaver up` as a user runs it: a subprocess on free ports, driven with
//! `palaver send` / `palaver chat` subprocesses, plain rumqttc and gRPC.

use std::net::SocketAddr;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use palaver_proto::session::v1::sessions_client::SessionsClient;
use palaver_proto::session::v1::{History, Role, SessionRef};
use palaver_testkit::fake_vllm::{FakeVllm, FakeVllmConfig};
use palaver_testkit::process::{Mosquitto, RedisServer};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::time::Instant;

const PALAVER: &str = env!("CARGO_BIN_EXE_palaver");
/// Start-up of the whole stack; generous for a busy 2-core CI machine.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// What the issue promises: after SIGINT, exit within 5 s (the turn in
/// flight included).
const EXIT_WITHIN: Duration = Duration::from_secs(5);

/// A command of ours with none of the caller's `PALAVER_*` settings.
fn palaver(subcommand: &str) -> Command {
    let mut cmd = Command::from(palaver_testkit::process::palaver_command(PALAVER));
    cmd.arg(subcommand).kill_on_drop(true);
    cmd
}

/// A running `palaver up`; killed on drop, its log printed if the test failed.
struct Up {
    child: Child,
    mqtt_port: u16,
    session: SocketAddr,
    log: Arc<Mutex<String>>,
}

impl Up {
    /// Starts `palaver up` on free ports with `extra` flags and waits for
    /// its ready line.
    async fn start(extra: &[&str]) -> Up {
        let mut child = palaver("up")
            .args([
                "--mqtt-port",
                "0",
                "--session-port",
                "0",
                "--inference-port",
                "0",
            ])
            .args(extra)
            .env("RUST_LOG", "info,rumqttd=off")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("palaver up starts");
        let log = Arc::new(Mutex::new(String::new()));
        let mut stderr = child.stderr.take().expect("piped stderr");
        let sink = log.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 8192];
            while let Ok(n) = stderr.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let mut lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
        let ready = tokio::time::timeout(START_TIMEOUT, async {
            while let Ok(Some(line)) = lines.next_line().await {
                if line.starts_with("palaver ready ") {
                    return Some(line);
                }
            }
            None
        })
        .await;
        // Keep reading stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let line = match ready {
            Ok(Some(line)) => line,
            other => {
                let _ = child.start_kill();
                panic!("no ready line ({other:?}); log:\n{}", log.lock().unwrap())
            }
        };
        let field = |key: &str| -> String {
            line.split_whitespace()
                .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
                .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
                .to_owned()
        };
        let mqtt: SocketAddr = field("mqtt").parse().expect("mqtt=IP:PORT");
        assert!(field("inference").parse::<SocketAddr>().is_ok(), "{line}");
        assert_eq!(field("metrics"), "off", "{line}");
        Up {
            child,
            mqtt_port: mqtt.port(),
            session: field("session").parse().expect("session=IP:PORT"),
            log,
        }
    }

    /// `palaver send --port P <args...>`: (exit code, stdout, stderr).
    async fn send(&self, args: &[&str]) -> (i32, String, String) {
        let out = palaver("send")
            .args([
                "--port",
                &self.mqtt_port.to_string(),
                "--timeout-secs",
                "20",
            ])
            .args(args)
            .output()
            .await
            .expect("palaver send runs");
        (
            out.status.code().expect("exited, not killed"),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    async fn history(&self, project: &str, session: &str) -> History {
        let mut client = SessionsClient::connect(format!("http://{}", self.session))
            .await
            .expect("session-svc reachable on the printed port");
        client
            .get_history(SessionRef {
                project: project.into(),
                session_id: session.into(),
            })
            .await
            .expect("GetHistory")
            .into_inner()
    }

    fn interrupt(&self) {
        let pid = self.child.id().expect("still running").to_string();
        let status = std::process::Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -INT {pid}");
    }

    /// Waits for the process to exit, at most `within`.
    async fn exit_within(&mut self, within: Duration) -> ExitStatus {
        match tokio::time::timeout(within, self.child.wait()).await {
            Ok(status) => status.expect("wait for palaver up"),
            Err(_) => panic!("palaver up still running {within:?} after SIGINT"),
        }
    }

    /// SIGINT, then a clean exit.
    async fn stop(mut self) {
        self.interrupt();
        let status = self.exit_within(EXIT_WITHIN).await;
        assert!(status.success(), "palaver up exited with {status}");
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        if std::thread::panicking() {
            eprintln!(
                "---- palaver up log ----\n{}",
                self.log.lock().unwrap_or_else(|e| e.into_inner())
            );
        }
    }
}

fn simulated(reply: &str, quoting: &str) {
    assert!(
        reply.starts_with("[simulated reply]") && reply.contains(&format!("\"{quoting}\"")),
        "not a simulated reply quoting {quoting:?}: {reply:?}"
    );
}

/// Roles and texts of a stored dialog.
fn dialog(h: &History) -> Vec<(Role, String)> {
    h.messages
        .iter()
        .map(|m| {
            (
                Role::try_from(m.role).expect("known role"),
                m.content.clone(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_gets_a_reply_and_the_session_remembers() {
    let up = Up::start(&["--sim-ttft-ms", "0", "--sim-tokens-per-sec", "0"]).await;

    let (code, first, err) = up.send(&["--session", "s1", "first message"]).await;
    assert_eq!(code, 0, "stderr: {err}");
    simulated(first.trim_end(), "first message");
    let (code, second, err) = up
        .send(&[
            "--session",
            "s1",
            "--system-prompt",
            "Be brief.",
            "second message",
        ])
        .await;
    assert_eq!(code, 0, "stderr: {err}");
    simulated(second.trim_end(), "second message");

    // The second turn went in after the first, both stored in order.
    let h = up.history("general", "s1").await;
    assert_eq!(h.system_prompt, "Be brief.");
    assert_eq!(
        dialog(&h),
        [
            (Role::User, "first message".to_owned()),
            (Role::Assistant, first.trim_end().to_owned()),
            (Role::User, "second message".to_owned()),
            (Role::Assistant, second.trim_end().to_owned()),
        ]
    );

    // --port on the command line beats a broker URL in the environment.
    let out = palaver("send")
        .env("PALAVER_MQTT_URL", "mqtt://127.0.0.1:1")
        .args(["--port", &up.mqtt_port.to_string(), "--timeout-secs", "20"])
        .args(["--session", "s3", "typed port"])
        .output()
        .await
        .expect("palaver send runs");
    assert_eq!(
        out.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // maxTokens reaches the simulator: one word per token.
    let (code, short, err) = up
        .send(&["--session", "s2", "--max-tokens", "3", "count my words"])
        .await;
    assert_eq!(code, 0, "stderr: {err}");
    assert_eq!(short.trim_end(), "[simulated reply] You");

    // A session id that is no single topic level still gets its reply.
    let (code, _, err) = up.send(&["--session", "team/a+b #1", "odd id"]).await;
    assert_eq!(code, 0, "stderr: {err}");
    assert_eq!(up.history("general", "team/a+b #1").await.messages.len(), 2);

    // The same, seen through `palaver chat` with a pipe for stdin.
    let mut chat = palaver("chat")
        .args(["--port", &up.mqtt_port.to_string(), "--session", "s1"])
        .args(["--session-url", &format!("http://{}", up.session)])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("palaver chat starts");
    let mut stdin = chat.stdin.take().expect("piped stdin");
    stdin
        .write_all(b"/history\nthird message\n/clear\n/history\n/quit\n")
        .await
        .expect("write to chat");
    drop(stdin);
    let out = tokio::time::timeout(Duration::from_secs(30), chat.wait_with_output())
        .await
        .expect("chat finished in time")
        .expect("chat output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "chat: {out:?}");
    let history_at = stdout.find("user: first message").expect(&stdout);
    let third_at = stdout.find("\"third message\"").expect(&stdout);
    let cleared_at = stdout.find("(history cleared)").expect(&stdout);
    let empty_at = stdout.find("(no messages yet)").expect(&stdout);
    assert!(
        history_at < third_at && third_at < cleared_at && cleared_at < empty_at,
        "{stdout}"
    );
    assert!(stdout.contains("user: second message"), "{stdout}");
    assert!(up.history("general", "s1").await.messages.is_empty());

    up.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_turn_overtaking_a_long_one_keeps_the_gateways_broker_connection() {
    // A turn answered before an earlier one is acknowledged after it: MQTT
    // wants PUBACKs in the order the requests came, and the embedded broker
    // drops a connection that acknowledges out of order.
    let up = Up::start(&["--sim-ttft-ms", "50", "--sim-tokens-per-sec", "20"]).await;
    let long = {
        let port = up.mqtt_port.to_string();
        tokio::spawn(async move {
            palaver("send")
                .args(["--port", &port, "--timeout-secs", "20"])
                .args(["--session", "slow", "--max-tokens", "40", "a long answer"])
                .output()
                .await
                .expect("palaver send runs")
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 0..3 {
        let (code, out, err) = up
            .send(&[
                "--session",
                &format!("quick-{i}"),
                "--max-tokens",
                "2",
                "short",
            ])
            .await;
        assert_eq!(code, 0, "stderr: {err}");
        assert_eq!(out.trim_end(), "[simulated reply]");
    }
    let long = long.await.expect("send task");
    assert!(long.status.success(), "{long:?}");
    simulated(
        String::from_utf8_lossy(&long.stdout).trim_end(),
        "a long answer",
    );
    let log = up.log.lock().unwrap().clone();
    assert!(
        !log.contains("MQTT connection problem"),
        "the gateway lost its broker connection:\n{log}"
    );
    up.stop().await;
}

/// Logs in to the broker on `port` with plain rumqttc: Ok on ConnAck.
async fn mqtt_login(port: u16, credentials: Option<(&str, &str)>) -> Result<(), String> {
    let mut opts = MqttOptions::new(
        format!("auth-test-{:08x}", rand::random::<u32>()),
        "127.0.0.1",
        port,
    );
    opts.set_keep_alive(Duration::from_secs(5));
    if let Some((user, password)) = credentials {
        opts.set_credentials(user, password);
    }
    let (_client, mut events) = AsyncClient::new(opts, 10);
    let outcome = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await;
    outcome.unwrap_or_else(|_| Err("neither accepted nor refused in 10 s".into()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_auth_refuses_wrong_credentials() {
    let up = Up::start(&[
        "--mqtt-username",
        "alice",
        "--mqtt-password",
        "s3cret",
        "--sim-ttft-ms",
        "0",
    ])
    .await;
    let port = up.mqtt_port;

    assert!(mqtt_login(port, Some(("alice", "wrong"))).await.is_err());
    assert!(mqtt_login(port, Some(("mallory", "s3cret"))).await.is_err());
    assert!(mqtt_login(port, None).await.is_err());
    mqtt_login(port, Some(("alice", "s3cret")))
        .await
        .expect("the right login is accepted");

    let (code, out, err) = up
        .send(&["--username", "alice", "--password", "nope", "hello"])
        .await;
    assert_eq!(code, 2, "wrong password: stdout {out:?} stderr {err:?}");
    // The front door answers a wrong login with a CONNACK that says so
    // (rumqttd alone closed the connection without one).
    assert!(err.contains("refused the login"), "{err}");
    let (code, _, err) = up.send(&["hello"]).await;
    assert_eq!(code, 2, "no login: {err}");

    let (code, out, err) = up
        .send(&["--username", "alice", "--password", "s3cret", "hello"])
        .await;
    assert_eq!(code, 0, "right login: {err}");
    simulated(out.trim_end(), "hello");

    up.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_during_a_turn_still_replies_then_exits_zero() {
    // The first token comes 1.5 s after the request: the turn is surely in
    // flight when the signal arrives 0.2 s after the request.
    let mut up = Up::start(&["--sim-ttft-ms", "1500", "--sim-tokens-per-sec", "0"]).await;

    // Watch the request reach the broker (and so the gateway, subscribed
    // to the same topic).
    let mut opts = MqttOptions::new("sigint-watcher", "127.0.0.1", up.mqtt_port);
    opts.set_keep_alive(Duration::from_secs(5));
    let (watcher, mut events) = AsyncClient::new(opts, 10);
    watcher
        .subscribe("general/user_input", QoS::AtLeastOnce)
        .await
        .expect("subscribe queued");
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let watching = tokio::spawn(async move {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    let _ = seen_tx.send("suback");
                }
                Ok(Event::Incoming(Packet::Publish(_))) => {
                    let _ = seen_tx.send("request");
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    let first = tokio::time::timeout(Duration::from_secs(10), seen.recv()).await;
    assert_eq!(first.ok().flatten(), Some("suback"));

    let mut send = palaver("send")
        .args(["--port", &up.mqtt_port.to_string(), "--timeout-secs", "20"])
        .args(["--session", "drain", "still answered"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("palaver send starts");
    let next = tokio::time::timeout(Duration::from_secs(10), seen.recv()).await;
    assert_eq!(next.ok().flatten(), Some("request"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        send.try_wait().expect("poll send").is_none(),
        "the reply came before the signal: the test proves nothing"
    );
    up.interrupt();
    let signalled = Instant::now();

    let mut out = String::new();
    send.stdout
        .take()
        .expect("piped")
        .read_to_string(&mut out)
        .await
        .expect("read send's stdout");
    let status = send.wait().await.expect("send exits");
    assert!(status.success(), "send: {status}, stdout {out:?}");
    simulated(out.trim_end(), "still answered");

    let exit = up.exit_within(EXIT_WITHIN).await;
    assert!(exit.success(), "palaver up exited with {exit}");
    assert!(signalled.elapsed() < EXIT_WITHIN);
    watching.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_and_an_openai_server_instead_of_memory_and_simulator() {
    let redis = RedisServer::start().expect("redis-server starts");
    let vllm = FakeVllm::start(FakeVllmConfig::default()).await;
    let redis_url = redis.url();
    let vllm_url = vllm.url();
    let flags = ["--redis-url", &redis_url, "--vllm-url", &vllm_url];

    let up = Up::start(&flags).await;
    let (code, first, err) = up.send(&["--session", "r1", "first message"]).await;
    assert_eq!(code, 0, "stderr: {err}");
    assert!(first.starts_with("reply to: first message"), "{first:?}");
    let (code, second, err) = up.send(&["--session", "r1", "second message"]).await;
    assert_eq!(code, 0, "stderr: {err}");
    assert!(second.starts_with("reply to: second message"), "{second:?}");
    assert_eq!(vllm.requests(), 2);

    // The model saw the first exchange as history of the second turn.
    let request = vllm.last_request().expect("a request body");
    let sent: Vec<(String, String)> = request["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| {
            (
                m["role"].as_str().unwrap_or_default().to_owned(),
                m["content"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let tail: Vec<(&str, &str)> = sent
        .iter()
        .skip_while(|(role, _)| role == "system")
        .map(|(r, c)| (r.as_str(), c.as_str()))
        .collect();
    assert_eq!(
        tail,
        [
            ("user", "first message"),
            ("assistant", first.trim_end()),
            ("user", "second message"),
        ],
        "{request}"
    );
    up.stop().await;

    // A new process on the same Redis finds the dialog.
    let up = Up::start(&flags).await;
    let h = up.history("general", "r1").await;
    assert_eq!(h.messages.len(), 4, "{h:?}");
    assert_eq!(h.messages[2].content, "second message");
    up.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_broker_instead_of_the_embedded_one() {
    let mosquitto = Mosquitto::start().expect("mosquitto starts");
    let url = format!("mqtt://127.0.0.1:{}", mosquitto.port());
    let up = Up::start(&["--mqtt-broker", &url, "--sim-ttft-ms", "0"]).await;
    assert_eq!(
        up.mqtt_port,
        mosquitto.port(),
        "the ready line names the broker in use"
    );
    let (code, out, err) = up.send(&["--session", "m1", "via mosquitto"]).await;
    assert_eq!(code, 0, "stderr: {err}");
    simulated(out.trim_end(), "via mosquitto");
    up.stop().await;
}
