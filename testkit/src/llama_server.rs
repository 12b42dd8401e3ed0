//! llama.cpp's `llama-server` as a child process: a real OpenAI-compatible
//! model server on the CPU, for the real-model tests and `palaver up --model-file`.
//!
//! The server is started through a small `sh` wrapper that kills it when our
//! end of its stdin pipe closes — on drop, and also when this process dies
//! without running any destructor (a panic in a static, SIGKILL), so no test
//! run leaves a model server behind. The child's pid is the server's own
//! (the wrapper `exec`s it).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::process::{free_port, TempDir};

/// The variable naming the `llama-server` binary (`scripts/real-model` prints it).
pub const ENV_SERVER: &str = "PALAVER_LLAMA_SERVER";
/// The variable naming the GGUF model file.
pub const ENV_MODEL: &str = "PALAVER_MODEL_FILE";
/// The variable naming a chat template file for a model that has none.
pub const ENV_TEMPLATE: &str = "PALAVER_CHAT_TEMPLATE_FILE";

/// Longest wait for the model to load and `/health` to answer 200.
pub const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(180);

/// Kills the exec'd server (`$$` after `exec`) once fd 3, our stdin pipe,
/// reads end-of-file: the parent closed it or is gone.
const WRAPPER: &str = r#"exec 3<&0 0</dev/null
(read -r _ <&3; kill -TERM $$ 2>/dev/null) &
exec "$@" 3<&-"#;

/// How to run a `llama-server`.
#[derive(Debug, Clone)]
pub struct LlamaServerSpec {
    /// The `llama-server` binary.
    pub program: PathBuf,
    /// The GGUF model file.
    pub model: PathBuf,
    /// A Jinja chat template (`--chat-template-file`); `None` uses the model's own.
    pub chat_template: Option<PathBuf>,
    /// Sequences generated at once (`--parallel`).
    pub slots: u32,
    /// Context size shared by all slots (`-c`); each slot gets `context / slots`.
    pub context: u32,
    /// Where the server's output goes; `None`: a temporary file, removed on drop.
    pub log: Option<PathBuf>,
    /// How long the model may take to load.
    pub start_timeout: Duration,
}

impl LlamaServerSpec {
    /// The defaults palaver runs the model with: 8 slots (palaver's limit)
    /// over an 8192-token context.
    pub fn new(program: impl Into<PathBuf>, model: impl Into<PathBuf>) -> Self {
        Self {
            program: program.into(),
            model: model.into(),
            chat_template: None,
            slots: 8,
            context: 8192,
            log: None,
            start_timeout: DEFAULT_START_TIMEOUT,
        }
    }

    /// The parts named by [`ENV_SERVER`], [`ENV_MODEL`] and [`ENV_TEMPLATE`]
    /// (else `default_template`). When the first two are unset: `Err` with
    /// why, for a test to skip — except under CI (`CI` set and not `false`),
    /// where a missing part is a broken setup and this panics.
    pub fn from_env(default_template: Option<PathBuf>) -> Result<Self, String> {
        let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
        match (var(ENV_SERVER), var(ENV_MODEL)) {
            (Some(program), Some(model)) => {
                let mut spec = Self::new(program, model);
                spec.chat_template = var(ENV_TEMPLATE).map(PathBuf::from).or(default_template);
                Ok(spec)
            }
            _ => {
                let why = format!(
                    "{ENV_SERVER} and {ENV_MODEL} are not both set (scripts/real-model builds \
                     llama-server and fetches the model, and scripts/test sets them)"
                );
                let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false");
                assert!(!ci, "CI must run the real-model tests, but {why}");
                Err(why)
            }
        }
    }
}

/// A running `llama-server`, stopped on drop.
#[derive(Debug)]
pub struct LlamaServer {
    child: Child,
    /// Closing it makes the wrapper kill the server.
    stdin: Option<ChildStdin>,
    port: u16,
    log: PathBuf,
    _dir: Option<TempDir>,
}

