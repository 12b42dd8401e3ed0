//! Gateway settings: the command line (with `PALAVER_*` environment
//! fallbacks) and the plain [`Config`] the library runs on.
//!
//! `main` parses [`GatewayArgs`] once; tests build a [`Config`] directly with
//! [`Config::new`] and change the public fields they care about.

use std::path::PathBuf;
use std::time::Duration;

use std::sync::Arc;

use palaver_core::auth::{AuthError, Bearer, ClientAuthArgs};
use palaver_core::projects::{Projects, ProjectsError};
use palaver_core::tls::{ClientIdentity, ClientTlsArgs, TlsError};

use crate::control_rate::ControlLimits;
use crate::identity::IdentityBinding;
pub use crate::mqtt::Protocol;

/// Why the settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// `--mqtt-url` is not `mqtt://host[:port]`.
    #[error("invalid --mqtt-url {url:?}: {why}")]
    MqttUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The projects file could not be read or parsed.
    #[error(transparent)]
    Projects(#[from] ProjectsError),
    /// `--project` names a project the projects file does not have.
    #[error("--project {0:?} is not in the projects file")]
    UnknownProject(String),
    /// A TLS file is unusable or a TLS setting contradicts the URL.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The session-svc token cannot be read.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// Any other out-of-range or inconsistent setting.
    #[error("invalid setting: {0}")]
    Invalid(String),
}

