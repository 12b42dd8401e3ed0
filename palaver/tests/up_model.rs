//! `palaver up --model-file` as a newcomer runs it: llama-server started as
//! palaver's child, answering over MQTT, stopped with palaver, and its death
//! reported rather than leaving a stack that can only fail.
//!
//! Needs `PALAVER_LLAMA_SERVER` and `PALAVER_MODEL_FILE` (scripts/test sets
//! them from scripts/real-model); without them the tests say why and pass,
//! except under CI, where they fail.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use palaver_testkit::llama_server::LlamaServerSpec;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, Command};

const PALAVER: &str = env!("CARGO_BIN_EXE_palaver");
/// Start-up including the model's load, on a busy 2-core machine.
const START_TIMEOUT: Duration = Duration::from_secs(180);

/// Short replies: a CPU generates a few dozen tokens a second.
const PROJECTS: &str = r#"
[defaults]
max_tokens = 12
rate_limit = 0
[projects.general]
"#;

fn parts() -> Option<LlamaServerSpec> {
    let template =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/gemma3-chat-template.jinja");
    match LlamaServerSpec::from_env(Some(template)) {
        Ok(spec) => Some(spec),
        Err(why) => {
            eprintln!("skipping the palaver up --model-file test: {why}");
            None
        }
    }
}

/// A command of ours with none of the caller's `PALAVER_*` settings, so
/// the flags given are all it goes by.
fn palaver(subcommand: &str) -> Command {
    let mut cmd = Command::from(palaver_testkit::process::palaver_command(PALAVER));
    cmd.arg(subcommand).kill_on_drop(true);
    cmd
}

struct Up {
    child: Child,
    mqtt_port: u16,
    /// The model server's pid, from the banner.
    server_pid: u32,
    stderr: Arc<Mutex<String>>,
    _dir: TempFile,
}

/// A file removed on drop.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl Up {
    async fn start(spec: &LlamaServerSpec) -> Up {
        let projects = TempFile(std::env::temp_dir().join(format!(
            "palaver-up-model-{}-{:?}.toml",
            std::process::id(),
            std::thread::current().id()
        )));
        std::fs::write(&projects.0, PROJECTS).unwrap();
        let mut cmd = palaver("up");
        cmd.args([
            "--mqtt-port",
            "0",
            "--session-port",
            "0",
            "--inference-port",
            "0",
        ])
        .arg("--projects")
        .arg(&projects.0)
        .arg("--model-file")
        .arg(&spec.model)
        .arg("--llama-server")
        .arg(&spec.program);
        if let Some(t) = &spec.chat_template {
            cmd.arg("--chat-template-file").arg(t);
        }
        let mut child = cmd
            .env("RUST_LOG", "info,rumqttd=off")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("palaver up starts");
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err = child.stderr.take().unwrap();
        let sink = stderr.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 8192];
            while let Ok(n) = err.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut seen = Vec::new();
        let ready = tokio::time::timeout(START_TIMEOUT, async {
            while let Ok(Some(line)) = lines.next_line().await {
                let done = line.starts_with("palaver ready ");
                seen.push(line);
                if done {
                    return true;
                }
            }
            false
        })
        .await;
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        if ready != Ok(true) {
            let _ = child.start_kill();
            panic!(
                "no ready line; stdout:\n{}\nstderr:\n{}",
                seen.join("\n"),
                stderr.lock().unwrap()
            );
        }
        let ready = seen.last().unwrap();
        let mqtt = ready
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix("mqtt="))
            .expect("mqtt= in the ready line");
        let mqtt_port = mqtt.rsplit(':').next().unwrap().parse().unwrap();
        let model = seen
            .iter()
            .find(|l| l.trim_start().starts_with("model "))
            .expect("a model line in the banner");
        assert!(model.contains("llama-server"), "{model}");
        let server_pid = model
            .split("(pid ")
            .nth(1)
            .and_then(|rest| rest.split(',').next())
            .and_then(|pid| pid.parse().ok())
            .unwrap_or_else(|| panic!("no pid in {model:?}"));
        Up {
            child,
            mqtt_port,
            server_pid,
            stderr,
            _dir: projects,
        }
    }

    async fn send(&self, message: &str) -> (i32, String, String) {
        let out = palaver("send")
            .args([
                "--port",
                &self.mqtt_port.to_string(),
                "--timeout-secs",
                "120",
            ])
            .arg(message)
            .output()
            .await
            .expect("palaver send runs");
        (
            out.status.code().expect("exited"),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    async fn exit_within(&mut self, within: Duration) -> std::process::ExitStatus {
        match tokio::time::timeout(within, self.child.wait()).await {
            Ok(status) => status.unwrap(),
            Err(_) => panic!(
                "palaver up still running after {within:?}; stderr:\n{}",
                self.stderr.lock().unwrap()
            ),
        }
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

fn signal(signal: &str, pid: u32) {
    let status = std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill {signal} {pid}");
}

/// Whether `pid` is a live llama-server (not a zombie, not a reused pid).
fn is_llama_server(pid: u32) -> bool {
    let proc = Path::new("/proc").join(pid.to_string());
    let cmdline = std::fs::read(proc.join("cmdline")).unwrap_or_default();
    let status = std::fs::read_to_string(proc.join("status")).unwrap_or_default();
    String::from_utf8_lossy(&cmdline).contains("llama-server")
        && !status
            .lines()
            .any(|l| l.starts_with("State:") && l.contains('Z'))
}

async fn gone_within(pid: u32, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if !is_llama_server(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_with_a_model_file_answers_from_the_model_and_stops_it_on_exit() {
    let Some(spec) = parts() else { return };
    let mut up = Up::start(&spec).await;
    assert!(
        is_llama_server(up.server_pid),
        "the banner's pid {} is no running llama-server",
        up.server_pid
    );

    let (code, reply, err) = up.send("Hello! What is the capital of France?").await;
    assert_eq!(code, 0, "reply {reply:?}, stderr {err:?}");
    assert!(!reply.trim().is_empty(), "an empty reply");
    assert!(!reply.contains("[simulated reply]"), "{reply:?}");

    signal("-INT", up.child.id().unwrap());
    let status = up.exit_within(Duration::from_secs(20)).await;
    assert!(
        status.success(),
        "palaver up exited with {status}; stderr:\n{}",
        up.stderr.lock().unwrap()
    );
    assert!(
        gone_within(up.server_pid, Duration::from_secs(5)).await,
        "llama-server (pid {}) outlived palaver up",
        up.server_pid
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_reports_the_model_servers_death_and_stops() {
    let Some(spec) = parts() else { return };
    let mut up = Up::start(&spec).await;

    signal("-KILL", up.server_pid);
    let status = up.exit_within(Duration::from_secs(10)).await;
    assert!(
        !status.success(),
        "palaver up went on without its model server"
    );
    let stderr = up.stderr.lock().unwrap().clone();
    assert!(
        stderr.contains("llama-server") && stderr.contains("exited"),
        "the death is not reported: {stderr}"
    );
}
