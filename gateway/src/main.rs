//! `gateway`: serves palaver's MQTT projects. Everything but flag parsing and
//! wiring lives in the library.

use std::net::SocketAddr;

use anyhow::Context;
use clap::Parser;
use prometheus_client::registry::Registry;

/// palaver gateway: MQTT clients in, session-svc (gRPC) out.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(flatten)]
    runtime: palaver_core::runtime::RuntimeArgs,

    #[command(flatten)]
    gateway: gateway::GatewayArgs,

    /// Serve Prometheus metrics (GET /metrics) and the probes GET /healthz (the
    /// process is up) and GET /readyz (200 while every project is subscribed,
    /// else 503) on this address, e.g. 0.0.0.0:9100.
    #[arg(long, env = "PALAVER_GATEWAY_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,

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
    let traces = palaver_core::telemetry::init(&cli.otlp, &[gateway::TRACED], "info")?;
    let config = cli.gateway.into_config().context("gateway settings")?;
    let mut registry = Registry::default();
    let gateway = gateway::Gateway::new(config, &mut registry).context("gateway settings")?;
    let shutdown = palaver_core::shutdown::on_signal();
    palaver_core::telemetry::serve_metrics_flag_with_probes(
        cli.metrics_listen,
        registry,
        Some(gateway.ready_watch()),
        shutdown.clone(),
    )
    .await?;
    gateway.run(shutdown).await?;
    if let Some(t) = traces {
        t.shutdown().await;
    }
    Ok(())
}
