//! The client side of palaver's MQTT wire protocol (DESIGN.md), shared by
//! `palaver chat` and `palaver send`.
//!
//! A [`Conversation`] is one MQTT connection for one (project, session). It
//! subscribes to its own reply space `<p>/assistant_response/<sid>/<clientId>/#`
//! and to `<p>/hint/<sid>` *before* anything is published (re-subscribing
//! after a reconnect), sends each message with a fresh request id in its
//! reply topic, and keeps only the reply on exactly that topic: replies to
//! other clients, or to an earlier request that timed out, are skipped.

use std::time::Duration;

use gateway::errors::OVERLOADED_TEXT;
use gateway::topics;
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, MqttOptions, Packet, QoS,
    SubscribeFilter, SubscribeReasonCode,
};
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Largest message a client accepts: well above the broker's 1 MiB limit.
const MAX_INCOMING_BYTES: usize = 4 * 1024 * 1024;
/// Pause before reconnecting after the broker went away mid-conversation.
const RECONNECT_PAUSE: Duration = Duration::from_secs(1);

/// Where the broker is and how to log in; shared by `chat` and `send`.
#[derive(Debug, Clone, clap::Args)]
pub struct BrokerArgs {
    /// Broker as mqtt://host:port; when given, --host and --port are ignored
    /// (but --host or --port typed on the command line beat PALAVER_MQTT_URL).
    #[arg(long, env = "PALAVER_MQTT_URL")]
    pub mqtt_url: Option<String>,

    /// Broker host.
    #[arg(long, env = "PALAVER_MQTT_HOST", default_value = "127.0.0.1")]
    pub host: String,

    /// Broker port (`palaver up --mqtt-port`).
    #[arg(long, env = "PALAVER_MQTT_PORT", default_value_t = 1883)]
    pub port: u16,

    /// User name, when the broker requires a login.
    #[arg(long, env = "PALAVER_MQTT_USERNAME")]
    pub username: Option<String>,

    /// Password for --username (prefer the environment variable: flags show in `ps`).
    #[arg(long, env = "PALAVER_MQTT_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
}

/// A broker address and login, resolved from [`BrokerArgs`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Broker host name or address.
    pub host: String,
    /// Broker TCP port.
    pub port: u16,
    /// User name and password, if the broker wants them.
    pub credentials: Option<(String, String)>,
}

impl BrokerArgs {
    /// Drops a broker URL that came from the environment when `--host` or
    /// `--port` was typed: PALAVER_MQTT_URL is the gateway's own variable,
    /// and a flag on the command line is the more deliberate choice.
    /// `matches` are the subcommand's.
    pub fn prefer_typed_flags(&mut self, matches: &clap::ArgMatches) {
        use clap::parser::ValueSource::{CommandLine, EnvVariable};
        let typed = |id: &str| matches.value_source(id) == Some(CommandLine);
        if matches.value_source("mqtt_url") == Some(EnvVariable) && (typed("host") || typed("port"))
        {
            self.mqtt_url = None;
        }
    }

    /// The broker to talk to: `--mqtt-url` if given, else `--host`/`--port`.
    pub fn target(&self) -> Result<Target, ClientError> {
        let (host, port) = match &self.mqtt_url {
            Some(url) => gateway::config::parse_mqtt_url(url)
                .map_err(|e| ClientError::Connect(e.to_string()))?,
            None => (self.host.clone(), self.port),
        };
        let credentials = self
            .username
            .clone()
            .map(|user| (user, self.password.clone().unwrap_or_default()));
        Ok(Target {
            host,
            port,
            credentials,
        })
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "mqtt://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "mqtt://{}:{}", self.host, self.port)
        }
    }
}

/// Why a conversation could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No connection to the broker (down, wrong address, refused login).
    #[error("{0}")]
    Connect(String),
    /// Nothing came back in time.
    #[error("{0}")]
    Timeout(String),
}

