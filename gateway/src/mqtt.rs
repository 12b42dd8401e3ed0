//! The gateway's MQTT client, MQTT 5 or 3.1.1, behind one small interface.
//!
//! rumqttc has a separate client, event loop and packet type per protocol
//! version. Everything else in the gateway (`link.rs`, `ack.rs`,
//! `publish.rs`, `stream.rs`) sees only what this module gives it: a
//! [`Client`] that publishes with optional [`Properties`], subscribes and
//! acknowledges, and an [`EventLoop`] that yields [`Event`]s, whose incoming
//! messages carry the MQTT 5 request properties (empty under 3.1.1).
//! Under 3.1.1 outgoing properties are dropped: old clients never see them.

use bytes::Bytes;
use rumqttc::v5;
use rumqttc::v5::mqttbytes::v5 as v5p;
pub use rumqttc::QoS;

use crate::config::Config;
use crate::presence;

/// The user property naming why an error reply failed, with the names of
/// [`crate::errors::ErrorKind::as_str`].
pub const ERROR_KIND_PROPERTY: &str = "palaver-error-kind";

/// The user property carrying a W3C trace context on a request.
pub const TRACEPARENT_PROPERTY: &str = "traceparent";

/// Under MQTT 5 a session with no expiry interval ends at disconnect; the
/// project's persistent session must outlive its gateways, as a 3.1.1
/// `clean session = false` session does, so it never expires.
const SESSION_NEVER_EXPIRES: u32 = u32::MAX;

/// The MQTT version the gateway speaks to the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Protocol {
    /// MQTT 5: Response Topic, Correlation Data, user properties, expiry.
    #[value(name = "5")]
    V5,
    /// MQTT 3.1.1, for brokers without 5 (`palaver up`'s embedded one).
    #[value(name = "3.1.1")]
    V311,
}

/// What an MQTT 5 request says about its reply; all `None` under 3.1.1.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestProperties {
    /// The Response Topic property: where the requester wants the reply.
    pub response_topic: Option<String>,
    /// The Correlation Data property, echoed on every answer.
    pub correlation_data: Option<Bytes>,
    /// The `traceparent` user property.
    pub traceparent: Option<String>,
}

impl RequestProperties {
    fn from_v5(props: Option<v5p::PublishProperties>) -> Self {
        let Some(props) = props else {
            return Self::default();
        };
        let traceparent = props
            .user_properties
            .into_iter()
            .find(|(k, _)| k == TRACEPARENT_PROPERTY)
            .map(|(_, v)| v);
        Self {
            response_topic: props.response_topic,
            correlation_data: props.correlation_data,
            traceparent,
        }
    }
}

/// Properties of an outgoing message; dropped under 3.1.1.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Properties {
    /// Echo of the request's Correlation Data.
    pub correlation_data: Option<Bytes>,
    /// The `palaver-error-kind` user property of an error reply.
    pub error_kind: Option<&'static str>,
    /// Message expiry interval in seconds.
    pub expiry_secs: Option<u32>,
}

impl Properties {
    fn into_v5(self) -> Option<v5p::PublishProperties> {
        if self == Self::default() {
            return None;
        }
        Some(v5p::PublishProperties {
            message_expiry_interval: self.expiry_secs,
            correlation_data: self.correlation_data,
            user_properties: self
                .error_kind
                .map(|kind| vec![(ERROR_KIND_PROPERTY.to_owned(), kind.to_owned())])
                .unwrap_or_default(),
            ..Default::default()
        })
    }
}

/// One message the broker delivered.
#[derive(Debug, Clone)]
pub struct Message {
    /// Its topic.
    pub topic: String,
    /// Its payload.
    pub payload: Bytes,
    /// The QoS it was delivered at.
    pub qos: QoS,
    /// Its packet id (0 at QoS 0).
    pub pkid: u16,
    /// Set on a delivery again of an unacknowledged message.
    pub dup: bool,
    /// Set when the broker replays a stored message.
    pub retain: bool,
    /// Its MQTT 5 request properties.
    pub properties: RequestProperties,
}

/// What the event loop saw; anything the gateway does not act on is `Other`.
#[derive(Debug)]
pub enum Event {
    /// The broker accepted the connection.
    Connected,
    /// The broker answered a SUBSCRIBE; `refused` filters were refused.
    Subscribed {
        /// How many filters the broker refused.
        refused: usize,
    },
    /// A message arrived.
    Message(Message),
    /// Our DISCONNECT went out.
    Disconnecting,
    /// Anything else (acks, pings, ...).
    Other,
}

