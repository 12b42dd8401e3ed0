//! `palaver up`: the whole stack in one process.
//!
//! ```text
//! MQTT clients ──► embedded rumqttd (or --mqtt-broker) ──► gateway ──gRPC──► session-svc ──gRPC──► inference-svc
//!                                                                              └─ memory (or --redis-url)   └─ simulator (or --vllm-url,
//!                                                                                                              or llama-server with --model-file)
//! ```
//!
//! The services are the real libraries, talking real gRPC over loopback, so
//! `grpcurl` reaches session-svc and inference-svc on their ports. Every
//! port may be 0; the addresses actually bound are printed, with a
//! machine-readable line (see [`ready_line`]) for scripts and tests.
//!
//! Shutdown (SIGINT/SIGTERM) goes outside in: the gateway stops taking
//! messages and waits for the turns in flight, whose replies are still
//! published; then the services drain and stop; the embedded broker gets a
//! moment to deliver those last replies and ends with the process. A second
//! Ctrl-C exits at once.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use inference_svc::config::BackendChoice;
use inference_svc::{BackendKind, InferenceArgs};
use palaver_core::projects::Projects;
use palaver_core::{shutdown, telemetry};
use prometheus_client::registry::Registry;
use session_svc::keys::KeySpace;
use session_svc::{MemoryStore, RedisStore};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::broker::{self, BrokerError, BrokerSettings, EmbeddedBroker};
use crate::model_server::{ModelServer, ModelServerArgs};

/// How long the gateway may take to connect and subscribe at start.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Upper bound on the gateway's drain: its own grace period (30 s) plus
/// the time to say "offline" and disconnect.
const GATEWAY_DRAIN_LIMIT: Duration = Duration::from_secs(45);
/// How long each service may take to stop once the gateway is gone.
const SERVICE_DRAIN_LIMIT: Duration = Duration::from_secs(10);
/// Time the embedded broker keeps running after the gateway disconnected,
/// to hand the last replies (already received, in memory) to their
/// subscribers: rumqttd has no "flush" to wait for, and this takes well
/// under a millisecond on loopback.
const BROKER_LINGER: Duration = Duration::from_millis(300);
/// The start of the machine-readable line printed once everything is up.
pub const READY_PREFIX: &str = "palaver ready";
/// The MQTT port clients assume when none is given.
const DEFAULT_MQTT_PORT: u16 = 1883;
/// session-svc's port clients assume when none is given.
const DEFAULT_SESSION_PORT: u16 = 50051;

/// Flags of `palaver up`; each also reads the environment variable shown in
/// `--help` (the same names the separate services use, where they have one).
#[derive(Debug, Clone, clap::Args)]
pub struct UpArgs {
    /// Port of the embedded MQTT broker; 0 picks a free one (printed).
    #[arg(long, env = "PALAVER_MQTT_PORT", default_value_t = DEFAULT_MQTT_PORT)]
    pub mqtt_port: u16,

    /// Turn broker authentication on: MQTT clients must log in with this user
    /// name and --mqtt-password, others are refused. With --mqtt-broker: the
    /// gateway's login there.
    #[arg(long, env = "PALAVER_MQTT_USERNAME", value_name = "USER")]
    pub mqtt_username: Option<String>,

