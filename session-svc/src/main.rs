//! session-svc: parses flags, opens the store, serves.

use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use palaver_core::{shutdown, telemetry};
use prometheus_client::registry::Registry;
use session_svc::keys::KeySpace;
use session_svc::{ListenArgs, MemoryStore, RedisStore, Server, SessionArgs};

/// palaver's session service: dialogs in Redis under short per-session locks.
#[derive(Debug, Parser)]
#[command(name = "session-svc", version, about)]
struct Cli {
    #[command(flatten)]
    listen: ListenArgs,
    #[command(flatten)]
    session: SessionArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    telemetry::init_logging();
    let cli = Cli::parse();
    let config = cli.session.config()?;
    let stop = shutdown::on_signal();
    let mut registry = Registry::default();
    let listener = tokio::net::TcpListener::bind(cli.listen.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cli.listen.listen))?;
    tracing::info!(addr = %cli.listen.listen, "session-svc listening");

    let serving = match &cli.session.redis_url {
        Some(url) => {
            let store = RedisStore::connect(url, KeySpace::new(&cli.session.key_prefix))
                .await
                .with_context(|| format!("cannot reach Redis at {url}"))?;
            let server = Server::new(config, store, &mut registry)?;
            start_metrics(&cli.listen, registry, &stop).await?;
            server.serve(listener, stop).await
        }
        None => {
            tracing::warn!("no --redis-url: dialogs are kept in memory and lost on restart");
            let server = Server::new(config, MemoryStore::new(), &mut registry)?;
            start_metrics(&cli.listen, registry, &stop).await?;
            server.serve(listener, stop).await
        }
    };
    serving?;
    tracing::info!("session-svc stopped");
    Ok(())
}

async fn start_metrics(
    listen: &ListenArgs,
    registry: Registry,
    stop: &tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    if let Some(addr) = listen.metrics_listen {
        let bound = telemetry::spawn_metrics(addr, Arc::new(registry), stop.clone())
            .await
            .with_context(|| format!("cannot serve metrics on {addr}"))?;
        tracing::info!(addr = %bound, "metrics at /metrics");
    }
    Ok(())
}
