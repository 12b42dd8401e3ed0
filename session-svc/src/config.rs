//! session-svc's command line and environment.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use palaver_core::auth::{Bearer, ClientAuthArgs, ServerAuthArgs};
use palaver_core::projects::Projects;
use palaver_core::tls::{ClientTlsArgs, ServerTlsArgs};

use crate::balance::{BalanceArgs, BalanceConfig};
use crate::turn::LockConfig;

/// Flags of session-svc (each also read from the environment variable shown
/// in `--help`).
#[derive(Debug, Clone, clap::Args)]
pub struct SessionArgs {
    /// Where dialogs live, e.g. redis://127.0.0.1:6379/0. Without it dialogs
    /// are kept in this process's memory (one replica only, lost on restart).
    /// rediss:// connects over TLS. A password belongs in the URL, so pass it
    /// in the environment rather than as a flag (`ps` shows flags).
    #[arg(long, env = "PALAVER_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,

    /// CA certificate(s) (PEM) that a rediss:// server must chain to
    /// [default: the system's roots].
    #[arg(long, env = "PALAVER_REDIS_CA_FILE")]
    pub redis_ca_file: Option<PathBuf>,

    /// inference-svc's gRPC address: one URL, a comma-separated list of
    /// URLs (one replica per GPU), or dns://host:port for every address of a
    /// name, resolved again while running (a Kubernetes headless Service).
    /// Each session's turns go to one replica while it is healthy. https://
    /// connects over TLS (see --tls-ca-file).
    #[arg(
        long,
        env = "PALAVER_INFERENCE_URL",
        default_value = "http://127.0.0.1:50052"
    )]
    pub inference_url: String,

    /// The projects file (TOML). Without it the built-in projects are used.
    #[arg(long, env = "PALAVER_PROJECTS_FILE")]
    pub projects_file: Option<PathBuf>,

    /// Requests one client (clientId) may send per project within the
    /// project's rate window, over all its sessions, for every project whose
    /// file does not set `client_rate_limit`; 0 turns it off. Without it the
    /// default is three times the project's per-session `rate_limit` (60 per
    /// 60 s as shipped; none where `rate_limit` is 0).
    #[arg(long, env = "PALAVER_CLIENT_RATE_LIMIT")]
    pub client_rate_limit: Option<u32>,

    /// How long a session lock lives if its holder dies, in milliseconds.
    #[arg(long, env = "PALAVER_LOCK_TTL_MS", default_value_t = 5000)]
    pub lock_ttl_ms: u64,

    /// How long a turn waits for a busy session lock before failing with
    /// ABORTED, in milliseconds.
    #[arg(long, env = "PALAVER_LOCK_WAIT_MS", default_value_t = 3000)]
    pub lock_wait_ms: u64,

    /// Prefix of every Redis key, to share one Redis between deployments.
    #[arg(long, env = "PALAVER_KEY_PREFIX", default_value = "palaver")]
    pub key_prefix: String,

    #[command(flatten)]
    pub balance: BalanceArgs,

    /// TLS towards inference-svc (an https:// --inference-url).
    #[command(flatten)]
    pub inference_tls: ClientTlsArgs,

    /// The bearer token sent to inference-svc.
    #[command(flatten)]
    pub inference_auth: ClientAuthArgs,
}

impl SessionArgs {
    /// Loads the projects file and builds the service configuration.
    pub fn config(&self) -> Result<Config, palaver_core::projects::ProjectsError> {
        let mut projects = Projects::load(self.projects_file.as_deref())?;
        if let Some(limit) = self.client_rate_limit {
            projects.default_client_rate_limit(limit);
        }
        Ok(Config {
            projects,
            inference_url: self.inference_url.clone(),
            inference_tls: self.inference_tls.clone(),
            inference_token: Bearer::none(),
            lock: LockConfig {
                ttl: Duration::from_millis(self.lock_ttl_ms.max(1)),
                wait: Duration::from_millis(self.lock_wait_ms),
            },
            balance: self.balance.config(),
        })
    }
}

/// What a session-svc instance needs besides its store.
#[derive(Debug, Clone)]
pub struct Config {
    /// Prompts, limits and sampling defaults per project.
    pub projects: Projects,
    /// inference-svc's gRPC address, e.g. `http://127.0.0.1:50052`, a
    /// comma-separated list, or `dns://host:port`.
    pub inference_url: String,
    /// CA and client certificate for an https:// `inference_url`.
    pub inference_tls: ClientTlsArgs,
    /// The token sent to inference-svc.
    pub inference_token: Bearer,
    /// Lock TTL and wait.
    pub lock: LockConfig,
    /// How the inference replicas are watched.
    pub balance: BalanceConfig,
}

impl Config {
    /// The built-in projects and default lock timing, talking to `inference_url`.
    pub fn new(inference_url: impl Into<String>) -> Self {
        Self {
            projects: Projects::builtin(),
            inference_url: inference_url.into(),
            inference_tls: ClientTlsArgs::default(),
            inference_token: Bearer::none(),
            lock: LockConfig::default(),
            balance: BalanceConfig::default(),
        }
    }
}

/// Where the binary listens.
#[derive(Debug, Clone, clap::Args)]
pub struct ListenArgs {
    /// gRPC listen address. Loopback by default: reaching session-svc means
    /// reading and rewriting every conversation, so opening it is a choice.
    #[arg(
        long,
        env = "PALAVER_SESSION_LISTEN",
        default_value = "127.0.0.1:50051"
    )]
    pub listen: SocketAddr,

    /// Prometheus /metrics listen address (off when not given).
    #[arg(long, env = "PALAVER_SESSION_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// gRPC server TLS.
    #[command(flatten)]
    pub tls: ServerTlsArgs,

    /// gRPC bearer tokens.
    #[command(flatten)]
    pub auth: ServerAuthArgs,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: SessionArgs,
    }

    fn client_limit(argv: &[&str]) -> u32 {
        let mut full = vec!["session-svc"];
        full.extend_from_slice(argv);
        let config = Cli::try_parse_from(full).unwrap().args.config().unwrap();
        config.projects.get("general").unwrap().client_rate_limit()
    }

    #[test]
    fn the_client_limit_flag_sets_the_default_of_every_project() {
        assert_eq!(client_limit(&[]), 60, "3 x the per-session 20");
        assert_eq!(client_limit(&["--client-rate-limit", "5"]), 5);
        assert_eq!(client_limit(&["--client-rate-limit", "0"]), 0);
    }
}
