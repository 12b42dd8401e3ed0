//! The only way the gateway publishes: every message goes through
//! [`Publisher`], which refuses (and counts) any topic outside the project's
//! reply, hint and status spaces, and any packet the broker would choke on.

use std::sync::Arc;

use bytes::Bytes;

use crate::mqtt::{Client, Properties, QoS};

use crate::errors::{ErrorKind, REPLY_TOO_LARGE_TEXT};
use crate::metrics::{Metrics, OutKind};
use crate::topics::{self, Route};

/// Largest packet the gateway sends. Model replies are a few KiB; the cap
/// exists because rumqttc treats an oversize outgoing packet as a connection
/// error, which would cut off every client of the project.
pub const MAX_OUTGOING_PACKET_BYTES: usize = 1024 * 1024;

/// Room for the fixed header, topic length and packet id of a publish, and
/// the MQTT 5 properties the gateway adds besides correlation data (expiry,
/// error kind).
const PUBLISH_OVERHEAD: usize = 128;

/// Why a publish was not attempted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The topic is outside what `kind` may publish to (a bug upstream).
    Topic,
    /// The packet would exceed [`MAX_OUTGOING_PACKET_BYTES`].
    TooLarge,
    /// The MQTT client is gone (shutdown) or its queue is full (`try_` only).
    Closed,
}

/// Route each kind of message may use.
fn route(kind: OutKind) -> Route {
    match kind {
        OutKind::Reply | OutKind::Error | OutKind::Piece => Route::Reply,
        OutKind::Hint => Route::Hint,
        OutKind::Status => Route::Status,
    }
}

/// The confinement check itself, kept free of I/O so it is tested directly.
pub fn admit(project: &str, kind: OutKind, topic: &str, payload_len: usize) -> Result<(), Refused> {
    if !topics::confined(project, route(kind), topic) {
        return Err(Refused::Topic);
    }
    if topic.len() + payload_len + PUBLISH_OVERHEAD > MAX_OUTGOING_PACKET_BYTES {
        return Err(Refused::TooLarge);
    }
    Ok(())
}

/// What an answer to an MQTT 5 request carries back besides its text: the
/// request's Correlation Data (empty for other requests, and under 3.1.1).
pub type Correlation = Option<Bytes>;

/// One project's publishing handle; cheap to clone into every turn.
#[derive(Clone)]
pub struct Publisher {
    client: Client,
    project: Arc<str>,
    metrics: Metrics,
    reply_qos: QoS,
    /// Message expiry of everything on the reply route.
    reply_expiry_secs: Option<u32>,
}

impl Publisher {
    /// Wraps `client`, the connection of `project`.
    pub fn new(
        client: Client,
        project: Arc<str>,
        metrics: Metrics,
        reply_qos: QoS,
        reply_expiry_secs: Option<u32>,
    ) -> Self {
        Self {
            client,
            project,
            metrics,
            reply_qos,
            reply_expiry_secs,
        }
    }

    /// The project this publisher is confined to.
    pub fn project(&self) -> &str {
        &self.project
    }

    /// `extra`: bytes the message carries besides its payload (correlation data).
    fn check(
        &self,
        kind: OutKind,
        topic: &str,
        payload: &[u8],
        extra: usize,
    ) -> Result<QoS, Refused> {
        match admit(&self.project, kind, topic, payload.len() + extra) {
            Ok(()) => Ok(match kind {
                OutKind::Status => QoS::AtLeastOnce,
                _ => self.reply_qos,
            }),
            Err(why) => {
                let reason = match why {
                    Refused::Topic => {
                        tracing::error!(project = %self.project, kind = kind.as_str(), topic, "refused to publish outside the project's topics");
                        "topic_refused"
                    }
                    _ => {
                        tracing::warn!(project = %self.project, kind = kind.as_str(), topic, bytes = payload.len(), "message too large to publish");
                        "publish_too_large"
                    }
                };
                self.metrics.dropped(reason);
                Err(why)
            }
        }
    }

    /// What both ways of publishing check and add first: the QoS (or why
    /// not to publish), and the MQTT 5 properties of a message of `kind`:
    /// answers (replies, errors, pieces) expire and echo the request's
    /// correlation data; errors name their kind.
    fn prepare(
        &self,
        kind: OutKind,
        topic: &str,
        payload: &[u8],
        correlation: &Correlation,
        error: Option<ErrorKind>,
    ) -> Result<(QoS, Properties), Refused> {
        let qos = self.check(kind, topic, payload, correlation_len(correlation))?;
        if route(kind) != Route::Reply {
            return Ok((qos, Properties::default()));
        }
        let properties = Properties {
            correlation_data: correlation.clone(),
            error_kind: error.map(ErrorKind::as_str),
            expiry_secs: self.reply_expiry_secs,
        };
        Ok((qos, properties))
    }

    /// Publishes, waiting for room in the client's queue. Never retained:
    /// replies are for whoever listens now.
    pub async fn publish(
        &self,
        kind: OutKind,
        topic: &str,
        payload: Vec<u8>,
    ) -> Result<(), Refused> {
        self.publish_answer(kind, topic, payload, &None, None).await
    }