/// Command-line flags of the gateway; flatten into `main`'s parser.
// The field docs are `--help` text, where `<project>` reads as a placeholder,
// not as HTML.
#[allow(rustdoc::invalid_html_tags)]
#[derive(Debug, Clone, clap::Args)]
pub struct GatewayArgs {
    /// MQTT broker to serve, as mqtt://host:port (plain TCP; tcp:// also
    /// accepted) or mqtts://host:port (TLS, port 8883 by default; ssl:// also accepted).
    #[arg(
        long,
        env = "PALAVER_MQTT_URL",
        default_value = "mqtt://127.0.0.1:1883"
    )]
    pub mqtt_url: String,

    /// MQTT version spoken to the broker: 5 (Response Topic, Correlation
    /// Data, error kinds and expiry on replies) or 3.1.1 (for a broker
    /// without 5). Clients of either version are served the same way.
    #[arg(long, env = "PALAVER_MQTT_PROTOCOL", value_enum, default_value = "5")]
    pub mqtt_protocol: Protocol,

    /// User name for the broker, if it requires one.
    #[arg(long, env = "PALAVER_MQTT_USERNAME")]
    pub mqtt_username: Option<String>,

    /// Password for the broker. Prefer the environment variable or
    /// --mqtt-password-file: a flag is visible to anyone running `ps`.
    #[arg(long, env = "PALAVER_MQTT_PASSWORD", hide_env_values = true)]
    pub mqtt_password: Option<String>,

    /// File holding the broker password (one line).
    #[arg(
        long,
        env = "PALAVER_MQTT_PASSWORD_FILE",
        conflicts_with = "mqtt_password"
    )]
    pub mqtt_password_file: Option<PathBuf>,

    /// CA certificate(s) (PEM) that an mqtts:// broker must chain to
    /// [default: the system's roots].
    #[arg(long, env = "PALAVER_MQTT_CA_FILE")]
    pub mqtt_ca_file: Option<PathBuf>,

    /// Client certificate (PEM) for mutual TLS with the broker.
    #[arg(long, env = "PALAVER_MQTT_CLIENT_CERT_FILE")]
    pub mqtt_client_cert_file: Option<PathBuf>,

    /// Private key (PEM) of --mqtt-client-cert-file.
    #[arg(long, env = "PALAVER_MQTT_CLIENT_KEY_FILE")]
    pub mqtt_client_key_file: Option<PathBuf>,

    /// TLS towards session-svc (an https:// --session-url).
    #[command(flatten)]
    pub session_tls: ClientTlsArgs,

    /// The bearer token sent to session-svc.
    #[command(flatten)]
    pub session_auth: ClientAuthArgs,

    /// MQTT client id prefix; each project's connection uses <client-id>-<project>.
    /// The gateways of one deployment share it: with the consumer lease, the
    /// broker keeps one persistent session per project for whichever of them
    /// holds the lease. Deployments sharing a broker need different ids.
    #[arg(long, env = "PALAVER_CLIENT_ID", default_value = "palaver-gateway")]
    pub client_id: String,

    /// TTL of the lease that lets one gateway at a time consume a project, in
    /// milliseconds; the others stand by and take over within about this long
    /// when it dies (at once when it drains). The lease is held through
    /// session-svc. 0 turns it off: every gateway consumes every message, so
    /// run only one (or use --shared-group, which does not keep a session's
    /// order).
    #[arg(long, env = "PALAVER_CONSUMER_LEASE_MS", default_value_t = 10_000)]
    pub consumer_lease_ms: u64,

    /// Projects file (TOML) listing the projects to serve. Default: the built-in projects.
    #[arg(long, env = "PALAVER_PROJECTS_FILE")]
    pub projects_file: Option<PathBuf>,

    /// Serve only this project (repeatable, or comma-separated in the environment).
    /// Default: every project of the projects file.
    #[arg(
        long = "project",
        value_name = "NAME",
        env = "PALAVER_PROJECTS",
        value_delimiter = ','
    )]
    pub projects: Vec<String>,

    /// Subscribe to requests through $share/<name>/... so that several gateways
    /// split the load instead of all answering every message. A session's
    /// messages may then be stored out of order: the consumer lease (the
    /// default, and off with this) is the way to run several gateways.
    #[arg(long, value_name = "NAME", env = "PALAVER_SHARED_GROUP")]
    pub shared_group: Option<String>,

    /// session-svc's gRPC address.
    #[arg(
        long,
        env = "PALAVER_SESSION_URL",
        default_value = "http://127.0.0.1:50051"
    )]
    pub session_url: String,

    /// Deadline of one turn (gRPC call to session-svc), in milliseconds.
    #[arg(long, env = "PALAVER_REQUEST_TIMEOUT_MS", default_value_t = 120_000)]
    pub request_timeout_ms: u64,

    /// Requests in progress (across all projects) before new ones are answered
    /// with "Server is overloaded".
    #[arg(long, env = "PALAVER_MAX_PENDING", default_value_t = 1000)]
    pub max_pending: usize,

    /// Largest request payload read, in bytes; larger ones are dropped.
    #[arg(long, env = "PALAVER_MAX_PAYLOAD_BYTES", default_value_t = 262_144)]
    pub max_payload_bytes: usize,

    /// Largest MQTT packet taken from the broker (payload, topic and header), in
    /// bytes. Between --max-payload-bytes and this a message is read and dropped;
    /// past it, under MQTT 5 the broker drops it (it is told this limit), and
    /// under 3.1.1 the MQTT client gives up the project's connection and
    /// reconnects, losing the replies in flight. Keep the broker's
    /// message_size_limit (a payload limit) 1 KiB or more below it.
    #[arg(long, env = "PALAVER_MAX_PACKET_BYTES", default_value_t = 16_777_216)]
    pub max_packet_bytes: usize,

    /// QoS of replies, hints and error replies (0, 1 or 2).
    #[arg(long, env = "PALAVER_REPLY_QOS", default_value_t = 1,
          value_parser = clap::value_parser!(u8).range(0..=2))]
    pub reply_qos: u8,

    /// Message expiry of replies, error replies and stream pieces, in
    /// seconds (MQTT 5): a client that left does not find stale answers
    /// queued when it comes back. 0: replies never expire.
    #[arg(long, env = "PALAVER_REPLY_EXPIRY_SECS", default_value_t = 300)]
    pub reply_expiry_secs: u32,

    /// Seconds between presence heartbeats on <project>/status.
    #[arg(long, env = "PALAVER_HEARTBEAT_SECS", default_value_t = 30)]
    pub heartbeat_secs: u64,

    /// Name announced in status payloads ({"service": ..., "status": ...}).
    #[arg(long, env = "PALAVER_SERVICE_NAME", default_value = "palaver-gateway")]
    pub service_name: String,

    /// On shutdown, how long in-flight turns may still finish and be answered.
    #[arg(long, env = "PALAVER_SHUTDOWN_GRACE_SECS", default_value_t = 30)]
    pub shutdown_grace_secs: u64,

    /// Control messages (template, clear_history, delete_session) one session
    /// may send per minute; more are dropped, so no client can rewrite a
    /// prompt in a loop. 0: no limit.
    #[arg(long, env = "PALAVER_CONTROL_PER_SESSION_PER_MIN", default_value_t = ControlLimits::default().per_session)]
    pub control_per_session_per_min: u32,

    /// Control messages one project may receive per minute, all sessions
    /// together: fresh session ids do not multiply the allowance. 0: no limit.
    #[arg(long, env = "PALAVER_CONTROL_PER_PROJECT_PER_MIN", default_value_t = ControlLimits::default().per_project)]
    pub control_per_project_per_min: u32,

    /// Bind sessions to broker users: `on` also reads <project>/user_input/<user>
    /// (the broker's ACL guarantees <user>), keeps that user's sessions apart
    /// and answers only under <project>/assistant_response/<user>/; `only`
    /// stops reading the shared <project>/user_input.
    #[arg(long, env = "PALAVER_IDENTITY_BINDING", value_enum, default_value_t = IdentityBinding::Off)]
    pub identity_binding: IdentityBinding,
}