    /// Password for --mqtt-username (prefer the environment variable: flags show in `ps`).
    #[arg(
        long,
        env = "PALAVER_MQTT_PASSWORD",
        hide_env_values = true,
        value_name = "PASSWORD"
    )]
    pub mqtt_password: Option<String>,

    /// MQTT clients the embedded broker serves at once; more are refused
    /// (CONNACK "server unavailable"). The gateway has 64 connections
    /// reserved beyond these, so idle clients cannot lock it out.
    #[arg(
        long,
        env = "PALAVER_MQTT_MAX_CONNECTIONS",
        default_value_t = 1000,
        value_name = "N"
    )]
    pub mqtt_max_connections: usize,

    /// Bytes of retained messages (topics and payloads) the embedded broker
    /// keeps for later subscribers; a retained message beyond it is still
    /// delivered, but not kept. Bounds the memory clients can pin for good.
    #[arg(long, env = "PALAVER_MQTT_MAX_RETAINED_BYTES", default_value_t = 4 * 1024 * 1024, value_name = "BYTES")]
    pub mqtt_max_retained_bytes: usize,

    /// Bind sessions to broker users: `on` also reads <project>/user_input/<user>
    /// and answers that user under <project>/assistant_response/<user>/ only;
    /// `only` stops reading the shared <project>/user_input. Meant for a
    /// broker whose ACL ties <user> to the login (deploy/mosquitto/acl).
    #[arg(long, env = "PALAVER_IDENTITY_BINDING", value_enum, default_value_t = gateway::identity::IdentityBinding::Off)]
    pub identity_binding: gateway::identity::IdentityBinding,

    /// Use this broker (mqtt://host:port, e.g. a local mosquitto) instead of
    /// starting the embedded one; --mqtt-port is then ignored.
    #[arg(long, env = "PALAVER_MQTT_BROKER", value_name = "URL")]
    pub mqtt_broker: Option<String>,

    /// Keep dialogs in this Redis (redis://host:port/db) instead of in memory,
    /// where they are lost when palaver stops.
    #[arg(long, env = "PALAVER_REDIS_URL", value_name = "URL")]
    pub redis_url: Option<String>,

    /// Projects file (TOML): the MQTT projects with their prompts and limits.
    /// Default: the built-in projects (general, driving, tutor, npc).
    #[arg(
        long,
        env = "PALAVER_PROJECTS_FILE",
        alias = "projects-file",
        value_name = "FILE"
    )]
    pub projects: Option<PathBuf>,

    /// Address every listener binds. The default lets only this machine in;
    /// 0.0.0.0 opens the broker and the gRPC ports to the network.
    #[arg(
        long,
        env = "PALAVER_BIND",
        default_value = "127.0.0.1",
        value_name = "IP"
    )]
    pub bind: IpAddr,

    /// gRPC port of session-svc (grpcurl -plaintext 127.0.0.1:PORT list); 0 picks a free one.
    #[arg(long, env = "PALAVER_SESSION_PORT", default_value_t = DEFAULT_SESSION_PORT)]
    pub session_port: u16,

    /// gRPC port of inference-svc; 0 picks a free one.
    #[arg(long, env = "PALAVER_INFERENCE_PORT", default_value_t = 50052)]
    pub inference_port: u16,

    /// Serve Prometheus metrics of all services on this port (GET /metrics); off by default.
    #[arg(long, env = "PALAVER_METRICS_PORT")]
    pub metrics_port: Option<u16>,

    /// Answer with this GGUF model, run by llama.cpp's llama-server as a child
    /// of palaver (started and health-checked before MQTT is served, stopped
    /// with palaver): a real model on the CPU, no GPU needed. scripts/real-model
    /// fetches Gemma 3 270M and builds llama-server. Not with --vllm-url.
    #[arg(
        long,
        env = "PALAVER_MODEL_FILE",
        value_name = "FILE.gguf",
        conflicts_with = "vllm_url",
        help_heading = "Model (inference-svc)"
    )]
    pub model_file: Option<PathBuf>,

    /// The llama-server binary that runs --model-file (a name is looked up on PATH).
    #[arg(
        long,
        env = "PALAVER_LLAMA_SERVER",
        default_value = "llama-server",
        value_name = "PATH",
        help_heading = "Model (inference-svc)"
    )]
    pub llama_server: PathBuf,

    /// Jinja chat template for --model-file, for a GGUF that carries none
    /// (Gemma 3 270M: deploy/gemma3-chat-template.jinja); without it
    /// llama-server uses the model's own template, or ChatML [default: the model's].
    #[arg(
        long,
        env = "PALAVER_CHAT_TEMPLATE_FILE",
        value_name = "FILE",
        help_heading = "Model (inference-svc)"
    )]
    pub chat_template_file: Option<PathBuf>,

    /// llama-server's whole context in tokens (its -c), split evenly among
    /// its --max-concurrent slots: the longest conversation is this / slots.
    #[arg(
        long,
        env = "PALAVER_MODEL_CONTEXT",
        default_value_t = 8192,
        value_name = "TOKENS",
        help_heading = "Model (inference-svc)"
    )]
    pub model_context: u32,

    /// The model: the simulator unless --vllm-url or --model-file is given.
    #[command(flatten, next_help_heading = "Model (inference-svc)")]
    pub inference: InferenceArgs,

    /// Trace export (OTLP) of the three services; off by default.
    #[command(flatten, next_help_heading = "Tracing")]
    pub otlp: palaver_core::telemetry::OtlpArgs,
}

