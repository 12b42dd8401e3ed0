//! `palaver up --model-file`: llama.cpp's `llama-server` as a supervised
//! child, so a newcomer gets replies from a real model without a GPU.
//!
//! The server is started (and its model loaded, `/health` answering 200)
//! before the gateway subscribes; a task watches it and ends `palaver up`
//! with an error naming it if it dies; it is stopped when palaver stops.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use palaver_testkit::llama_server::{LlamaServer, LlamaServerSpec};
use tokio_util::sync::CancellationToken;

/// How often the watcher looks at the child: a dead server is reported
/// within this, and a look is one `waitpid` call.
const WATCH_EVERY: Duration = Duration::from_millis(250);

/// What `palaver up` was asked to run.
#[derive(Debug, Clone)]
pub struct ModelServerArgs {
    pub model_file: PathBuf,
    pub llama_server: PathBuf,
    pub chat_template_file: Option<PathBuf>,
    /// Sequences at once: inference-svc's limit, so none waits inside the server.
    pub slots: u32,
    /// The server's whole context (`-c`), shared by the slots.
    pub context: u32,
}

/// A running, healthy model server, shared with its watcher.
pub struct ModelServer {
    server: Arc<Mutex<Option<LlamaServer>>>,
    url: String,
    pid: u32,
    log: PathBuf,
}

impl ModelServer {
    /// Starts `llama-server` and waits for its model to load.
    pub async fn start(args: &ModelServerArgs) -> anyhow::Result<Self> {
        let program = find_on_path(&args.llama_server)?;
        let mut spec = LlamaServerSpec::new(program, &args.model_file);
        spec.chat_template = args.chat_template_file.clone();
        spec.slots = args.slots;
        spec.context = args.context;
        let server = tokio::task::spawn_blocking(move || LlamaServer::start(&spec))
            .await
            .context("the task starting llama-server failed")??;
        Ok(Self {
            url: server.url(),
            pid: server.pid(),
            log: server.log_path().to_path_buf(),
            server: Arc::new(Mutex::new(Some(server))),
        })
    }

    /// The base URL of its OpenAI-compatible API.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Where the server's own output goes.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Resolves `Ok` after `stop` is cancelled and the server stopped, or
    /// `Err` as soon as the server ends by itself (with its last words).
    pub async fn watch(self, stop: CancellationToken) -> anyhow::Result<()> {
        let mut tick = tokio::time::interval(WATCH_EVERY);
        loop {
            tokio::select! {
                _ = stop.cancelled() => {
                    let server = self.server.clone();
                    let _ = tokio::task::spawn_blocking(move || {
                        // Dropping it stops it (TERM, then KILL if it lingers).
                        drop(lock(&server).take());
                    })
                    .await;
                    return Ok(());
                }
                _ = tick.tick() => {
                    let mut guard = lock(&self.server);
                    let Some(server) = guard.as_mut() else {
                        return Ok(());
                    };
                    if let Some(status) = server.try_wait().context("cannot watch llama-server")? {
                        let tail = server.log_tail(10);
                        return Err(anyhow!(
                            "llama-server (pid {}) exited ({status}); its last lines ({}):\n{tail}",
                            self.pid,
                            self.log.display()
                        ));
                    }
                }
            }
        }
    }
}

fn lock(server: &Mutex<Option<LlamaServer>>) -> std::sync::MutexGuard<'_, Option<LlamaServer>> {
    // A panic elsewhere while holding it leaves the Option intact.
    server.lock().unwrap_or_else(|p| p.into_inner())
}

/// `program` itself when it names a path, else the first match on PATH.
fn find_on_path(program: &Path) -> anyhow::Result<PathBuf> {
    if program.components().count() > 1 {
        return Ok(program.to_path_buf());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
        .map_or_else(
            || {
                bail!(
                    "{} not found on PATH: give its path with --llama-server \
                     (scripts/real-model builds one and prints it)",
                    program.display()
                )
            },
            Ok,
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_are_found_on_path_or_taken_as_given() {
        assert_eq!(
            find_on_path(Path::new("./x/llama-server")).unwrap(),
            PathBuf::from("./x/llama-server")
        );
        assert!(find_on_path(Path::new("sh")).unwrap().is_absolute());
        let missing = find_on_path(Path::new("no-such-llama-server-here")).unwrap_err();
        assert!(missing.to_string().contains("--llama-server"), "{missing}");
    }
}