impl GatewayArgs {
    /// Resolves the flags into a [`Config`]: parses the URL, reads the projects
    /// file, applies `--project`, picks a client id.
    pub fn into_config(self) -> Result<Config, ConfigError> {
        let (mqtt_host, mqtt_port, mqtt_tls) = parse_broker_url(&self.mqtt_url)?;
        let identity = ClientIdentity::from_pair(
            self.mqtt_client_cert_file.as_ref(),
            self.mqtt_client_key_file.as_ref(),
            "--mqtt-client-cert-file/--mqtt-client-key-file",
        )?;
        let mqtt_tls = if mqtt_tls {
            palaver_core::tls::install_provider();
            let tls =
                palaver_core::tls::client_config(self.mqtt_ca_file.as_deref(), identity.as_ref())?;
            Some(Arc::new(tls))
        } else if self.mqtt_ca_file.is_some() || identity.is_some() {
            return Err(ConfigError::Invalid(
                "MQTT TLS files are given but --mqtt-url is not mqtts://".into(),
            ));
        } else {
            None
        };
        // Fails now rather than at the first turn.
        self.session_tls.endpoint(&self.session_url)?;
        let session_token = self.session_auth.bearer()?;
        let mqtt_password = match (&self.mqtt_password, &self.mqtt_password_file) {
            (Some(p), _) => Some(p.clone()),
            (None, Some(path)) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| {
                        ConfigError::Invalid(format!("cannot read {}: {e}", path.display()))
                    })?
                    .trim_end_matches(['\r', '\n'])
                    .to_owned(),
            ),
            (None, None) => None,
        };
        let file = Projects::load(self.projects_file.as_deref())?;
        let available: Vec<String> = file.names().map(str::to_owned).collect();
        let projects = if self.projects.is_empty() {
            available
        } else {
            let mut chosen = Vec::new();
            for p in self.projects {
                let p = p.trim().to_owned();
                if !available.contains(&p) {
                    return Err(ConfigError::UnknownProject(p));
                }
                if !chosen.contains(&p) {
                    chosen.push(p);
                }
            }
            chosen
        };
        let mut config = Config::new(mqtt_host, mqtt_port, self.session_url, projects);
        config.mqtt_username = self.mqtt_username;
        config.mqtt_password = mqtt_password;
        config.mqtt_tls = mqtt_tls;
        config.session_tls = self.session_tls;
        config.session_token = session_token;
        config.client_id = self.client_id;
        config.consumer_lease = (self.consumer_lease_ms > 0 && self.shared_group.is_none())
            .then(|| Duration::from_millis(self.consumer_lease_ms));
        config.shared_group = self.shared_group;
        config.request_timeout = Duration::from_millis(self.request_timeout_ms);
        config.max_pending = self.max_pending;
        config.max_payload_bytes = self.max_payload_bytes;
        config.max_packet_bytes = self.max_packet_bytes;
        config.reply_qos = self.reply_qos;
        config.mqtt_protocol = self.mqtt_protocol;
        config.reply_expiry_secs = (self.reply_expiry_secs > 0).then_some(self.reply_expiry_secs);
        config.heartbeat = Duration::from_secs(self.heartbeat_secs);
        config.service_name = self.service_name;
        config.shutdown_grace = Duration::from_secs(self.shutdown_grace_secs);
        config.control_limits = ControlLimits {
            per_session: self.control_per_session_per_min,
            per_project: self.control_per_project_per_min,
        };
        config.identity_binding = self.identity_binding;
        config.validate()?;
        Ok(config)
    }
}