/// Where everything listens, as bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoints {
    /// Broker host as clients should dial it.
    pub mqtt_host: String,
    /// Broker port.
    pub mqtt_port: u16,
    /// session-svc's gRPC address.
    pub session: SocketAddr,
    /// inference-svc's gRPC address.
    pub inference: SocketAddr,
    /// The metrics endpoint, when on.
    pub metrics: Option<SocketAddr>,
}

/// The machine-readable line printed on stdout once the stack serves:
/// `palaver ready mqtt=HOST:PORT session=IP:PORT inference=IP:PORT metrics=IP:PORT|off`
/// (IPv6 hosts in brackets). Fields are space-separated `key=value` pairs;
/// more may be added at the end.
pub fn ready_line(e: &Endpoints) -> String {
    let metrics = e
        .metrics
        .map_or_else(|| "off".to_owned(), |a| a.to_string());
    format!(
        "{READY_PREFIX} mqtt={} session={} inference={} metrics={metrics}",
        host_port(&e.mqtt_host, e.mqtt_port),
        e.session,
        e.inference
    )
}

fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// The address to dial for a listener bound to `addr`: a wildcard bind is
/// reached through loopback.
fn reachable(addr: SocketAddr) -> SocketAddr {
    let ip = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, addr.port())
}

async fn bind(ip: IpAddr, port: u16, what: &str) -> anyhow::Result<TcpListener> {
    let addr = SocketAddr::new(ip, port);
    TcpListener::bind(addr).await.with_context(|| {
        format!(
            "cannot listen for {what} on {addr} (in use? pick another port, or 0 for any free one)"
        )
    })
}

/// The login the broker demands (embedded) or the gateway uses (external).
fn credentials(args: &UpArgs) -> anyhow::Result<Option<(String, String)>> {
    match (&args.mqtt_username, &args.mqtt_password) {
        (None, None) => Ok(None),
        (None, Some(_)) => bail!("--mqtt-password needs --mqtt-username"),
        (Some(user), None) if args.mqtt_broker.is_none() => bail!(
            "--mqtt-username {user:?} needs --mqtt-password to turn on the embedded broker's authentication"
        ),
        (Some(user), password) => {
            if user.is_empty() {
                bail!("--mqtt-username must not be empty");
            }
            Ok(Some((user.clone(), password.clone().unwrap_or_default())))
        }
    }
}