/// What came back for one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// The model's answer.
    Answer(String),
    /// An error reply: text starting with `Error: `, or the overload notice.
    Error(String),
}

impl Reply {
    /// Sorts a reply payload the way existing clients do.
    pub fn classify(text: String) -> Self {
        if text.starts_with("Error: ") || text == OVERLOADED_TEXT {
            Reply::Error(text)
        } else {
            Reply::Answer(text)
        }
    }

    /// The text, whichever kind.
    pub fn text(&self) -> &str {
        match self {
            Reply::Answer(t) | Reply::Error(t) => t,
        }
    }
}

/// Optional fields of a request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extras {
    /// `systemPrompt`: the session's system prompt from this message on.
    pub system_prompt: Option<String>,
    /// `maxTokens`: the longest reply, in tokens.
    pub max_tokens: Option<u32>,
    /// `stream`: also get the reply in pieces as it is written.
    pub stream: bool,
}

/// State of the connection as the poll task sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum LinkState {
    /// Connecting or re-subscribing.
    Connecting,
    /// Connected and subscribed: safe to publish.
    Ready,
    /// Could not connect the first time; the task has ended.
    Failed(String),
}

/// A message the broker delivered to us.
struct Incoming {
    topic: String,
    payload: String,
}

/// One MQTT connection speaking for one session of one project.
pub struct Conversation {
    target: Target,
    project: String,
    session_id: String,
    /// The session id as one topic level: wildcards and '/' replaced, so
    /// topics keep their shape (`<p>/assistant_response/<sid>/<cid>/<rid>`).
    sid_level: String,
    client_id: String,
    reply_base: String,
    hint_topic: String,
    client: AsyncClient,
    inbox: mpsc::UnboundedReceiver<Incoming>,
    state: watch::Receiver<LinkState>,
    poller: JoinHandle<()>,
}

impl Conversation {
    /// Connects as a new client (`<client_prefix>-<8 hex>`) and subscribes
    /// to the session's replies and hints; fails after `timeout` or at once
    /// when the broker refuses.
    pub async fn open(
        target: &Target,
        project: &str,
        session_id: &str,
        client_prefix: &str,
        timeout: Duration,
    ) -> Result<Self, ClientError> {
        let client_id = format!("{client_prefix}-{:08x}", rand::random::<u32>());
        let sid_level: String = topics::sanitize_level(session_id).replace('/', "_");
        let reply_base = format!("{}{sid_level}/{client_id}", topics::reply_prefix(project));
        let hint_topic = topics::hint_topic(project, Some(session_id));
        let filters = vec![
            SubscribeFilter::new(format!("{reply_base}/#"), QoS::AtLeastOnce),
            SubscribeFilter::new(hint_topic.clone(), QoS::AtLeastOnce),
        ];

        let mut opts = MqttOptions::new(client_id.clone(), target.host.clone(), target.port);
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_clean_session(true);
        opts.set_max_packet_size(MAX_INCOMING_BYTES, crate::broker::MAX_PAYLOAD_BYTES);
        if let Some((user, password)) = &target.credentials {
            opts.set_credentials(user.clone(), password.clone());
        }
        let (client, eventloop) = AsyncClient::new(opts, 64);
        let (inbox_tx, inbox) = mpsc::unbounded_channel();
        let (state_tx, state) = watch::channel(LinkState::Connecting);
        let poller = tokio::spawn(poll(
            eventloop,
            client.clone(),
            filters,
            target.to_string(),
            inbox_tx,
            state_tx,
        ));

        let mut conversation = Self {
            target: target.clone(),
            project: project.to_owned(),
            session_id: session_id.to_owned(),
            sid_level,
            client_id,
            reply_base,
            hint_topic,
            client,
            inbox,
            state,
            poller,
        };
        // On failure, dropping the conversation stops its poll task.
        wait_ready(&mut conversation.state, Instant::now() + timeout, target).await?;
        Ok(conversation)
    }