    /// Publishes a message answering a request (a reply, an error reply with
    /// its `error` kind, a stream piece), waiting for room in the queue.
    pub async fn publish_answer(
        &self,
        kind: OutKind,
        topic: &str,
        payload: Vec<u8>,
        correlation: &Correlation,
        error: Option<ErrorKind>,
    ) -> Result<(), Refused> {
        let (qos, properties) = self.prepare(kind, topic, &payload, correlation, error)?;
        match self.client.publish(topic, qos, payload, properties).await {
            Ok(()) => {
                self.metrics.message_out(&self.project, kind);
                Ok(())
            }
            Err(e) => {
                tracing::debug!(project = %self.project, error = %e, "MQTT client closed; message lost");
                self.metrics.dropped("client_closed");
                Err(Refused::Closed)
            }
        }
    }

    /// Publishes only if the client's queue has room now: for callers that
    /// must not wait, like the connection's own poll loop.
    pub fn try_publish(&self, kind: OutKind, topic: &str, payload: Vec<u8>) -> Result<(), Refused> {
        self.try_publish_answer(kind, topic, payload, &None, None)
    }

    /// [`Self::publish_answer`] if the client's queue has room now.
    pub fn try_publish_answer(
        &self,
        kind: OutKind,
        topic: &str,
        payload: Vec<u8>,
        correlation: &Correlation,
        error: Option<ErrorKind>,
    ) -> Result<(), Refused> {
        let (qos, properties) = self.prepare(kind, topic, &payload, correlation, error)?;
        match self.client.try_publish(topic, qos, payload, properties) {
            Ok(()) => {
                self.metrics.message_out(&self.project, kind);
                Ok(())
            }
            Err(e) => {
                tracing::warn!(project = %self.project, topic, error = %e, "MQTT queue full or closed; message lost");
                self.metrics.dropped("publish_queue_full");
                Err(Refused::Closed)
            }
        }
    }

    /// Publishes the error reply `text`, of kind `error`.
    pub async fn publish_error(
        &self,
        topic: &str,
        correlation: &Correlation,
        error: ErrorKind,
        text: &str,
    ) -> Result<(), Refused> {
        let payload = text.as_bytes().to_vec();
        self.publish_answer(OutKind::Error, topic, payload, correlation, Some(error))
            .await
    }

    /// [`Self::publish_error`] if the client's queue has room now.
    pub fn try_publish_error(
        &self,
        topic: &str,
        correlation: &Correlation,
        error: ErrorKind,
        text: &str,
    ) -> Result<(), Refused> {
        let payload = text.as_bytes().to_vec();
        self.try_publish_answer(OutKind::Error, topic, payload, correlation, Some(error))
    }

    /// Publishes a model reply; one too large for a packet becomes an error
    /// reply, so the client still hears back.
    pub async fn publish_reply(
        &self,
        topic: &str,
        correlation: &Correlation,
        text: String,
    ) -> Result<(), Refused> {
        let len = text.len() + correlation_len(correlation);
        if admit(&self.project, OutKind::Reply, topic, len) == Err(Refused::TooLarge) {
            tracing::warn!(project = %self.project, topic, bytes = text.len(), "reply too large for one MQTT packet");
            self.metrics.error(ErrorKind::ReplyTooLarge.as_str());
            return self
                .publish_error(
                    topic,
                    correlation,
                    ErrorKind::ReplyTooLarge,
                    REPLY_TOO_LARGE_TEXT,
                )
                .await;
        }
        let payload = text.into_bytes();
        self.publish_answer(OutKind::Reply, topic, payload, correlation, None)
            .await
    }
}

fn correlation_len(correlation: &Correlation) -> usize {
    correlation.as_ref().map_or(0, Bytes::len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_is_confined_to_its_space() {
        let cases: &[(OutKind, &str, Result<(), Refused>)] = &[
            (OutKind::Reply, "p/assistant_response/s", Ok(())),
            (OutKind::Error, "p/assistant_response/s/c/r", Ok(())),
            (OutKind::Hint, "p/hint/s", Ok(())),
            (OutKind::Status, "p/status", Ok(())),
            (OutKind::Reply, "p/hint/s", Err(Refused::Topic)),
            (OutKind::Reply, "p/status", Err(Refused::Topic)),
            (OutKind::Reply, "p/user_input", Err(Refused::Topic)),
            (
                OutKind::Reply,
                "q/assistant_response/s",
                Err(Refused::Topic),
            ),
            (
                OutKind::Error,
                "p/assistant_response/#",
                Err(Refused::Topic),
            ),
            (OutKind::Hint, "p/assistant_response/s", Err(Refused::Topic)),
            (OutKind::Hint, "p/template", Err(Refused::Topic)),
            (OutKind::Status, "p/status/x", Err(Refused::Topic)),
            (OutKind::Status, "p/hint/all", Err(Refused::Topic)),
        ];
        for (kind, topic, want) in cases {
            assert_eq!(admit("p", *kind, topic, 10), *want, "{kind:?} {topic}");
        }
    }

    #[test]
    fn oversize_packets_are_refused() {
        let topic = "p/assistant_response/s";
        let fits = MAX_OUTGOING_PACKET_BYTES - topic.len() - PUBLISH_OVERHEAD;
        assert_eq!(admit("p", OutKind::Reply, topic, fits), Ok(()));
        assert_eq!(
            admit("p", OutKind::Reply, topic, fits + 1),
            Err(Refused::TooLarge)
        );
    }
}