/// Starts everything, serves until SIGINT/SIGTERM, drains, and returns Ok
/// after a clean stop.
pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    let stop = shutdown::on_signal();
    exit_on_second_signal(stop.clone());
    let projects = Projects::load(args.projects.as_deref()).context("projects file")?;
    let credentials = credentials(&args)?;
    let mut inference = args.inference.clone();
    if args.model_file.is_some() {
        if inference.backend == Some(BackendChoice::Sim) {
            bail!("--model-file runs a real model: it cannot go with --backend sim");
        }
        // The backend is the model server's address, known once it runs.
        inference.backend = None;
    }
    let mut inference_config = inference.into_config().context("model settings")?;
    let mut model = match &inference_config.backend {
        BackendKind::Sim => format!(
            "simulator ({} ms to first token, {} words/s): replies are not from a language model",
            inference_config.sim_ttft.as_millis(),
            inference_config.sim_tokens_per_sec
        ),
        BackendKind::OpenAi { url } => format!("OpenAI-compatible server at {url}"),
    };

    // Bind first: a port in use fails before anything starts.
    let inference_listener = bind(args.bind, args.inference_port, "inference-svc").await?;
    let session_listener = bind(args.bind, args.session_port, "session-svc").await?;
    let inference_addr = inference_listener.local_addr()?;
    let session_addr = session_listener.local_addr()?;
    if !args.bind.is_loopback() {
        // `palaver up` runs the services without tokens: on the network,
        // anyone who reaches these ports can read or delete any dialog.
        tracing::warn!(
            %session_addr,
            %inference_addr,
            "gRPC is UNAUTHENTICATED and reachable from other hosts; run the \
             services with --auth-tokens-file for that"
        );
    }

    let services_stop = CancellationToken::new();
    let mut services = Services::new();

    if let Some(model_file) = &args.model_file {
        let server = start_model_server(&args, model_file, inference_config.max_concurrent).await?;
        inference_config.backend = BackendKind::OpenAi {
            url: server.url().to_owned(),
        };
        model = format!(
            "{} on llama-server at {} (pid {}, {} slots, {} tokens each; log {})",
            model_file.display(),
            server.url(),
            server.pid(),
            inference_config.max_concurrent,
            args.model_context / inference_config.max_concurrent.max(1) as u32,
            server.log().display()
        );
        let sd = services_stop.clone();
        services.spawn(async move { ("llama-server", server.watch(sd).await) });
    }
    let mut registry = Registry::default();

    let inference = inference_svc::Server::new(inference_config, &mut registry)
        .context("inference-svc settings")?;
    let sd = services_stop.clone();
    services.spawn(async move {
        let served = inference.serve(inference_listener, sd).await;
        ("inference-svc", served.map_err(anyhow::Error::from))
    });

    let mut session_config =
        session_svc::Config::new(format!("http://{}", reachable(inference_addr)));
    session_config.projects = projects.clone();
    let dialogs = spawn_session_svc(
        args.redis_url.as_deref(),
        session_config,
        session_listener,
        &mut registry,
        &mut services,
        services_stop.clone(),
    )
    .await?;

    // The gateway's client ids start with this, unguessable by clients:
    // the embedded broker keeps connections in reserve for it.
    let gateway_id = format!("palaver-up-{:016x}", rand::random::<u64>());
    let (embedded, mqtt_host, mqtt_port) = start_broker(&args, &credentials, &gateway_id).await?;
    let broker_desc = match (&embedded, &credentials) {
        (Some(_), Some((user, _))) => format!("embedded, login required (user {user:?})"),
        (Some(_), None) => "embedded, no login".to_owned(),
        (None, _) => "external".to_owned(),
    };

    let mut gateway_config = gateway::Config::new(
        mqtt_host.clone(),
        mqtt_port,
        format!("http://{}", reachable(session_addr)),
        projects.names().map(str::to_owned).collect(),
    );
    if embedded.is_some() {
        // rumqttd serves one protocol per listener, and its MQTT 5 side is
        // the less complete: the embedded broker speaks 3.1.1 (see broker.rs).
        gateway_config.mqtt_protocol = gateway::config::Protocol::V311;
    }
    if let Some((user, password)) = &credentials {
        gateway_config.mqtt_username = Some(user.clone());
        gateway_config.mqtt_password = Some(password.clone());
    }
    if embedded.is_some() {
        gateway_config.client_id = gateway_id;
    }
    gateway_config.identity_binding = args.identity_binding;
    let gateway =
        gateway::Gateway::new(gateway_config, &mut registry).context("gateway settings")?;
    let ready = gateway.ready();
    let mut gateway_task = tokio::spawn(gateway.run(stop.clone()));

    let mut failure = None;
    let mut gateway_done = false;
    tokio::select! {
        ready = tokio::time::timeout(READY_TIMEOUT, ready) => match ready {
            Ok(true) => {}
            Ok(false) => failure = Some(anyhow!("the gateway stopped before it was ready")),
            Err(_) => failure = Some(anyhow!(
                "the gateway could not subscribe on {} within {} s: is the broker running, and are --mqtt-username/--mqtt-password right?",
                host_port(&mqtt_host, mqtt_port),
                READY_TIMEOUT.as_secs()
            )),
        },
        _ = stop.cancelled() => {}
    }

    if failure.is_none() && !stop.is_cancelled() {
        let metrics = match args.metrics_port {
            Some(port) => Some(
                telemetry::spawn_metrics(
                    SocketAddr::new(args.bind, port),
                    Arc::new(registry),
                    services_stop.clone(),
                )
                .await
                .with_context(|| format!("cannot serve metrics on port {port}"))?,
            ),
            None => None,
        };
        let endpoints = Endpoints {
            mqtt_host: mqtt_host.clone(),
            mqtt_port,
            session: reachable(session_addr),
            inference: reachable(inference_addr),
            metrics: metrics.map(reachable),
        };
        let chat = chat_command(&args, &endpoints, &projects);
        println!(
            "{}",
            banner(&endpoints, &broker_desc, &dialogs, &model, &projects, &chat)
        );
        println!("{}", ready_line(&endpoints));

        failure = tokio::select! {
            done = &mut gateway_task => {
                gateway_done = true;
                match done {
                    Ok(Ok(())) if stop.is_cancelled() => None,
                    Ok(Ok(())) => Some(anyhow!("the gateway stopped by itself")),
                    Ok(Err(e)) => Some(anyhow::Error::from(e).context("gateway")),
                    Err(e) => Some(anyhow!("the gateway task failed: {e}")),
                }
            }
            Some(ended) = services.join_next() => Some(match ended {
                Ok((name, Ok(()))) => anyhow!("{name} stopped by itself"),
                Ok((name, Err(e))) => e.context(name),
                Err(e) => anyhow!("a service task failed: {e}"),
            }),
            _ = broker_stopped(embedded.as_ref()) => Some(anyhow!("the embedded MQTT broker stopped")),
        };
    }

    // Drain: the gateway first (it still needs the services), then the rest.
    stop.cancel();
    if !gateway_done {
        drain_gateway(gateway_task).await;
    }
    services_stop.cancel();
    drain_services(services).await;
    if embedded.is_some() {
        tokio::time::sleep(BROKER_LINGER).await;
    }
    match failure {
        Some(e) => Err(e),
        None => {
            tracing::info!("palaver stopped");
            Ok(())
        }
    }
}

