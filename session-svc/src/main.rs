//! session-svc: parses flags, opens the store, serves.

use std::net::SocketAddr;

use anyhow::Context;
use clap::Parser;
use palaver_core::{shutdown, telemetry};
use prometheus_client::registry::Registry;
use session_svc::keys::KeySpace;
use session_svc::{Config, ListenArgs, MemoryStore, RedisStore, Server, SessionArgs, Store};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// palaver's session service: dialogs in Redis under short per-session locks.
#[derive(Debug, Parser)]
#[command(name = "session-svc", version, about)]
struct Cli {
    #[command(flatten)]
    runtime: palaver_core::runtime::RuntimeArgs,

    #[command(flatten)]
    listen: ListenArgs,
    #[command(flatten)]
    session: SessionArgs,
    /// Trace export (OTLP); off by default.
    #[command(flatten)]
    otlp: telemetry::OtlpArgs,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = cli.runtime.clone();
    runtime.run(run(cli))?
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let traces = telemetry::init(&cli.otlp, &[session_svc::TRACED], "info")?;
    palaver_core::tls::install_provider();
    let mut config = cli.session.config()?;
    config.inference_token = cli.session.inference_auth.bearer()?;
    let security = session_svc::Security {
        tls: cli.listen.tls.server_config()?,
        auth: cli.listen.auth.layer(
            session_svc::CHAT_METHODS,
            Some(cli.listen.listen),
            "session-svc",
        )?,
    };
    let stop = shutdown::on_signal();
    let listener = TcpListener::bind(cli.listen.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cli.listen.listen))?;
    tracing::info!(addr = %listener.local_addr()?, "session-svc listening");

    match &cli.session.redis_url {
        Some(url) => {
            let store = RedisStore::connect_tls(
                url,
                KeySpace::new(&cli.session.key_prefix),
                cli.session.redis_ca_file.as_deref(),
            )
            .await
            // The url may carry a password: name only its host.
            .with_context(|| format!("cannot reach Redis at {}", redact_url(url)))?;
            serve(
                config,
                store,
                security,
                cli.listen.metrics_listen,
                listener,
                stop,
            )
            .await?;
        }
        None => {
            tracing::warn!("no --redis-url: dialogs are kept in memory and lost on restart");
            serve(
                config,
                MemoryStore::new(),
                security,
                cli.listen.metrics_listen,
                listener,
                stop,
            )
            .await?;
        }
    }
    tracing::info!("session-svc stopped");
    if let Some(t) = traces {
        t.shutdown().await;
    }
    Ok(())
}

/// The rest of `main`, once per store type (the server is generic over it).
async fn serve<S: Store>(
    config: Config,
    store: S,
    security: session_svc::Security,
    metrics_listen: Option<SocketAddr>,
    listener: TcpListener,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let mut registry = Registry::default();
    let server = Server::new(config, store, &mut registry)?;
    telemetry::serve_metrics_flag(metrics_listen, registry, stop.clone()).await?;
    server.serve_secured(listener, security, stop).await?;
    Ok(())
}

/// `url` without its user info, for messages.
fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}