    /// The session this conversation speaks for.
    pub fn session_id(&self) -> &str {
        &self.session_id
    }

    /// Sends `message` with `extras` and waits up to `timeout` for its reply.
    pub async fn ask(
        &mut self,
        message: &str,
        extras: &Extras,
        timeout: Duration,
    ) -> Result<Reply, ClientError> {
        self.ask_streaming(message, extras, timeout, |_| {}, std::future::pending())
            .await
    }

    /// [`Self::ask`], handing each streamed piece's text to `on_delta` as it
    /// arrives (with `extras.stream`), and cancelling the turn when `cancel`
    /// completes: the gateway then answers `Error: Cancelled.`.
    pub async fn ask_streaming(
        &mut self,
        message: &str,
        extras: &Extras,
        timeout: Duration,
        mut on_delta: impl FnMut(&str),
        cancel: impl std::future::Future<Output = ()>,
    ) -> Result<Reply, ClientError> {
        let deadline = Instant::now() + timeout;
        self.drain_inbox();
        let request_id = format!("{:016x}", rand::random::<u64>());
        let reply_topic = format!("{}/{request_id}", self.reply_base);
        let mut payload = json!({
            "message": message,
            "sessionId": self.session_id,
            "replyTopic": reply_topic,
            "clientId": self.client_id,
            "requestId": request_id,
        });
        if let Some(prompt) = &extras.system_prompt {
            payload["systemPrompt"] = Value::from(prompt.as_str());
        }
        if let Some(max_tokens) = extras.max_tokens {
            payload["maxTokens"] = Value::from(max_tokens);
        }
        if extras.stream {
            payload["stream"] = Value::Bool(true);
        }
        let input = format!("{}/{}", self.project, topics::USER_INPUT);
        self.publish(input, &payload, deadline).await?;
        let stream_topic = format!("{reply_topic}/stream");
        let mut cancel = std::pin::pin!(cancel);
        let mut cancelled = false;
        let found = loop {
            let next = tokio::select! {
                m = tokio::time::timeout_at(deadline, self.inbox.recv()) => m.ok().flatten(),
                () = &mut cancel, if !cancelled => {
                    cancelled = true;
                    let topic = format!("{}/cancel/{}", self.project, self.sid_level);
                    let body = json!({ "requestId": request_id, "clientId": self.client_id });
                    self.publish(topic, &body, deadline).await?;
                    continue;
                }
            };
            match next {
                Some(m) if m.topic == reply_topic => break Some(m),
                Some(m) if m.topic == stream_topic => {
                    let piece: Value = serde_json::from_str(&m.payload).unwrap_or_default();
                    if let Some(delta) = piece.get("delta").and_then(Value::as_str) {
                        on_delta(delta);
                    }
                }
                Some(m) => {
                    tracing::debug!(topic = %m.topic, "skipped a message for another request")
                }
                None => break None,
            }
        };
        let found = found.ok_or_else(|| {
                ClientError::Timeout(format!(
                    "no reply within {:.0} s: is `palaver up` (or a gateway) running on {} and serving project {:?}?",
                    timeout.as_secs_f64(),
                    self.target,
                    self.project
                ))
            })?;
        Ok(Reply::classify(found.payload))
    }

    /// Forgets the session's messages (its system prompt stays); waits for
    /// the gateway's "History cleared" acknowledgement.
    pub async fn clear_history(&mut self, timeout: Duration) -> Result<(), ClientError> {
        let payload = json!({ "sessionId": self.session_id });
        self.control("clear_history", &payload, "History cleared", timeout)
            .await
    }

    /// Gives the session a new system prompt and clears its messages (the
    /// template topic with `reset: true`); waits for "Template updated".
    pub async fn set_prompt(&mut self, prompt: &str, timeout: Duration) -> Result<(), ClientError> {
        let payload = json!({ "sessionId": self.session_id, "template": prompt, "reset": true });
        self.control("template", &payload, "Template updated", timeout)
            .await
    }