/// The running services, each reporting its name and how it ended.
type Services = JoinSet<(&'static str, anyhow::Result<()>)>;

/// Starts session-svc on `listener` over Redis or memory (`Server` is
/// generic over its store, hence the two arms); returns where dialogs live.
async fn spawn_session_svc(
    redis_url: Option<&str>,
    config: session_svc::Config,
    listener: TcpListener,
    registry: &mut Registry,
    services: &mut Services,
    stop: CancellationToken,
) -> anyhow::Result<String> {
    match redis_url {
        Some(url) => {
            let store = RedisStore::connect(url, KeySpace::default())
                .await
                .with_context(|| format!("cannot reach Redis at {url}"))?;
            let server = session_svc::Server::new(config, store, registry)
                .context("session-svc settings")?;
            services.spawn(async move {
                let served = server.serve(listener, stop).await;
                ("session-svc", served.map_err(anyhow::Error::from))
            });
            Ok(format!("Redis at {url}"))
        }
        None => {
            let server = session_svc::Server::new(config, MemoryStore::new(), registry)
                .context("session-svc settings")?;
            services.spawn(async move {
                let served = server.serve(listener, stop).await;
                ("session-svc", served.map_err(anyhow::Error::from))
            });
            Ok("in memory (lost when palaver stops; --redis-url keeps them)".to_owned())
        }
    }
}

/// Starts llama-server for `--model-file`, with one slot per generation
/// inference-svc lets through.
async fn start_model_server(
    args: &UpArgs,
    model_file: &std::path::Path,
    slots: usize,
) -> anyhow::Result<ModelServer> {
    let slots = u32::try_from(slots).context("--max-concurrent is too large for llama-server")?;
    eprintln!(
        "palaver: starting llama-server with {} (the model loads in a few seconds)",
        model_file.display()
    );
    ModelServer::start(&ModelServerArgs {
        model_file: model_file.to_path_buf(),
        llama_server: args.llama_server.clone(),
        chat_template_file: args.chat_template_file.clone(),
        slots,
        context: args.model_context,
    })
    .await
    .context("cannot start the model server (--model-file)")
}

/// The embedded broker (started here) or the external one (`--mqtt-broker`),
/// with the host and port the gateway and clients dial.
async fn start_broker(
    args: &UpArgs,
    credentials: &Option<(String, String)>,
    gateway_id: &str,
) -> anyhow::Result<(Option<EmbeddedBroker>, String, u16)> {
    if let Some(url) = &args.mqtt_broker {
        let (host, port) = gateway::config::parse_mqtt_url(url)?;
        return Ok((None, host, port));
    }
    let settings = BrokerSettings {
        ip: args.bind,
        port: args.mqtt_port,
        credentials: credentials.clone(),
        max_connections: args.mqtt_max_connections,
        gateway_prefix: Some(gateway_id.to_owned()),
        max_retained_bytes: args.mqtt_max_retained_bytes,
    };
    let broker = broker::start(&settings).await.map_err(|e| match e {
        BrokerError::Bind { addr, .. } => anyhow::Error::from(e).context(format!(
            "cannot start the embedded MQTT broker; if another broker runs on {addr}, \
             use it with --mqtt-broker mqtt://{}, or choose another --mqtt-port (0: any free port)",
            reachable(addr)
        )),
        other => other.into(),
    })?;
    let addr = reachable(broker.addr());
    Ok((Some(broker), addr.ip().to_string(), addr.port()))
}

/// Waits for the gateway to answer its turns in flight and disconnect.
async fn drain_gateway(mut gateway: JoinHandle<Result<(), gateway::GatewayError>>) {
    match tokio::time::timeout(GATEWAY_DRAIN_LIMIT, &mut gateway).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "gateway stopped with an error"),
        Ok(Err(e)) => tracing::warn!(error = %e, "gateway task failed"),
        Err(_) => {
            tracing::warn!("gateway did not stop in time");
            gateway.abort();
        }
    }
}