/// Everything the gateway runs on. Plain data: build it with [`Config::new`]
/// (or [`GatewayArgs::into_config`]) and adjust fields.
#[derive(Debug, Clone)]
pub struct Config {
    /// Broker host name or IP address.
    pub mqtt_host: String,
    /// Broker TCP port.
    pub mqtt_port: u16,
    /// Broker user name, when the broker wants credentials.
    pub mqtt_username: Option<String>,
    /// Broker password (used only with a user name).
    pub mqtt_password: Option<String>,
    /// TLS towards the broker (an mqtts:// URL); `None` is plain TCP.
    pub mqtt_tls: Option<Arc<rustls::ClientConfig>>,
    /// CA and client certificate for an https:// `session_url`.
    pub session_tls: ClientTlsArgs,
    /// The token sent to session-svc.
    pub session_token: Bearer,
    /// Client id prefix; one connection per project as `<client_id>-<project>`
    /// because MQTT allows one last will per connection.
    pub client_id: String,
    /// Projects to serve: the first level of their topics.
    pub projects: Vec<String>,
    /// Shared-subscription group: several gateways with the same group split
    /// the requests instead of each answering all of them.
    pub shared_group: Option<String>,
    /// TTL of the per-project consumer lease (see [`crate::lease`]); `None`:
    /// this gateway consumes every project always, with clean MQTT sessions.
    pub consumer_lease: Option<Duration>,
    /// session-svc's gRPC URL; connected lazily so the gateway may start first.
    pub session_url: String,
    /// Deadline of one turn, sent as `grpc-timeout` and enforced locally.
    pub request_timeout: Duration,
    /// Requests in progress across all projects before answering "overloaded".
    pub max_pending: usize,
    /// Largest payload read; larger ones are dropped unread.
    pub max_payload_bytes: usize,
    /// Largest MQTT packet the client accepts: anything bigger ends the
    /// connection (rumqttc's rule), so this sits well above
    /// `max_payload_bytes`, for oversize messages to be dropped instead.
    pub max_packet_bytes: usize,
    /// QoS (0..=2) of replies, error replies and hints.
    pub reply_qos: u8,
    /// The MQTT version spoken to the broker.
    pub mqtt_protocol: Protocol,
    /// Message expiry interval of replies (MQTT 5), so that stale answers
    /// are not queued for a client that left; `None`: no expiry.
    pub reply_expiry_secs: Option<u32>,
    /// Interval of the presence heartbeat.
    pub heartbeat: Duration,
    /// Name in status payloads, so monitoring can tell services apart.
    pub service_name: String,
    /// How long shutdown waits for in-flight turns so their replies still go out.
    pub shutdown_grace: Duration,
    /// MQTT keep-alive: how fast the broker notices a dead gateway (and fires
    /// the last will), and how fast the gateway notices a dead broker.
    pub keep_alive: Duration,
    /// How many control messages a session and a project may send per minute.
    pub control_limits: ControlLimits,
    /// Which request topics are read: shared, per user, or both.
    pub identity_binding: IdentityBinding,
}