    /// Disconnects politely (best effort).
    pub async fn close(mut self) {
        let queued = tokio::time::timeout(Duration::from_secs(1), self.client.disconnect()).await;
        if matches!(queued, Ok(Ok(()))) {
            // Let the poll task write the DISCONNECT; dropping `self` then
            // stops whatever is left.
            let _ = tokio::time::timeout(Duration::from_millis(500), &mut self.poller).await;
        }
    }

    /// Publishes to `<project>/<kind>/<sid level>` and waits for `hint` on
    /// the session's hint topic.
    async fn control(
        &mut self,
        kind: &str,
        payload: &Value,
        hint: &str,
        timeout: Duration,
    ) -> Result<(), ClientError> {
        let deadline = Instant::now() + timeout;
        self.drain_inbox();
        // The payload names the session; the topic's level has to be a
        // single level (with a '/' the gateway would ignore the topic).
        let topic = format!("{}/{kind}/{}", self.project, self.sid_level);
        self.publish(topic, payload, deadline).await?;
        let hint_topic = self.hint_topic.clone();
        let acked = self
            .wait_for(deadline, |m| {
                m.topic == hint_topic
                    && serde_json::from_str::<Value>(&m.payload)
                        .is_ok_and(|v| v.get("hint").and_then(Value::as_str) == Some(hint))
            })
            .await;
        match acked {
            Some(_) => Ok(()),
            None => Err(ClientError::Timeout(format!(
                "no acknowledgement within {:.0} s: is a gateway serving project {:?} on {}?",
                timeout.as_secs_f64(),
                self.project,
                self.target
            ))),
        }
    }

    /// Waits until subscribed, then publishes `payload` at QoS 1.
    async fn publish(
        &mut self,
        topic: String,
        payload: &Value,
        deadline: Instant,
    ) -> Result<(), ClientError> {
        wait_ready(&mut self.state, deadline, &self.target).await?;
        let body = serde_json::to_vec(payload).expect("a JSON value serializes");
        self.client
            .publish(topic, QoS::AtLeastOnce, false, body)
            .await
            .map_err(|e| ClientError::Connect(format!("cannot publish: {e}")))
    }

    /// Reads delivered messages until one passes `wanted` or `deadline`.
    async fn wait_for(
        &mut self,
        deadline: Instant,
        wanted: impl Fn(&Incoming) -> bool,
    ) -> Option<Incoming> {
        loop {
            match tokio::time::timeout_at(deadline, self.inbox.recv()).await {
                Ok(Some(m)) if wanted(&m) => return Some(m),
                Ok(Some(m)) => {
                    tracing::debug!(topic = %m.topic, "skipped a message for another request")
                }
                Ok(None) | Err(_) => return None,
            }
        }
    }

    /// Drops leftovers (late replies to requests that timed out).
    fn drain_inbox(&mut self) {
        while self.inbox.try_recv().is_ok() {}
    }
}

impl Drop for Conversation {
    fn drop(&mut self) {
        self.poller.abort();
    }
}

/// Waits for [`LinkState::Ready`].
async fn wait_ready(
    state: &mut watch::Receiver<LinkState>,
    deadline: Instant,
    target: &Target,
) -> Result<(), ClientError> {
    let outcome = tokio::time::timeout_at(
        deadline,
        state.wait_for(|s| !matches!(s, LinkState::Connecting)),
    )
    .await;
    match outcome {
        Ok(Ok(s)) => match &*s {
            LinkState::Failed(why) => Err(ClientError::Connect(why.clone())),
            _ => Ok(()),
        },
        Ok(Err(_)) => Err(ClientError::Connect(format!(
            "lost the connection to {target}"
        ))),
        Err(_) => Err(ClientError::Connect(format!(
            "could not connect to {target} in time"
        ))),
    }
}