/// Waits for the (already cancelled) services to finish their calls.
async fn drain_services(mut services: Services) {
    let drained = tokio::time::timeout(SERVICE_DRAIN_LIMIT, async {
        while let Some(ended) = services.join_next().await {
            match ended {
                Ok((name, Ok(()))) => tracing::debug!(service = name, "stopped"),
                Ok((name, Err(e))) => {
                    tracing::warn!(service = name, error = %e, "stopped with an error")
                }
                Err(e) => tracing::warn!(error = %e, "a service task failed"),
            }
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!("services did not stop in time");
    }
}

/// Resolves if the embedded broker's listener ends; never without one.
async fn broker_stopped(broker: Option<&EmbeddedBroker>) {
    let Some(broker) = broker else {
        return std::future::pending().await;
    };
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    while broker.is_running() {
        tick.tick().await;
    }
}

/// After the first signal started the drain, a second one ends the process
/// at once (exit code 130, as a shell reports Ctrl-C).
fn exit_on_second_signal(stop: CancellationToken) {
    tokio::spawn(async move {
        stop.cancelled().await;
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("palaver: second interrupt, exiting without waiting for turns in flight");
            std::process::exit(130);
        }
    });
}

/// What a person reads when the stack is up.
fn banner(
    e: &Endpoints,
    broker: &str,
    dialogs: &str,
    model: &str,
    projects: &Projects,
    chat: &str,
) -> String {
    let names: Vec<&str> = projects.names().collect();
    let metrics = e.metrics.map_or_else(
        || "off (--metrics-port)".to_owned(),
        |a| format!("http://{a}/metrics"),
    );
    format!(
        "palaver is up.\n\
         \x20 MQTT broker    mqtt://{mqtt} ({broker})\n\
         \x20 session-svc    {session} (gRPC; try: grpcurl -plaintext {session} list)\n\
         \x20 inference-svc  {inference} (gRPC)\n\
         \x20 metrics        {metrics}\n\
         \x20 dialogs        {dialogs}\n\
         \x20 model          {model}\n\
         \x20 projects       {projects}\n\
         \n\
         Chat with it from another terminal:\n\
         \x20 {chat}\n\
         \n\
         Press Ctrl-C to stop (turns in flight are answered first).",
        mqtt = host_port(&e.mqtt_host, e.mqtt_port),
        session = e.session,
        inference = e.inference,
        projects = names.join(", "),
    )
}

/// A command that chats with this stack, to copy and paste.
fn chat_command(args: &UpArgs, e: &Endpoints, projects: &Projects) -> String {
    let mut words = vec![program(), "chat".to_owned(), "--project".to_owned()];
    let project = if projects.get("general").is_some() {
        "general"
    } else {
        projects.names().next().unwrap_or("general")
    };
    words.push(project.to_owned());
    if args.mqtt_broker.is_some() || e.mqtt_host != "127.0.0.1" {
        words.push("--mqtt-url".to_owned());
        words.push(format!("mqtt://{}", host_port(&e.mqtt_host, e.mqtt_port)));
    } else if e.mqtt_port != DEFAULT_MQTT_PORT {
        words.push("--port".to_owned());
        words.push(e.mqtt_port.to_string());
    }
    if let Some(user) = &args.mqtt_username {
        words.push("--username".to_owned());
        words.push(user.clone());
        // The client reads the same variable; only a flag must be repeated.
        if std::env::var_os("PALAVER_MQTT_PASSWORD").is_none() {
            words.push("--password".to_owned());
            words.push("<password>".to_owned());
        }
    }
    if e.session != SocketAddr::from((Ipv4Addr::LOCALHOST, DEFAULT_SESSION_PORT)) {
        words.push("--session-url".to_owned());
        words.push(format!("http://{}", e.session));
    }
    words
        .iter()
        .map(|w| shell_word(w))
        .collect::<Vec<_>>()
        .join(" ")
}

/// How to invoke this program again: its name when it was found on PATH,
/// else its full path (e.g. `target/debug/palaver` under `cargo run`).
fn program() -> String {
    let argv0 = std::env::args().next().unwrap_or_default();
    if !argv0.is_empty() && !argv0.contains('/') {
        return argv0;
    }
    std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "palaver".to_owned())
}

