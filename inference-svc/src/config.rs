//! Configuration: the command line / environment ([`InferenceArgs`]) and the
//! plain [`Config`] the library runs on, which tests build directly.

use std::path::PathBuf;
use std::time::Duration;

use crate::error::InferenceError;

/// More slots than any server could use: a typo, not a setting.
const MAX_SLOTS: usize = 100_000;

/// Which backend generates text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendChoice {
    /// An OpenAI-compatible server (vLLM, llama.cpp server, Ollama).
    Openai,
    /// The built-in simulator, for machines without a GPU.
    Sim,
}

/// Command-line flags of inference-svc; every flag also reads an environment
/// variable so containers need no command line.
#[derive(Debug, Clone, clap::Args)]
pub struct InferenceArgs {
    /// Backend to generate with [default: openai when --vllm-url is given, else sim].
    #[arg(long, env = "PALAVER_INFERENCE_BACKEND", value_enum)]
    pub backend: Option<BackendChoice>,

    /// Base URL of the OpenAI-compatible server, e.g. http://vllm:8000 or
    /// http://vllm:8000/v1; https:// connects over TLS (see --vllm-ca-file).
    #[arg(long, env = "PALAVER_INFERENCE_VLLM_URL")]
    pub vllm_url: Option<String>,

    /// CA certificate(s) (PEM) that an https:// model server must chain to
    /// [default: the system's roots].
    #[arg(long, env = "PALAVER_INFERENCE_VLLM_CA_FILE")]
    pub vllm_ca_file: Option<PathBuf>,

    /// Largest max_tokens a Generate call may ask for; above it the call is
    /// refused (INVALID_ARGUMENT) rather than holding a slot for ever.
    #[arg(
        long,
        env = "PALAVER_INFERENCE_MAX_TOKENS_LIMIT",
        default_value_t = 8192
    )]
    pub max_tokens_limit: u32,

    /// Model name to request [default: the first one listed by GET /v1/models].
    #[arg(long, env = "PALAVER_INFERENCE_MODEL")]
    pub model: Option<String>,

    /// API key sent as `Authorization: Bearer` (vLLM's --api-key). Prefer the
    /// environment variable: a flag is visible to anyone running `ps`.
    #[arg(long, env = "PALAVER_INFERENCE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// File holding the model server's API key (surrounding whitespace ignored).
    #[arg(
        long,
        env = "PALAVER_INFERENCE_API_KEY_FILE",
        conflicts_with = "api_key"
    )]
    pub api_key_file: Option<PathBuf>,

    /// Generations running at once; the GPU's batch stays this small.
    #[arg(long, env = "PALAVER_INFERENCE_MAX_CONCURRENT", default_value_t = 8)]
    pub max_concurrent: usize,

    /// Callers allowed to wait for a slot; beyond that a call fails at once.
    #[arg(long, env = "PALAVER_INFERENCE_MAX_QUEUE", default_value_t = 256)]
    pub max_queue: usize,

    /// Longest wait for a slot, in milliseconds.
    #[arg(
        long,
        env = "PALAVER_INFERENCE_QUEUE_TIMEOUT_MS",
        default_value_t = 30_000
    )]
    pub queue_timeout_ms: u64,

    /// Give a freed slot to the waiting client running the fewest
    /// generations (ties: the longest waiting), so that one client with many
    /// sessions cannot take every slot; `false` serves waiters in arrival
    /// order. A client is the request's `client` (the MQTT clientId); all
    /// anonymous callers share one.
    #[arg(
        long,
        env = "PALAVER_INFERENCE_FAIR_SHARE",
        default_value_t = true,
        action = clap::ArgAction::Set
    )]
    pub fair_share: bool,

    /// Longest wait for the first token after sending a request, in milliseconds.
    #[arg(
        long,
        env = "PALAVER_INFERENCE_FIRST_TOKEN_TIMEOUT_MS",
        default_value_t = 60_000
    )]
    pub first_token_timeout_ms: u64,

    /// Longest silence between two chunks of a reply, in milliseconds.
    #[arg(
        long,
        env = "PALAVER_INFERENCE_IDLE_TIMEOUT_MS",
        default_value_t = 30_000
    )]
    pub idle_timeout_ms: u64,

    /// Longest whole generation, in milliseconds; longer for a long max_tokens
    /// (see --min-tokens-per-sec).
    #[arg(
        long,
        env = "PALAVER_INFERENCE_REQUEST_TIMEOUT_MS",
        default_value_t = 300_000
    )]
    pub request_timeout_ms: u64,

    /// Slowest pace a reply is allowed after its first token, in tokens per second:
    /// a reply may take the first-token timeout plus max_tokens / this, when that
    /// is longer than --request-timeout-ms.
    #[arg(
        long,
        env = "PALAVER_INFERENCE_MIN_TOKENS_PER_SEC",
        default_value_t = 5.0
    )]
    pub min_tokens_per_sec: f64,

    /// Simulator: time to first token, in milliseconds.
    #[arg(long, env = "PALAVER_INFERENCE_SIM_TTFT_MS", default_value_t = 200)]
    pub sim_ttft_ms: u64,

    /// Simulator: words per second after the first (0 = as fast as possible).
    #[arg(
        long,
        env = "PALAVER_INFERENCE_SIM_TOKENS_PER_SEC",
        default_value_t = 50.0
    )]
    pub sim_tokens_per_sec: f64,

    /// Remove `<think>…</think>` reasoning from replies (`--strip-think false` keeps it).
    #[arg(
        long,
        env = "PALAVER_INFERENCE_STRIP_THINK",
        default_value_t = true,
        action = clap::ArgAction::Set
    )]
    pub strip_think: bool,

    /// The model's chat template opens `<think>` in the prompt (DeepSeek-R1, QwQ), so a
    /// reply is reasoning until `</think>`; it is held back until then.
    #[arg(long, env = "PALAVER_INFERENCE_THINK_STARTS_OPEN")]
    pub think_starts_open: bool,

    /// How often the model server's `GET /health` is checked, in
    /// milliseconds. While it fails, this service's gRPC health reports
    /// `palaver.inference.v1.Inference` NOT_SERVING, so that session-svc
    /// sends the sessions to other replicas (the simulator is always healthy).
    #[arg(
        long,
        env = "PALAVER_INFERENCE_MODEL_HEALTH_INTERVAL_MS",
        default_value_t = 2000
    )]
    pub model_health_interval_ms: u64,
}