/// Drives the connection: subscribes on every ConnAck, forwards publishes,
/// reconnects after a loss. A first connection that fails ends the task.
async fn poll(
    mut eventloop: rumqttc::EventLoop,
    client: AsyncClient,
    filters: Vec<SubscribeFilter>,
    target: String,
    inbox: mpsc::UnboundedSender<Incoming>,
    state: watch::Sender<LinkState>,
) {
    let mut ever_connected = false;
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                ever_connected = true;
                state.send_replace(LinkState::Connecting);
                if let Err(e) = client.try_subscribe_many(filters.clone()) {
                    state.send_replace(LinkState::Failed(format!("cannot subscribe: {e}")));
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                if ack
                    .return_codes
                    .iter()
                    .any(|c| matches!(c, SubscribeReasonCode::Failure))
                {
                    state.send_replace(LinkState::Failed(
                        "the broker refused the subscription to this session's replies".into(),
                    ));
                } else {
                    state.send_replace(LinkState::Ready);
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let _ = inbox.send(Incoming {
                    topic: p.topic.clone(),
                    payload: String::from_utf8_lossy(&p.payload).into_owned(),
                });
            }
            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => {
                // Our own close: the next poll would only report the closed
                // connection (or worse, reconnect).
                let _ = tokio::time::timeout(Duration::from_millis(200), eventloop.poll()).await;
                return;
            }
            Ok(_) => {}
            Err(e) if !ever_connected => {
                state.send_replace(LinkState::Failed(describe(&e, &target)));
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "lost the broker; reconnecting");
                state.send_replace(LinkState::Connecting);
                tokio::time::sleep(RECONNECT_PAUSE).await;
            }
        }
    }
}

/// One sentence on why a first connection failed.
fn describe(e: &ConnectionError, target: &str) -> String {
    match e {
        ConnectionError::ConnectionRefused(
            ConnectReturnCode::BadUserNamePassword | ConnectReturnCode::NotAuthorized,
        ) => format!("{target} refused the login: wrong or missing --username/--password"),
        ConnectionError::ConnectionRefused(code) => {
            format!("{target} refused the connection ({code:?})")
        }
        ConnectionError::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
            format!("nothing listens on {target}: start it with `palaver up`, or pass --port/--mqtt-url")
        }
        // rumqttd answers a bad login by closing the connection without a
        // ConnAck; so does a broker that does not like us for other reasons.
        ConnectionError::Io(_) | ConnectionError::MqttState(_) => format!(
            "{target} closed the connection before accepting it: wrong or missing --username/--password? ({e})"
        ),
        other => format!("cannot connect to {target}: {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_classified_like_existing_clients_do() {
        assert_eq!(
            Reply::classify("Hello".into()),
            Reply::Answer("Hello".into())
        );
        assert!(matches!(
            Reply::classify("Error: Message is empty.".into()),
            Reply::Error(_)
        ));
        assert!(matches!(
            Reply::classify(OVERLOADED_TEXT.into()),
            Reply::Error(_)
        ));
        // Only the prefix counts: a reply that mentions an error is an answer.
        assert!(matches!(
            Reply::classify("No Error: here".into()),
            Reply::Answer(_)
        ));
    }

    #[test]
    fn target_prefers_the_url() {
        let args = BrokerArgs {
            mqtt_url: Some("mqtt://broker:1999".into()),
            host: "127.0.0.1".into(),
            port: 1883,
            username: Some("u".into()),
            password: None,
        };
        let t = args.target().unwrap();
        assert_eq!((t.host.as_str(), t.port), ("broker", 1999));
        assert_eq!(t.credentials, Some(("u".into(), String::new())));
        assert_eq!(t.to_string(), "mqtt://broker:1999");
        let plain = BrokerArgs {
            mqtt_url: None,
            username: None,
            ..args
        };
        let t = plain.target().unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.credentials),
            ("127.0.0.1", 1883, None)
        );
    }
}