/// A failure of the connection; the event loop reconnects on the next poll.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct ConnectionError(Box<dyn std::error::Error + Send + Sync>);

impl From<rumqttc::ConnectionError> for ConnectionError {
    fn from(e: rumqttc::ConnectionError) -> Self {
        Self(Box::new(e))
    }
}

impl From<v5::ConnectionError> for ConnectionError {
    fn from(e: v5::ConnectionError) -> Self {
        Self(Box::new(e))
    }
}

/// The client's queue is closed (the event loop is gone) or full (`try_`).
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct ClientError(Box<dyn std::error::Error + Send + Sync>);

impl From<rumqttc::ClientError> for ClientError {
    fn from(e: rumqttc::ClientError) -> Self {
        Self(Box::new(e))
    }
}

impl From<v5::ClientError> for ClientError {
    fn from(e: v5::ClientError) -> Self {
        Self(Box::new(e))
    }
}

/// rumqttc's QoS from the config's number (validated to 0..=2).
pub fn qos(level: u8) -> QoS {
    match level {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

fn v5_qos(qos: QoS) -> v5::mqttbytes::QoS {
    match qos {
        QoS::AtMostOnce => v5::mqttbytes::QoS::AtMostOnce,
        QoS::AtLeastOnce => v5::mqttbytes::QoS::AtLeastOnce,
        QoS::ExactlyOnce => v5::mqttbytes::QoS::ExactlyOnce,
    }
}

fn from_v5_qos(qos: v5::mqttbytes::QoS) -> QoS {
    match qos {
        v5::mqttbytes::QoS::AtMostOnce => QoS::AtMostOnce,
        v5::mqttbytes::QoS::AtLeastOnce => QoS::AtLeastOnce,
        v5::mqttbytes::QoS::ExactlyOnce => QoS::ExactlyOnce,
    }
}

/// Whether the project's session is persistent: with the consumer lease it
/// is the project's, shared by the deployment's gateways; the broker queues
/// requests while none is connected and re-delivers the unfinished ones,
/// which are therefore acknowledged only once answered. Without it, clean
/// sessions: nothing to resume. Subscriptions are renewed on every
/// connection either way.
fn persistent(config: &Config) -> bool {
    config.consumer_lease.is_some()
}

/// How many unacknowledged requests the broker may have in flight to one
/// project's connection (MQTT 5 Receive Maximum): twice `max-pending`. The
/// turns the gateway admits hold their acknowledgements until answered, and
/// so do, in arrival order, the requests after them; the second half leaves
/// room to answer requests beyond the backlog "overloaded" at once, and to
/// read cancels and control messages, while those turns run. Beyond it the
/// broker keeps requests queued. Under 3.1.1 the broker decides
/// (mosquitto: `max_inflight_messages`).
pub fn receive_maximum(config: &Config) -> u16 {
    u16::try_from(config.max_pending.saturating_mul(2))
        .unwrap_or(u16::MAX)
        .max(1)
}

/// Our own QoS 1/2 publishes in flight (unacknowledged by the broker) per
/// connection, as rumqttc's 3.1.1 client has by default. Without it the
/// v5 client would allocate room for 65535 of them on every connection.
const OUTGOING_INFLIGHT: u16 = 100;

/// rumqttc refuses a shorter keep-alive under MQTT 5.
pub const MIN_V5_KEEP_ALIVE: std::time::Duration = std::time::Duration::from_secs(5);

fn client_id(config: &Config, project: &str) -> String {
    format!("{}-{}", config.client_id, project)
}

/// The MQTT 3.1.1 options of `project`'s connection.
pub fn v311_options(config: &Config, project: &str) -> rumqttc::MqttOptions {
    let mut opts = rumqttc::MqttOptions::new(
        client_id(config, project),
        config.mqtt_host.clone(),
        config.mqtt_port,
    );
    opts.set_keep_alive(config.keep_alive);
    opts.set_clean_session(!persistent(config));
    opts.set_manual_acks(persistent(config));
    // Payloads over max-payload-bytes must reach us to be dropped and
    // counted: rumqttc treats an oversize incoming packet as fatal to the
    // connection, and a reconnect loses the replies in flight.
    opts.set_max_packet_size(
        config.max_packet_bytes,
        crate::publish::MAX_OUTGOING_PACKET_BYTES,
    );
    if let Some(user) = &config.mqtt_username {
        opts.set_credentials(
            user.clone(),
            config.mqtt_password.clone().unwrap_or_default(),
        );
    }
    let (topic, payload) = presence::last_will(project, &config.service_name);
    opts.set_last_will(rumqttc::LastWill::new(
        topic,
        payload,
        QoS::AtLeastOnce,
        presence::RETAIN,
    ));
    if let Some(tls) = &config.mqtt_tls {
        opts.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(tls.clone()),
        ));
    }
    opts
}