/// `word` quoted for a POSIX shell when it needs it.
fn shell_word(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=@,+%".contains(c));
    if plain || word == "<password>" {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_line_format() {
        let e = Endpoints {
            mqtt_host: "127.0.0.1".into(),
            mqtt_port: 1883,
            session: "127.0.0.1:50051".parse().unwrap(),
            inference: "127.0.0.1:50052".parse().unwrap(),
            metrics: None,
        };
        assert_eq!(
            ready_line(&e),
            "palaver ready mqtt=127.0.0.1:1883 session=127.0.0.1:50051 inference=127.0.0.1:50052 metrics=off"
        );
        let v6 = Endpoints {
            mqtt_host: "::1".into(),
            metrics: Some("[::1]:9100".parse().unwrap()),
            ..e
        };
        assert!(ready_line(&v6).contains("mqtt=[::1]:1883"));
        assert!(ready_line(&v6).ends_with("metrics=[::1]:9100"));
    }

    #[test]
    fn wildcard_binds_are_dialled_on_loopback() {
        let any: SocketAddr = "0.0.0.0:5".parse().unwrap();
        assert_eq!(reachable(any), "127.0.0.1:5".parse().unwrap());
        let any6: SocketAddr = "[::]:5".parse().unwrap();
        assert_eq!(reachable(any6), "[::1]:5".parse().unwrap());
        let lan: SocketAddr = "192.168.1.2:5".parse().unwrap();
        assert_eq!(reachable(lan), lan);
    }

    #[test]
    fn shell_words() {
        assert_eq!(shell_word("--port"), "--port");
        assert_eq!(shell_word("/usr/bin/palaver"), "/usr/bin/palaver");
        assert_eq!(shell_word("my dir/palaver"), "'my dir/palaver'");
        assert_eq!(shell_word("it's"), r"'it'\''s'");
        assert_eq!(shell_word(""), "''");
    }
}
