//! inference-svc binary: parse the configuration, bind, serve until SIGTERM.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use inference_svc::{InferenceArgs, Server};
use prometheus_client::registry::Registry;

/// gRPC Inference service: at most N generations at once in front of vLLM.
#[derive(Parser)]
#[command(name = "inference-svc", version, about)]
struct Cli {
    #[command(flatten)]
    runtime: palaver_core::runtime::RuntimeArgs,

    #[command(flatten)]
    inference: InferenceArgs,

    /// Address to serve gRPC on. Loopback by default: whoever reaches it can
    /// spend the GPU, so opening it to the network is a choice.
    #[arg(
        long,
        env = "PALAVER_INFERENCE_LISTEN",
        default_value = "127.0.0.1:50052"
    )]
    listen: SocketAddr,

    #[command(flatten)]
    tls: palaver_core::tls::ServerTlsArgs,

    #[command(flatten)]
    auth: palaver_core::auth::ServerAuthArgs,

    /// Address to serve Prometheus metrics on (GET /metrics), e.g. 0.0.0.0:9102.
    #[arg(long, env = "PALAVER_INFERENCE_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,

    /// After SIGTERM, how long running generations may finish before exit, in milliseconds.
    #[arg(
        long,
        env = "PALAVER_INFERENCE_DRAIN_TIMEOUT_MS",
        default_value_t = 25_000
    )]
    drain_timeout_ms: u64,

    /// Trace export (OTLP); off by default.
    #[command(flatten)]
    otlp: palaver_core::telemetry::OtlpArgs,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = cli.runtime.clone();
    runtime.run(run(cli))?
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let traces = palaver_core::telemetry::init(&cli.otlp, &[inference_svc::TRACED], "info")?;
    palaver_core::tls::install_provider();
    let config = cli.inference.into_config()?;
    let security = inference_svc::Security {
        tls: cli.tls.server_config()?,
        auth: cli.auth.layer(
            inference_svc::CHAT_METHODS,
            Some(cli.listen),
            "inference-svc",
        )?,
    };
    let mut registry = Registry::default();
    let server = Server::new(config, &mut registry)?;
    let shutdown = palaver_core::shutdown::on_signal();
    palaver_core::telemetry::serve_metrics_flag(cli.metrics_listen, registry, shutdown.clone())
        .await?;
    let listener = tokio::net::TcpListener::bind(cli.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cli.listen))?;
    tracing::info!(addr = %listener.local_addr()?, "inference-svc listening");
    let drain = Duration::from_millis(cli.drain_timeout_ms);
    let drain_expired = {
        let shutdown = shutdown.clone();
        async move {
            shutdown.cancelled().await;
            tokio::time::sleep(drain).await;
        }
    };
    // Generations may run for minutes; the orchestrator's grace period is
    // shorter, so stop waiting for them before it kills the process.
    tokio::select! {
        served = server.serve_secured(listener, security, shutdown) => served?,
        () = drain_expired => tracing::warn!(?drain, "generations still running after the drain timeout; exiting"),
    }
    tracing::info!("inference-svc stopped");
    if let Some(t) = traces {
        t.shutdown().await;
    }
    Ok(())
}