/// The MQTT 5 options of `project`'s connection.
pub fn v5_options(config: &Config, project: &str) -> v5::MqttOptions {
    let mut opts = v5::MqttOptions::new(
        client_id(config, project),
        config.mqtt_host.clone(),
        config.mqtt_port,
    );
    opts.set_keep_alive(config.keep_alive);
    opts.set_clean_start(!persistent(config));
    opts.set_session_expiry_interval(persistent(config).then_some(SESSION_NEVER_EXPIRES));
    opts.set_manual_acks(persistent(config));
    opts.set_receive_maximum(Some(receive_maximum(config)));
    opts.set_outgoing_inflight_upper_limit(OUTGOING_INFLIGHT);
    // Under 5 the broker learns our limit and drops a larger message
    // itself instead of costing the connection.
    opts.set_max_packet_size(Some(
        u32::try_from(config.max_packet_bytes).unwrap_or(u32::MAX),
    ));
    if let Some(user) = &config.mqtt_username {
        opts.set_credentials(
            user.clone(),
            config.mqtt_password.clone().unwrap_or_default(),
        );
    }
    let (topic, payload) = presence::last_will(project, &config.service_name);
    opts.set_last_will(v5p::LastWill::new(
        topic,
        payload,
        v5::mqttbytes::QoS::AtLeastOnce,
        presence::RETAIN,
        None,
    ));
    if let Some(tls) = &config.mqtt_tls {
        opts.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(tls.clone()),
        ));
    }
    // rumqttc leaves Nagle on. A reply is a small write that often follows
    // the PUBACK of its request; with Nagle it waits for the broker to
    // acknowledge that PUBACK, which a broker delaying its ACKs does only
    // after ~40 ms.
    let mut network = rumqttc::NetworkOptions::new();
    network.set_tcp_nodelay(true);
    opts.set_network_options(network);
    opts
}

/// A handle to one connection's queue; cheap to clone.
#[derive(Clone)]
pub enum Client {
    /// MQTT 3.1.1.
    V311(rumqttc::AsyncClient),
    /// MQTT 5.
    V5(v5::AsyncClient),
}

/// One connection's event loop, which alone makes progress (sends what the
/// [`Client`]s queued) while it is polled.
pub enum EventLoop {
    /// MQTT 3.1.1.
    V311(Box<rumqttc::EventLoop>),
    /// MQTT 5.
    V5(Box<v5::EventLoop>),
}

impl Client {
    /// `project`'s connection (not connected yet), in the configured
    /// protocol, with a queue of `capacity` requests.
    pub fn new(config: &Config, project: &str, capacity: usize) -> (Self, EventLoop) {
        match config.mqtt_protocol {
            Protocol::V311 => {
                let (client, mut eventloop) =
                    rumqttc::AsyncClient::new(v311_options(config, project), capacity);
                // See the same setting in `v5_options`.
                eventloop.network_options.set_tcp_nodelay(true);
                (Self::V311(client), EventLoop::V311(Box::new(eventloop)))
            }
            Protocol::V5 => {
                let (client, eventloop) =
                    v5::AsyncClient::new(v5_options(config, project), capacity);
                (Self::V5(client), EventLoop::V5(Box::new(eventloop)))
            }
        }
    }

    /// Publishes (never retained), waiting for room in the queue.
    pub async fn publish(
        &self,
        topic: &str,
        qos: QoS,
        payload: Vec<u8>,
        properties: Properties,
    ) -> Result<(), ClientError> {
        match self {
            Self::V311(c) => Ok(c.publish(topic, qos, false, payload).await?),
            Self::V5(c) => {
                let qos = v5_qos(qos);
                match properties.into_v5() {
                    Some(p) => {
                        c.publish_with_properties(topic, qos, false, payload, p)
                            .await?;
                    }
                    None => c.publish(topic, qos, false, payload).await?,
                }
                Ok(())
            }
        }
    }