impl Config {
    /// Settings with palaver's defaults, for tests and tools: everything but
    /// the broker, session-svc and the project list is defaulted; the client
    /// id gets a random suffix so parallel tests do not kick each other off.
    pub fn new(
        mqtt_host: impl Into<String>,
        mqtt_port: u16,
        session_url: impl Into<String>,
        projects: Vec<String>,
    ) -> Self {
        Self {
            mqtt_host: mqtt_host.into(),
            mqtt_port,
            mqtt_username: None,
            mqtt_password: None,
            mqtt_tls: None,
            session_tls: ClientTlsArgs::default(),
            session_token: Bearer::none(),
            client_id: format!("palaver-gateway-{:08x}", rand::random::<u32>()),
            projects,
            shared_group: None,
            consumer_lease: Some(Duration::from_secs(10)),
            session_url: session_url.into(),
            request_timeout: Duration::from_millis(120_000),
            max_pending: 1000,
            max_payload_bytes: 262_144,
            max_packet_bytes: 16 * 1024 * 1024,
            reply_qos: 1,
            mqtt_protocol: Protocol::V5,
            reply_expiry_secs: Some(300),
            heartbeat: Duration::from_secs(30),
            service_name: "palaver-gateway".into(),
            shutdown_grace: Duration::from_secs(30),
            keep_alive: Duration::from_secs(30),
            control_limits: ControlLimits::default(),
            identity_binding: IdentityBinding::Off,
        }
    }

    /// Checks what the gateway relies on; [`crate::Gateway::new`] calls it.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |what: String| Err(ConfigError::Invalid(what));
        if self.mqtt_host.trim().is_empty() {
            return invalid("the MQTT host is empty".into());
        }
        if self.mqtt_port == 0 {
            return invalid("the MQTT port must not be 0".into());
        }
        if self.projects.is_empty() {
            return invalid("no project to serve".into());
        }
        for p in &self.projects {
            if !is_topic_level(p) || p.starts_with('$') {
                return invalid(format!("project {p:?} cannot be an MQTT topic level"));
            }
        }
        if let Some(group) = &self.shared_group {
            if !is_topic_level(group) {
                return invalid(format!(
                    "shared group {group:?} cannot be an MQTT topic level"
                ));
            }
        }
        if let Some(ttl) = self.consumer_lease {
            if ttl < Duration::from_millis(300) || ttl > Duration::from_secs(600) {
                return invalid("consumer lease must be within 300..=600000 ms".into());
            }
            if self.shared_group.is_some() {
                return invalid("the consumer lease and a shared group exclude each other".into());
            }
        }
        if self.client_id.trim().is_empty() || self.client_id.contains('\0') {
            return invalid("the client id is empty".into());
        }
        if self.request_timeout.is_zero() {
            return invalid("request timeout must be above 0".into());
        }
        if self.max_pending == 0 || self.max_pending > MAX_PENDING_LIMIT {
            return invalid(format!(
                "max-pending must be within 1..={MAX_PENDING_LIMIT}"
            ));
        }
        if self.max_payload_bytes == 0 || self.max_payload_bytes > MAX_PAYLOAD_LIMIT {
            return invalid(format!(
                "max-payload-bytes must be within 1..={MAX_PAYLOAD_LIMIT}"
            ));
        }
        if self.max_packet_bytes < self.max_payload_bytes.saturating_add(PACKET_OVERHEAD)
            || self.max_packet_bytes > MAX_PACKET_LIMIT
        {
            return invalid(format!(
                "max-packet-bytes must be at least max-payload-bytes + {PACKET_OVERHEAD} and at most {MAX_PACKET_LIMIT}"
            ));
        }
        if self.reply_qos > 2 {
            return invalid("reply QoS must be 0, 1 or 2".into());
        }
        if self.heartbeat.is_zero() {
            return invalid("heartbeat interval must be above 0".into());
        }
        if self.keep_alive < Duration::from_secs(1)
            || self.keep_alive.as_secs() > u64::from(u16::MAX)
        {
            return invalid("keep-alive must be within 1..=65535 seconds".into());
        }
        if self.mqtt_protocol == Protocol::V5 && self.keep_alive < crate::mqtt::MIN_V5_KEEP_ALIVE {
            return invalid("under MQTT 5 the keep-alive must be at least 5 seconds".into());
        }
        if self.service_name.trim().is_empty() {
            return invalid("service name is empty".into());
        }
        Ok(())
    }
}

/// Cap on `max_pending`: a semaphore of this many permits is still cheap and
/// no deployment needs more turns waiting per gateway.
const MAX_PENDING_LIMIT: usize = 1_000_000;
/// Cap on `max_payload_bytes`.
const MAX_PAYLOAD_LIMIT: usize = 16 * 1024 * 1024;
/// Room for a PUBLISH's header and topic beside the payload.
const PACKET_OVERHEAD: usize = 1024;
/// Cap on `max_packet_bytes`: mosquitto's own largest message (256 MiB); one
/// packet of it is held in memory while it is read.
const MAX_PACKET_LIMIT: usize = 256 * 1024 * 1024;

