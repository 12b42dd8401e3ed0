//! Real servers for tests: `redis-server` and `mosquitto` on free loopback
//! ports, each in its own temporary directory, killed when dropped.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// A port that was free a moment ago. Servers that cannot bind port 0
/// themselves get one of these, and callers retry on the rare race.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("the loopback interface has a free port")
}

/// A command for one of palaver's own programs with none of the caller's
/// `PALAVER_*` settings, so that the flags a test gives are all it goes by
/// (under scripts/test, `PALAVER_MODEL_FILE` would make `palaver up` start
/// a real model). Async tests take it as `tokio::process::Command::from`.
pub fn palaver_command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new(program);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("PALAVER_") {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// Finds a program on PATH or in the sbin directories Debian uses for daemons
/// (mosquitto lives in /usr/sbin, which a non-login PATH may lack).
fn find_program(name: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from));
    for dir in dirs {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!("{name} not found: install it (apt-get install -y redis-server mosquitto) or run .ci/run")
}

fn wait_for_port(addr: SocketAddr, child: &mut Child, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!("server exited before listening on {addr}: {status}");
        }
        if Instant::now() > deadline {
            bail!("server did not listen on {addr} within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A temporary directory removed on drop.
#[derive(Debug)]
pub(crate) struct TempDir(PathBuf);

impl TempDir {
    pub(crate) fn new(tag: &str) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!(
            "palaver-{tag}-{}-{:x}",
            std::process::id(),
            rand_u64()
        ));
        std::fs::create_dir_all(&dir)?;
        Ok(Self(dir))
    }
    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn rand_u64() -> u64 {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    let mut h = RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    h.finish()
}

fn kill(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// Stops a server as an orchestrator's restart does: SIGTERM, so that it
/// writes what it persists, then SIGKILL if it is still there after 10 s.
fn terminate(child: &mut Option<Child>) {
    let Some(mut c) = child.take() else { return };
    let sent = Command::new("kill")
        .args(["-TERM", &c.id().to_string()])
        .status()
        .is_ok_and(|s| s.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    while sent && Instant::now() < deadline {
        if let Ok(Some(_)) = c.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = c.kill();
    let _ = c.wait();
}

/// A `redis-server` of our own: no persistence, or AOF as the compose and
/// Kubernetes setups run it (then it can be stopped and started again).
#[derive(Debug)]
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    aof: bool,
    dir: TempDir,
}

impl RedisServer {
    /// Starts a fresh, empty Redis on a free port.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(false)
    }

    /// Starts a fresh Redis with AOF (`appendfsync everysec`, as
    /// docker-compose.yml runs it), so that [`RedisServer::stop`] and
    /// [`RedisServer::start_again`] keep the data.
    pub fn start_with_aof() -> anyhow::Result<Self> {
        Self::start_with(true)
    }

    fn start_with(aof: bool) -> anyhow::Result<Self> {
        let dir = TempDir::new("redis")?;
        let mut server = Self {
            child: None,
            port: 0,
            aof,
            dir,
        };
        let mut last_err = None;
        for _ in 0..5 {
            server.port = free_port();
            match server.start_again() {
                Ok(()) => return Ok(server),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("redis-server did not start")))
    }

    /// (Re)starts Redis on its port and directory, e.g. after
    /// [`RedisServer::stop`]; with AOF it reloads what it had.
    pub fn start_again(&mut self) -> anyhow::Result<()> {
        kill(&mut self.child);
        let program = find_program("redis-server")?;
        let persistence: &[&str] = if self.aof {
            &["--appendonly", "yes", "--appendfsync", "everysec"]
        } else {
            &["--appendonly", "no"]
        };
        let mut child = Command::new(&program)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(persistence)
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start redis-server")?;
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        if let Err(e) = wait_for_port(addr, &mut child, Duration::from_secs(10)) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
        self.child = Some(child);
        Ok(())
    }

    /// Stops Redis as a restart does (SIGTERM: it flushes its AOF first).
    pub fn stop(&mut self) {
        terminate(&mut self.child);
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT/`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

/// A `mosquitto` broker of our own, anonymous access, on one fixed port for
/// its whole life (so it can be stopped and started again to test reconnects).
#[derive(Debug)]
pub struct Mosquitto {
    child: Option<Child>,
    port: u16,
    persistent: bool,
    dir: TempDir,
}

impl Mosquitto {
    /// Starts a broker on a free port.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(false)
    }

    /// Starts a broker that persists its sessions and queued messages to
    /// disk, so that persistent-session clients keep them across
    /// [`Mosquitto::stop`] (a graceful stop then) and `start_again`.
    pub fn start_persistent() -> anyhow::Result<Self> {
        Self::start_with(true)
    }

    fn start_with(persistent: bool) -> anyhow::Result<Self> {
        let mut last_err = None;
        for _ in 0..5 {
            let mut m = Self {
                child: None,
                port: free_port(),
                persistent,
                dir: TempDir::new("mosquitto")?,
            };
            match m.start_again() {
                Ok(()) => return Ok(m),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("mosquitto did not start")))
    }

    /// (Re)starts the broker on its port, e.g. after [`Mosquitto::stop`].
    pub fn start_again(&mut self) -> anyhow::Result<()> {
        kill(&mut self.child);
        let program = find_program("mosquitto")?;
        let conf = self.dir.path().join("mosquitto.conf");
        let persistence = if self.persistent {
            // Started as root, mosquitto drops to its own user, which must
            // be able to write its database here (else it silently keeps none).
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(self.dir.path(), std::fs::Permissions::from_mode(0o777))?;
            format!(
                "persistence true\npersistence_location {}/\n",
                self.dir.path().display()
            )
        } else {
            "persistence false\n".to_owned()
        };
        std::fs::write(
            &conf,
            format!(
                "listener {} 127.0.0.1\nallow_anonymous true\n{persistence}\
                 max_queued_messages 100000\nmax_inflight_messages 0\n",
                self.port
            ),
        )?;
        let mut child = Command::new(program)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start mosquitto")?;
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        wait_for_port(addr, &mut child, Duration::from_secs(10))?;
        self.child = Some(child);
        Ok(())
    }

    /// Kills the broker (clients see the connection drop); a persistent
    /// one is stopped gracefully, so that it saves its sessions.
    pub fn stop(&mut self) {
        if self.persistent {
            terminate(&mut self.child);
        } else {
            kill(&mut self.child);
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}