impl InferenceArgs {
    /// Checks the flags and turns them into a [`Config`].
    pub fn into_config(self) -> Result<Config, InferenceError> {
        let backend = match (self.backend, self.vllm_url) {
            (Some(BackendChoice::Sim), _) | (None, None) => BackendKind::Sim,
            (Some(BackendChoice::Openai) | None, Some(url)) => BackendKind::OpenAi { url },
            (Some(BackendChoice::Openai), None) => {
                return Err(InferenceError::Config(
                    "--backend openai needs --vllm-url".into(),
                ))
            }
        };
        let api_key = match (self.api_key, &self.api_key_file) {
            (Some(key), _) => Some(key),
            (None, Some(path)) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| {
                        InferenceError::Config(format!("cannot read {}: {e}", path.display()))
                    })?
                    .trim()
                    .to_owned(),
            ),
            (None, None) => None,
        };
        let config = Config {
            backend,
            model: self.model.filter(|m| !m.trim().is_empty()),
            api_key: api_key.filter(|k| !k.is_empty()),
            vllm_ca_file: self.vllm_ca_file,
            max_tokens_limit: self.max_tokens_limit,
            max_concurrent: self.max_concurrent,
            max_queue: self.max_queue,
            queue_timeout: Duration::from_millis(self.queue_timeout_ms),
            fair_share: self.fair_share,
            first_token_timeout: Duration::from_millis(self.first_token_timeout_ms),
            idle_timeout: Duration::from_millis(self.idle_timeout_ms),
            request_timeout: Duration::from_millis(self.request_timeout_ms),
            min_tokens_per_sec: self.min_tokens_per_sec,
            sim_ttft: Duration::from_millis(self.sim_ttft_ms),
            sim_tokens_per_sec: self.sim_tokens_per_sec,
            strip_think: self.strip_think,
            think_starts_open: self.think_starts_open,
            model_health_interval: Duration::from_millis(self.model_health_interval_ms.max(1)),
        };
        config.validate()?;
        Ok(config)
    }
}

/// Where generations go.
#[derive(Debug, Clone, PartialEq)]
pub enum BackendKind {
    /// An OpenAI-compatible HTTP server at `url` (with or without `/v1`).
    OpenAi {
        /// Base URL, e.g. `http://127.0.0.1:8000`.
        url: String,
    },
    /// The built-in simulator.
    Sim,
}