impl LlamaServer {
    /// Starts the server on a free loopback port and waits until its
    /// `/health` answers 200 (the model is loaded).
    pub fn start(spec: &LlamaServerSpec) -> anyhow::Result<Self> {
        for (what, path) in [("llama-server", &spec.program), ("model file", &spec.model)] {
            if !path.is_file() {
                bail!(
                    "{what} {} not found (scripts/real-model installs both)",
                    path.display()
                );
            }
        }
        if let Some(t) = &spec.chat_template {
            if !t.is_file() {
                bail!("chat template file {} not found", t.display());
            }
        }
        let (log, dir) = match &spec.log {
            Some(path) => (path.clone(), None),
            None => {
                let dir = TempDir::new("llama-server")?;
                (dir.path().join("llama-server.log"), Some(dir))
            }
        };
        let mut last_err = None;
        // A port free a moment ago may be taken by the time the server binds.
        for _ in 0..3 {
            let port = free_port();
            let mut server = Self::spawn(spec, port, &log)?;
            match server.wait_healthy(spec.start_timeout) {
                Ok(()) => {
                    server._dir = dir;
                    return Ok(server);
                }
                Err(e) => {
                    let bind_race = server.log_tail(20).contains("couldn't bind");
                    server.stop();
                    if !bind_race {
                        return Err(e);
                    }
                    last_err = Some(e);
                }
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("llama-server did not start")))
    }

    fn spawn(spec: &LlamaServerSpec, port: u16, log: &Path) -> anyhow::Result<Self> {
        let out = std::fs::File::create(log)
            .with_context(|| format!("cannot write llama-server's log {}", log.display()))?;
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(WRAPPER)
            .arg("llama-server-wrapper")
            .arg(&spec.program)
            .arg("-m")
            .arg(&spec.model)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--parallel", &spec.slots.to_string()])
            .args(["-c", &spec.context.to_string()])
            // /metrics shows requests running and waiting at the server.
            .args(["--jinja", "--metrics", "--no-webui"]);
        if let Some(t) = &spec.chat_template {
            cmd.arg("--chat-template-file").arg(t);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("cannot start llama-server (through sh)")?;
        let stdin = child.stdin.take();
        Ok(Self {
            child,
            stdin,
            port,
            log: log.to_path_buf(),
            _dir: None,
        })
    }

    fn wait_healthy(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            // 503 while loading; connection refused before it listens.
            if let Ok((200, _)) = self.get("/health") {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "llama-server exited before it was ready ({status}); its last lines:\n{}",
                    self.log_tail(15)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "llama-server was not ready within {timeout:?}; its last lines:\n{}",
                    self.log_tail(15)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `http://127.0.0.1:PORT`, the base URL of its OpenAI-compatible API.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Where the server's output goes.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The server's exit status once it has ended (by itself or killed).
    pub fn try_wait(&mut self) -> std::io::Result<Option<ExitStatus>> {
        self.child.try_wait()
    }

    /// The last `n` lines of the server's output, for error messages.
    pub fn log_tail(&self, n: usize) -> String {
        let Ok(file) = std::fs::File::open(&self.log) else {
            return String::new();
        };
        let lines: Vec<String> = BufReader::new(file).lines().map_while(Result::ok).collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// A plain HTTP GET of `path` (e.g. `/health`, `/metrics`, `/slots`):
    /// (status, body). Enough HTTP for the server's small answers, so this
    /// needs no client library and no async runtime.
    pub fn get(&self, path: &str) -> std::io::Result<(u16, String)> {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        )?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw)?;
        let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP response");
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or_else(bad)?;
        let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
        let body = &raw[split + 4..];
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(bad)?;
        let body = if head.contains("transfer-encoding: chunked") {
            dechunk(body)
        } else {
            body.to_vec()
        };
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }

    /// One value of the server's Prometheus metrics, e.g.
    /// `llamacpp:requests_processing`.
    pub fn metric(&self, name: &str) -> anyhow::Result<f64> {
        let (status, body) = self.get("/metrics")?;
        if status != 200 {
            bail!("GET /metrics answered {status} (is --metrics on?)");
        }
        body.lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| {
                let (key, value) = l.split_once(' ')?;
                (key == name).then(|| value.trim().parse().ok()).flatten()
            })
            .with_context(|| format!("no metric {name} in /metrics"))
    }

    /// Stops the server: TERM through the wrapper, KILL if it lingers.
    pub fn stop(&mut self) {
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The body of a `Transfer-Encoding: chunked` response.
fn dechunk(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = body.windows(2).position(|w| w == b"\r\n") {
        let size = String::from_utf8_lossy(&body[..eol]);
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        let rest = &body[eol + 2..];
        if n == 0 || rest.len() < n {
            break;
        }
        out.extend_from_slice(&rest[..n]);
        body = rest[n..].strip_prefix(b"\r\n").unwrap_or(&rest[n..]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_bodies_are_joined() {
        assert_eq!(
            dechunk(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
            b"hello world"
        );
        assert_eq!(dechunk(b"0\r\n\r\n"), b"");
    }
}
