//! `palaver fake-vllm`: the test suite's fake vLLM as a process of its own,
//! so benchmarks go through a real HTTP hop whose latency is known.
//!
//! It is `palaver_testkit::fake_vllm` unchanged: the OpenAI-compatible
//! `POST /v1/chat/completions` (streamed SSE in vLLM's exact shapes, or one
//! JSON body when `stream` is false), `GET /v1/models` and `GET /health`.
//! A reply is `reply to: <last user message>` padded with filler words up
//! to `--tokens` words; the first word comes after `--ttft`, each further
//! one `--tpot` later. No model runs, so its CPU use is small and constant.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use palaver_testkit::fake_vllm::{FakeVllm, FakeVllmConfig, Reply};
use tokio::net::{TcpListener, TcpSocket};

/// The start of the line printed once the fake listens, for scripts:
/// `fake-vllm ready url=http://IP:PORT`.
pub const READY_PREFIX: &str = "fake-vllm ready";

/// Flags of `palaver fake-vllm`.
#[derive(Debug, Clone, clap::Args)]
pub struct FakeVllmArgs {
    /// Address to listen on; port 0 picks a free one (printed).
    #[arg(long, default_value = "127.0.0.1:8000")]
    pub listen: SocketAddr,

    /// Time to first token, in milliseconds (fractions allowed).
    #[arg(long, default_value_t = 20.0, value_parser = parse_millis)]
    pub ttft: f64,

    /// Time per further token, in milliseconds (fractions allowed).
    #[arg(long, default_value_t = 5.0, value_parser = parse_millis)]
    pub tpot: f64,

    /// Words in each reply (the echo of the message counts; at least that).
    #[arg(long, default_value_t = 16)]
    pub tokens: usize,

    /// Prefill time per prompt token (word) this server has not seen
    /// before, in microseconds: a prefix cache, so that time to first token
    /// grows with the part of a conversation new to this server. 0 = off.
    #[arg(long, env = "PALAVER_FAKE_PREFILL_US_PER_TOKEN", default_value_t = 0)]
    pub prefill_us_per_token: u64,

    /// The served model name; requests naming another get vLLM's 404.
    #[arg(long, default_value = "fake-model")]
    pub model: String,
}

pub fn parse_millis(s: &str) -> Result<f64, String> {
    let ms: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number of milliseconds"))?;
    if !(0.0..=3_600_000.0).contains(&ms) {
        return Err(format!("{s:?} must be within 0..=3600000 ms"));
    }
    Ok(ms)
}

impl FakeVllmArgs {
    /// The testkit configuration these flags describe.
    pub fn config(&self) -> FakeVllmConfig {
        FakeVllmConfig {
            model: self.model.clone(),
            ttft: Duration::from_secs_f64(self.ttft / 1000.0),
            tpot: Duration::from_secs_f64(self.tpot / 1000.0),
            tokens: self.tokens,
            reply: Reply::Echo,
            strict_roles: true,
            prefill_per_token: Duration::from_micros(self.prefill_us_per_token),
        }
    }
}

/// Binds `addr` with TCP_NODELAY on the listening socket, which Linux
/// passes on to every accepted connection. The testkit's server takes a
/// plain listener and leaves Nagle on; an SSE reply is many small writes,
/// and Nagle holding each one until the previous is acknowledged (while the
/// client delays its ACKs) would add tens of milliseconds that no real
/// server adds: vLLM's uvicorn disables Nagle too.
fn bind_nodelay(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Serves until SIGINT/SIGTERM.
pub async fn run(args: FakeVllmArgs) -> ExitCode {
    let listener = match bind_nodelay(args.listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "palaver fake-vllm: cannot listen on {}: {e} (pick another --listen port, or 0 for any free one)",
                args.listen
            );
            return ExitCode::FAILURE;
        }
    };
    let addr = match listener.local_addr() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("palaver fake-vllm: {e}");
            return ExitCode::FAILURE;
        }
    };
    let stop = palaver_core::shutdown::on_signal();
    println!(
        "fake vLLM (model {:?}): {} ms to first token, {} ms per further token, {} words per reply",
        args.model, args.ttft, args.tpot, args.tokens
    );
    println!("{READY_PREFIX} url=http://{addr}");
    match FakeVllm::serve(listener, args.config(), stop).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("palaver fake-vllm: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn millis_accept_fractions_and_refuse_nonsense() {
        assert_eq!(parse_millis("100").unwrap(), 100.0);
        assert_eq!(parse_millis("0.5").unwrap(), 0.5);
        assert!(parse_millis("-1").is_err());
        assert!(parse_millis("NaN").is_err());
        assert!(parse_millis("10ms").is_err());
    }

    #[test]
    fn flags_become_the_testkit_config() {
        let args = FakeVllmArgs {
            listen: "127.0.0.1:0".parse().unwrap(),
            ttft: 100.0,
            tpot: 0.25,
            tokens: 8,
            prefill_us_per_token: 150,
            model: "m".into(),
        };
        let c = args.config();
        assert_eq!(c.prefill_per_token, Duration::from_micros(150));
        assert_eq!(c.ttft, Duration::from_millis(100));
        assert_eq!(c.tpot, Duration::from_micros(250));
        assert_eq!((c.tokens, c.model.as_str()), (8, "m"));
    }
}