/// Everything inference-svc needs at run time; fields are public so tests
/// can shorten timeouts.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The backend that generates text.
    pub backend: BackendKind,
    /// Model to request; `None` asks the server (`GET /v1/models`) once.
    pub model: Option<String>,
    /// Bearer token for the model server, if it wants one.
    pub api_key: Option<String>,
    /// CA file for an https:// model server (else the system's roots).
    pub vllm_ca_file: Option<PathBuf>,
    /// Largest max_tokens a request may ask for.
    pub max_tokens_limit: u32,
    /// Generations running at once (the slots).
    pub max_concurrent: usize,
    /// Callers allowed to wait for a slot before calls are refused.
    pub max_queue: usize,
    /// Longest wait for a slot.
    pub queue_timeout: Duration,
    /// A freed slot goes to the waiting client running the fewest
    /// generations (else to the longest waiting caller).
    pub fair_share: bool,
    /// Longest wait from sending a request to its first streamed event.
    pub first_token_timeout: Duration,
    /// Longest silence between two streamed chunks.
    pub idle_timeout: Duration,
    /// Longest whole generation, retries included, unless `max_tokens` at
    /// `min_tokens_per_sec` needs longer.
    pub request_timeout: Duration,
    /// Slowest pace allowed after the first token, in tokens per second.
    pub min_tokens_per_sec: f64,
    /// Simulator: time to first token.
    pub sim_ttft: Duration,
    /// Simulator: words per second (0 or less: no pacing).
    pub sim_tokens_per_sec: f64,
    /// Remove `<think>…</think>` blocks from replies.
    pub strip_think: bool,
    /// Replies start inside a think block whose opening tag was in the prompt.
    pub think_starts_open: bool,
    /// How often the model server's health is checked.
    pub model_health_interval: Duration,
}

impl Config {
    /// The simulator with the command line's defaults.
    pub fn sim() -> Self {
        Self {
            backend: BackendKind::Sim,
            model: None,
            api_key: None,
            vllm_ca_file: None,
            max_tokens_limit: 8192,
            max_concurrent: 8,
            max_queue: 256,
            queue_timeout: Duration::from_secs(30),
            fair_share: true,
            first_token_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(300),
            min_tokens_per_sec: 5.0,
            sim_ttft: Duration::from_millis(200),
            sim_tokens_per_sec: 50.0,
            strip_think: true,
            think_starts_open: false,
            model_health_interval: Duration::from_secs(2),
        }
    }

    /// An OpenAI-compatible server at `url`, otherwise the defaults.
    pub fn openai(url: impl Into<String>) -> Self {
        Self {
            backend: BackendKind::OpenAi { url: url.into() },
            ..Self::sim()
        }
    }

    /// Refuses values that cannot work, so a typo fails at startup.
    pub fn validate(&self) -> Result<(), InferenceError> {
        let bad = |what: &str| Err(InferenceError::Config(what.to_string()));
        if self.max_tokens_limit == 0 {
            return bad("max_tokens_limit must be at least 1");
        }
        if self.max_concurrent == 0 || self.max_concurrent > MAX_SLOTS {
            return bad("max_concurrent must be within 1..=100000");
        }
        if self.queue_timeout.is_zero()
            || self.first_token_timeout.is_zero()
            || self.idle_timeout.is_zero()
            || self.request_timeout.is_zero()
        {
            return bad("timeouts must be above zero");
        }
        if !(self.min_tokens_per_sec.is_finite() && self.min_tokens_per_sec >= 0.01) {
            return bad("min_tokens_per_sec must be at least 0.01");
        }
        // Zero or less means no pacing; a positive pace is one token per
        // 1/tps seconds, which must be a duration.
        let tps = self.sim_tokens_per_sec;
        if tps.is_nan() || (tps > 0.0 && tps < 0.001) {
            return bad("sim_tokens_per_sec must be 0 (no pacing) or at least 0.001");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: InferenceArgs,
    }

    fn parse(argv: &[&str]) -> Result<Config, InferenceError> {
        let mut full = vec!["inference-svc"];
        full.extend_from_slice(argv);
        Cli::try_parse_from(full)
            .map_err(|e| InferenceError::Config(e.to_string()))?
            .args
            .into_config()
    }

    #[test]
    fn backend_defaults_follow_the_url() {
        assert_eq!(parse(&[]).unwrap().backend, BackendKind::Sim);
        let c = parse(&["--vllm-url", "http://h:8000/v1"]).unwrap();
        assert_eq!(
            c.backend,
            BackendKind::OpenAi {
                url: "http://h:8000/v1".into()
            }
        );
        assert_eq!(c.max_concurrent, 8);
        assert!(c.strip_think);
        let c = parse(&["--vllm-url", "http://h", "--backend", "sim"]).unwrap();
        assert_eq!(c.backend, BackendKind::Sim);
        assert!(parse(&["--backend", "openai"]).is_err());
        assert!(parse(&["--max-concurrent", "0"]).is_err());
        assert!(!parse(&["--strip-think", "false"]).unwrap().strip_think);
        assert!(parse(&[]).unwrap().fair_share);
        assert!(!parse(&["--fair-share", "false"]).unwrap().fair_share);
        assert!(parse(&["--min-tokens-per-sec", "0"]).is_err());
        assert!(parse(&["--min-tokens-per-sec", "NaN"]).is_err());
        assert!(parse(&["--sim-tokens-per-sec", "1e-20"]).is_err());
        assert!(
            parse(&["--sim-tokens-per-sec", "0"]).is_ok(),
            "0: no pacing"
        );
    }

    #[test]
    fn defaults_match_the_constructors() {
        assert_eq!(parse(&[]).unwrap(), Config::sim());
    }
}