    /// Publishes (never retained) only if the queue has room now.
    pub fn try_publish(
        &self,
        topic: &str,
        qos: QoS,
        payload: Vec<u8>,
        properties: Properties,
    ) -> Result<(), ClientError> {
        match self {
            Self::V311(c) => Ok(c.try_publish(topic, qos, false, payload)?),
            Self::V5(c) => {
                let qos = v5_qos(qos);
                match properties.into_v5() {
                    Some(p) => c.try_publish_with_properties(topic, qos, false, payload, p)?,
                    None => c.try_publish(topic, qos, false, payload)?,
                }
                Ok(())
            }
        }
    }

    /// Subscribes to `filters` in one SUBSCRIBE.
    pub async fn subscribe_many(&self, filters: &[String], qos: QoS) -> Result<(), ClientError> {
        match self {
            Self::V311(c) => Ok(c
                .subscribe_many(
                    filters
                        .iter()
                        .map(|f| rumqttc::SubscribeFilter::new(f.clone(), qos)),
                )
                .await?),
            Self::V5(c) => Ok(c
                .subscribe_many(
                    filters
                        .iter()
                        .map(|f| v5p::Filter::new(f.clone(), v5_qos(qos))),
                )
                .await?),
        }
    }

    /// Unsubscribes from `filter`.
    pub async fn unsubscribe(&self, filter: String) -> Result<(), ClientError> {
        match self {
            Self::V311(c) => Ok(c.unsubscribe(filter).await?),
            Self::V5(c) => Ok(c.unsubscribe(filter).await?),
        }
    }

    /// Queues the acknowledgement of delivery `pkid` (PUBACK, or PUBREC at
    /// QoS 2) without waiting.
    pub fn try_ack(&self, pkid: u16, qos: QoS) -> Result<(), ClientError> {
        match self {
            Self::V311(c) => {
                let mut publish = rumqttc::Publish::new("", qos, Vec::new());
                publish.pkid = pkid;
                Ok(c.try_ack(&publish)?)
            }
            Self::V5(c) => {
                let mut publish = v5p::Publish::new("", v5_qos(qos), Bytes::new(), None);
                publish.pkid = pkid;
                Ok(c.try_ack(&publish)?)
            }
        }
    }

    /// Queues a DISCONNECT, waiting for room.
    pub async fn disconnect(&self) -> Result<(), ClientError> {
        match self {
            Self::V311(c) => Ok(c.disconnect().await?),
            Self::V5(c) => Ok(c.disconnect().await?),
        }
    }

    /// Queues a DISCONNECT if there is room now.
    pub fn try_disconnect(&self) -> Result<(), ClientError> {
        match self {
            Self::V311(c) => Ok(c.try_disconnect()?),
            Self::V5(c) => Ok(c.try_disconnect()?),
        }
    }
}

impl EventLoop {
    /// The next event; connects (again) first if there is no connection.
    pub async fn poll(&mut self) -> Result<Event, ConnectionError> {
        match self {
            Self::V311(l) => Ok(from_v311(l.poll().await?)),
            Self::V5(l) => Ok(from_v5(l.poll().await?)),
        }
    }
}