fn is_topic_level(s: &str) -> bool {
    !s.is_empty()
        && s.trim() == s
        && !s
            .chars()
            .any(|c| matches!(c, '/' | '+' | '#') || c.is_control())
}

/// `mqtt://host[:port]` or `tcp://host[:port]` (IPv6 in brackets) to host
/// and port, for callers that speak plain MQTT only.
pub fn parse_mqtt_url(url: &str) -> Result<(String, u16), ConfigError> {
    match parse_broker_url(url)? {
        (host, port, false) => Ok((host, port)),
        (_, _, true) => Err(ConfigError::MqttUrl {
            url: url.to_owned(),
            why: "TLS is not supported here; use mqtt://",
        }),
    }
}

/// A broker URL to host, port and whether it is TLS (`mqtts://`, `ssl://`,
/// default port 8883) or plain (`mqtt://`, `tcp://`, default port 1883).
/// Credentials in the URL are refused: they would need percent-decoding
/// rules nobody remembers; use the username/password flags.
pub fn parse_broker_url(url: &str) -> Result<(String, u16, bool), ConfigError> {
    let fail = |why| ConfigError::MqttUrl {
        url: url.to_owned(),
        why,
    };
    let (rest, tls) = if let Some(r) = url
        .strip_prefix("mqtt://")
        .or_else(|| url.strip_prefix("tcp://"))
    {
        (r, false)
    } else if let Some(r) = url
        .strip_prefix("mqtts://")
        .or_else(|| url.strip_prefix("ssl://"))
    {
        (r, true)
    } else {
        return Err(fail("expected mqtt://host:port or mqtts://host:port"));
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.contains('@') {
        return Err(fail(
            "credentials belong in --mqtt-username/--mqtt-password",
        ));
    }
    if authority.contains(['/', '?', '#']) {
        return Err(fail("a path or query is not allowed"));
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or_else(|| fail("unclosed '['"))?;
        match after {
            "" => (host, None),
            p => (
                host,
                Some(p.strip_prefix(':').ok_or_else(|| fail("junk after ']'"))?),
            ),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err(fail("the host is empty"));
    }
    let port = match port {
        None if tls => 8883,
        None => 1883,
        Some(p) => match p.parse::<u16>() {
            Ok(0) | Err(_) => return Err(fail("the port must be a number within 1..=65535")),
            Ok(p) => p,
        },
    };
    Ok((host.to_owned(), port, tls))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        gateway: GatewayArgs,
    }

    fn parse_args(args: &[&str]) -> Result<Config, ConfigError> {
        let cli = Cli::try_parse_from(std::iter::once("gateway").chain(args.iter().copied()))
            .expect("flags parse");
        cli.gateway.into_config()
    }

    #[test]
    fn mqtt_urls() {
        let ok = [
            ("mqtt://127.0.0.1:1883", ("127.0.0.1", 1883)),
            ("mqtt://broker", ("broker", 1883)),
            ("mqtt://broker/", ("broker", 1883)),
            ("tcp://broker:1884", ("broker", 1884)),
            ("mqtt://[::1]:1999", ("::1", 1999)),
            ("mqtt://[::1]", ("::1", 1883)),
        ];
        for (url, (host, port)) in ok {
            assert_eq!(
                parse_mqtt_url(url).unwrap(),
                (host.to_owned(), port),
                "{url}"
            );
        }
        for bad in [
            "broker:1883",
            "http://broker",
            "mqtts://broker",
            "mqtt://",
            "mqtt://:1883",
            "mqtt://broker:0",
            "mqtt://broker:70000",
            "mqtt://broker:x",
            "mqtt://u:p@broker",
            "mqtt://broker/path",
            "mqtt://[::1",
            "mqtt://[::1]x",
        ] {
            assert!(parse_mqtt_url(bad).is_err(), "accepted {bad}");
        }
    }

    #[test]
    fn defaults_match_the_design() {
        let c = parse_args(&[]).unwrap();
        assert_eq!((c.mqtt_host.as_str(), c.mqtt_port), ("127.0.0.1", 1883));
        assert_eq!(c.session_url, "http://127.0.0.1:50051");
        assert_eq!(c.request_timeout, Duration::from_secs(120));
        assert_eq!(c.max_pending, 1000);
        assert_eq!(c.max_payload_bytes, 262_144);
        assert_eq!(c.reply_qos, 1);
        assert_eq!(c.heartbeat, Duration::from_secs(30));
        assert_eq!(c.service_name, "palaver-gateway");
        assert_eq!(c.shutdown_grace, Duration::from_secs(30));
        assert_eq!(
            c.client_id, "palaver-gateway",
            "shared by the gateways of a deployment"
        );
        assert_eq!(c.consumer_lease, Some(Duration::from_secs(10)));
        assert_eq!(c.mqtt_protocol, Protocol::V5);
        assert_eq!(c.reply_expiry_secs, Some(300));
        let builtin: Vec<String> = Projects::builtin().names().map(str::to_owned).collect();
        assert_eq!(c.projects, builtin);
        assert!(c.projects.contains(&"general".to_owned()));
    }

    #[test]
    fn protocol_and_reply_expiry() {
        let c = parse_args(&["--mqtt-protocol", "3.1.1", "--reply-expiry-secs", "0"]).unwrap();
        assert_eq!(c.mqtt_protocol, Protocol::V311);
        assert_eq!(c.reply_expiry_secs, None, "0 is no expiry");
        let c = parse_args(&["--mqtt-protocol", "5", "--reply-expiry-secs", "60"]).unwrap();
        assert_eq!(c.mqtt_protocol, Protocol::V5);
        assert_eq!(c.reply_expiry_secs, Some(60));
        let bad = Cli::try_parse_from(["gateway", "--mqtt-protocol", "4"]);
        assert!(bad.is_err(), "only 5 and 3.1.1");
    }

    #[test]
    fn project_selection() {
        let c = parse_args(&[
            "--project",
            "npc",
            "--project",
            "general",
            "--project",
            "npc",
        ])
        .unwrap();
        assert_eq!(c.projects, ["npc", "general"]);
        assert!(matches!(
            parse_args(&["--project", "nope"]),
            Err(ConfigError::UnknownProject(p)) if p == "nope"
        ));
        assert!(matches!(
            parse_args(&["--projects-file", "/definitely/not/here.toml"]),
            Err(ConfigError::Projects(_))
        ));
    }

    #[test]
    fn validation() {
        let good = Config::new("h", 1883, "http://x:1", vec!["p".into()]);
        assert!(good.validate().is_ok());
        type Breaker = Box<dyn Fn(&mut Config)>;
        let cases: Vec<Breaker> = vec![
            Box::new(|c| c.projects.clear()),
            Box::new(|c| c.projects = vec!["a/b".into()]),
            Box::new(|c| c.projects = vec!["+".into()]),
            Box::new(|c| c.projects = vec!["$SYS".into()]),
            Box::new(|c| c.shared_group = Some("g/x".into())),
            Box::new(|c| c.shared_group = Some(String::new())),
            Box::new(|c| c.max_pending = 0),
            Box::new(|c| c.max_payload_bytes = 0),
            Box::new(|c| c.max_packet_bytes = c.max_payload_bytes),
            Box::new(|c| c.max_packet_bytes = 1 << 30),
            Box::new(|c| c.reply_qos = 3),
            Box::new(|c| c.request_timeout = Duration::ZERO),
            Box::new(|c| c.heartbeat = Duration::ZERO),
            Box::new(|c| c.keep_alive = Duration::from_millis(500)),
            Box::new(|c| c.keep_alive = Duration::from_secs(4)),
            Box::new(|c| c.mqtt_host = " ".into()),
            Box::new(|c| c.client_id = String::new()),
        ];
        for (i, break_it) in cases.iter().enumerate() {
            let mut c = good.clone();
            break_it(&mut c);
            assert!(c.validate().is_err(), "case {i} accepted: {c:?}");
        }
        let mut short = good.clone();
        short.keep_alive = Duration::from_secs(2);
        short.mqtt_protocol = Protocol::V311;
        assert!(short.validate().is_ok(), "3.1.1 allows a short keep-alive");
    }
}