fn from_v311(event: rumqttc::Event) -> Event {
    use rumqttc::{Event as E, Outgoing, Packet};
    match event {
        E::Incoming(Packet::ConnAck(_)) => Event::Connected,
        E::Incoming(Packet::SubAck(ack)) => Event::Subscribed {
            refused: ack
                .return_codes
                .iter()
                .filter(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                .count(),
        },
        E::Incoming(Packet::Publish(p)) => Event::Message(Message {
            topic: p.topic,
            payload: p.payload,
            qos: p.qos,
            pkid: p.pkid,
            dup: p.dup,
            retain: p.retain,
            properties: RequestProperties::default(),
        }),
        E::Outgoing(Outgoing::Disconnect) => Event::Disconnecting,
        _ => Event::Other,
    }
}

fn from_v5(event: v5::Event) -> Event {
    use rumqttc::Outgoing;
    use v5p::Packet;
    match event {
        v5::Event::Incoming(Packet::ConnAck(_)) => Event::Connected,
        v5::Event::Incoming(Packet::SubAck(ack)) => Event::Subscribed {
            refused: ack
                .return_codes
                .iter()
                .filter(|c| !matches!(c, v5p::SubscribeReasonCode::Success(_)))
                .count(),
        },
        v5::Event::Incoming(Packet::Publish(p)) => Event::Message(Message {
            // The broker checked the topic is UTF-8 (MQTT requires it).
            topic: String::from_utf8_lossy(&p.topic).into_owned(),
            payload: p.payload,
            qos: from_v5_qos(p.qos),
            pkid: p.pkid,
            dup: p.dup,
            retain: p.retain,
            properties: RequestProperties::from_v5(p.properties),
        }),
        v5::Event::Outgoing(Outgoing::Disconnect) => Event::Disconnecting,
        _ => Event::Other,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn config() -> Config {
        let mut config = Config::new("broker", 1999, "http://x:1", vec!["p".into()]);
        config.client_id = "gw".into();
        config.max_packet_bytes = 5024;
        config.mqtt_username = Some("u".into());
        config
    }

    #[test]
    fn v311_options_follow_the_config() {
        let mut config = config();
        let opts = v311_options(&config, "p");
        assert_eq!(opts.client_id(), "gw-p");
        assert_eq!(opts.broker_address(), ("broker".to_owned(), 1999));
        assert!(!opts.clean_session(), "the project's persistent session");
        assert!(opts.manual_acks(), "acknowledged once answered");
        assert_eq!(opts.max_packet_size(), 5024);
        assert_eq!(opts.keep_alive(), Duration::from_secs(30));
        let will = opts.last_will().expect("a last will");
        assert_eq!(will.topic, "p/status");
        assert_eq!(will.qos, QoS::AtLeastOnce);
        assert!(!will.retain);
        assert_eq!(opts.credentials().map(|l| l.username), Some("u".to_owned()));
        config.consumer_lease = None;
        assert!(v311_options(&config, "p").clean_session());
    }

    #[test]
    fn v5_options_keep_the_session_and_bound_the_inflight_requests() {
        let mut config = config();
        config.max_pending = 70_000;
        let opts = v5_options(&config, "p");
        assert_eq!(opts.client_id(), "gw-p");
        assert!(!opts.clean_start(), "the project's persistent session");
        assert_eq!(
            opts.session_expiry_interval(),
            Some(u32::MAX),
            "outlives the connection, as under 3.1.1"
        );
        assert!(opts.manual_acks(), "acknowledged once answered");
        assert_eq!(opts.receive_maximum(), Some(u16::MAX));
        assert_eq!(opts.get_outgoing_inflight_upper_limit(), Some(100));
        assert_eq!(opts.max_packet_size(), Some(5024));
        let will = opts.last_will().expect("a last will");
        assert_eq!(&will.topic[..], b"p/status");
        assert_eq!(will.qos, v5::mqttbytes::QoS::AtLeastOnce);
        assert!(!will.retain);
        assert_eq!(opts.credentials().map(|l| l.username), Some("u".to_owned()));

        config.max_pending = 40;
        config.consumer_lease = None;
        let opts = v5_options(&config, "p");
        assert!(opts.clean_start());
        assert_eq!(
            opts.session_expiry_interval(),
            None,
            "ends with the connection"
        );
        assert!(!opts.manual_acks());
        assert_eq!(opts.receive_maximum(), Some(80));
    }

    #[test]
    fn qos_levels() {
        assert_eq!(qos(0), QoS::AtMostOnce);
        assert_eq!(qos(1), QoS::AtLeastOnce);
        assert_eq!(qos(2), QoS::ExactlyOnce);
        for q in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
            assert_eq!(from_v5_qos(v5_qos(q)), q);
        }
    }

    #[test]
    fn request_properties_from_a_v5_publish() {
        assert_eq!(
            RequestProperties::from_v5(None),
            RequestProperties::default()
        );
        let props = v5p::PublishProperties {
            response_topic: Some("p/assistant_response/x".into()),
            correlation_data: Some(Bytes::from_static(b"\x00\x01")),
            user_properties: vec![
                ("other".into(), "x".into()),
                (TRACEPARENT_PROPERTY.into(), "00-abc-def-01".into()),
            ],
            ..Default::default()
        };
        assert_eq!(
            RequestProperties::from_v5(Some(props)),
            RequestProperties {
                response_topic: Some("p/assistant_response/x".into()),
                correlation_data: Some(Bytes::from_static(b"\x00\x01")),
                traceparent: Some("00-abc-def-01".into()),
            }
        );
    }

    #[test]
    fn outgoing_properties_to_v5() {
        assert_eq!(Properties::default().into_v5(), None, "no empty properties");
        let p = Properties {
            correlation_data: Some(Bytes::from_static(b"c")),
            error_kind: Some("rate_limited"),
            expiry_secs: Some(300),
        }
        .into_v5()
        .unwrap();
        assert_eq!(p.correlation_data.as_deref(), Some(&b"c"[..]));
        assert_eq!(p.message_expiry_interval, Some(300));
        assert_eq!(
            p.user_properties,
            [(ERROR_KIND_PROPERTY.to_owned(), "rate_limited".to_owned())]
        );
    }
}
