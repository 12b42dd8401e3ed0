//! One project's MQTT connection: connect, (re)subscribe, read requests and
//! hand each to its own task.
//!
//! The poll loop never waits on anything but the broker: subscribing and the
//! "online" message are spawned, overload and refusal replies use the
//! non-blocking publish, and turns run in their own tasks. rumqttc only makes
//! progress (including sending our replies) while the loop polls.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::ack::{Ack, Acks};
use crate::backlog::Backlog;
use crate::cancel::{self, TurnKey};
use crate::config::Config;
use crate::control;
use crate::errors::{ErrorKind, OVERLOADED_TEXT};
use crate::identity;
use crate::lease::Standing;
use crate::metrics::{Metrics, OutKind};
use crate::mqtt::{self, Client, Event, EventLoop, Message, Protocol, QoS};
use crate::presence;
use crate::publish::Publisher;
use crate::readiness::Readiness;
use crate::request::{self, Parsed};
use crate::topics;
use crate::turn::Turns;

/// Requests (publishes, acks, subscribes) queued towards the broker before
/// senders wait; large enough for a burst of replies.
const CLIENT_QUEUE: usize = 1024;
/// First and last pause between reconnect attempts.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How long to keep reading after our DISCONNECT for the broker to close
/// its end (see [`Link::linger`]).
const LINGER: Duration = Duration::from_secs(1);

/// Everything shared by the links of one gateway.
pub struct Shared {
    /// The gateway's settings.
    pub config: Config,
    /// Metric handles.
    pub metrics: Metrics,
    /// The `max-pending` bound.
    pub backlog: Backlog,
    /// session-svc calls.
    pub turns: Arc<Turns>,
    /// Subscription state for `Gateway::ready`.
    pub readiness: Arc<Readiness>,
    /// Tripped when the gateway starts shutting down: take no new work.
    pub draining: CancellationToken,
    /// Tripped once the final "offline" and DISCONNECT are queued: stop
    /// reconnecting if the broker is gone.
    pub closing: CancellationToken,
    /// How often control topics may be used.
    pub control_rate: crate::control_rate::ControlRate,
}

/// What the gateway keeps of a link to steer its shutdown.
pub struct LinkHandle {
    /// The project's MQTT client (shares the link's queue).
    pub client: Client,
    /// The project's confined publisher.
    pub publisher: Publisher,
    /// Whether the connection is up, for heartbeats.
    pub connected: Arc<AtomicBool>,
}

/// One project's connection and its poll loop.
pub struct Link {
    shared: Arc<Shared>,
    project: Arc<str>,
    index: usize,
    subscriptions: Vec<String>,
    client: Client,
    eventloop: EventLoop,
    publisher: Publisher,
    connected: Arc<AtomicBool>,
    /// What is owed to the broker: PUBACKs, in order, once answered.
    acks: Acks,
}

impl Link {
    /// Builds project number `index`'s connection (not connected yet).
    pub fn new(shared: Arc<Shared>, project: &str, index: usize) -> (Self, LinkHandle) {
        let (client, eventloop) = Client::new(&shared.config, project, CLIENT_QUEUE);
        let project: Arc<str> = Arc::from(project);
        let publisher = Publisher::new(
            client.clone(),
            project.clone(),
            shared.metrics.clone(),
            mqtt::qos(shared.config.reply_qos),
            shared.config.reply_expiry_secs,
        );
        let connected = Arc::new(AtomicBool::new(false));
        let acks = Acks::new(client.clone(), shared.config.consumer_lease.is_some());
        let handle = LinkHandle {
            client: client.clone(),
            publisher: publisher.clone(),
            connected: connected.clone(),
        };
        let link = Self {
            subscriptions: topics::subscriptions(
                &project,
                shared.config.shared_group.as_deref(),
                shared.config.identity_binding,
            ),
            shared,
            project,
            index,
            client,
            eventloop,
            publisher,
            connected,
            acks,
        };
        (link, handle)
    }

    /// The topic filters this link subscribes to (to unsubscribe on shutdown).
    pub fn subscriptions(&self) -> Vec<String> {
        self.subscriptions.clone()
    }

    /// Polls until the gateway's DISCONNECT has gone out and the broker has
    /// closed the connection (or, while closing, until the broker is
    /// unreachable).
    ///
    /// `standing` says whether this gateway consumes the project (always,
    /// without the consumer lease): the link connects only while it does,
    /// and disconnects when the lease is lost.
    pub async fn run(mut self, mut standing: watch::Receiver<Standing>) {
        let mut backoff = MIN_BACKOFF;
        let mut failures: u32 = 0;
        let mut ever_connected = false;
        // Disconnects when the lease is lost; the poll loop then stands by.
        let on_loss = {
            let (mut standing, client) = (standing.clone(), self.client.clone());
            tokio::spawn(async move {
                while standing.changed().await.is_ok() {
                    if *standing.borrow_and_update() != Standing::Holder {
                        let _ = client.try_disconnect();
                    }
                }
            })
        };
        let _stop_watching = AbortOnDrop(on_loss);
        loop {
            if *standing.borrow_and_update() != Standing::Holder
                && !self.stand_by(&mut standing).await
            {
                break;
            }
            match self.eventloop.poll().await {
                Ok(Event::Connected) => {
                    tracing::info!(project = %self.project, "connected to the MQTT broker");
                    backoff = MIN_BACKOFF;
                    failures = 0;
                    ever_connected = true;
                    self.acks.reset();
                    self.connected.store(true, Ordering::Relaxed);
                    self.on_connected();
                }
                Ok(Event::Subscribed { refused }) => {
                    if refused == 0 {
                        tracing::info!(project = %self.project, topics = ?self.subscriptions, "subscribed");
                        self.shared.readiness.set(self.index, true);
                    } else {
                        tracing::error!(project = %self.project, refused, topics = ?self.subscriptions,
                            "broker refused subscriptions (ACL? shared subscriptions unsupported?)");
                        self.shared.readiness.set(self.index, false);
                    }
                }
                Ok(Event::Message(message)) => self.on_message(message),
                Ok(Event::Disconnecting) => {
                    self.linger().await;
                    self.connected.store(false, Ordering::Relaxed);
                    self.acks.reset();
                    tracing::info!(project = %self.project, "disconnected from the MQTT broker");
                    if self.shared.closing.is_cancelled() {
                        break;
                    }
                    // The lease was lost: stand by until it is ours again.
                }
                Ok(_) => {}
                Err(e) => {
                    self.connected.store(false, Ordering::Relaxed);
                    self.acks.reset();
                    self.shared.readiness.set(self.index, false);
                    if self.shared.closing.is_cancelled() {
                        tracing::warn!(project = %self.project, error = %e, "broker unreachable while closing; giving up");
                        break;
                    }
                    failures = failures.saturating_add(1);
                    // Loud on the first failure and about once a minute after.
                    if !ever_connected
                        && failures == 1
                        && self.shared.config.mqtt_protocol == Protocol::V5
                    {
                        // A broker without MQTT 5 just closes the connection.
                        tracing::warn!(project = %self.project, error = %e, failures,
                            "cannot connect to the MQTT broker with MQTT 5; retrying (if it only speaks 3.1.1, use --mqtt-protocol 3.1.1)");
                    } else if failures == 1 || failures.is_multiple_of(12) {
                        tracing::warn!(project = %self.project, error = %e, failures, "MQTT connection problem; retrying");
                    } else {
                        tracing::debug!(project = %self.project, error = %e, failures, "MQTT connection problem; retrying");
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
        self.connected.store(false, Ordering::Relaxed);
    }

    /// Waits until this gateway holds the project's lease; false if the
    /// gateway began to drain first (nothing left to do).
    async fn stand_by(&mut self, standing: &mut watch::Receiver<Standing>) -> bool {
        loop {
            match *standing.borrow_and_update() {
                Standing::Holder => return true,
                Standing::Standby => self.shared.readiness.standby(self.index),
                Standing::Unknown => self.shared.readiness.set(self.index, false),
            }
            tokio::select! {
                changed = standing.changed() => if changed.is_err() { return false },
                _ = self.shared.draining.cancelled() => return false,
            }
        }
    }

    /// After our DISCONNECT, reads until the broker closes its end.
    ///
    /// The broker may still owe us acks, the PUBACK of the final "offline"
    /// above all. Closing our socket first answers them with a reset; a
    /// broker whose ack write fails treats the connection as lost before it
    /// reads the DISCONNECT, and fires the last will: a second "offline"
    /// (mosquitto 2.0 does this). A broker that never closes costs [`LINGER`].
    async fn linger(&mut self) {
        let until_closed = async {
            // The broker closes right after reading the DISCONNECT, so the
            // first error is the expected end of the stream.
            while self.eventloop.poll().await.is_ok() {}
        };
        if tokio::time::timeout(LINGER, until_closed).await.is_err() {
            tracing::debug!(project = %self.project, "broker kept the connection open after DISCONNECT");
        }
    }

    fn on_connected(&self) {
        let client = self.client.clone();
        let publisher = self.publisher.clone();
        let subscribe = !self.shared.draining.is_cancelled();
        let filters = self.subscriptions.clone();
        let status = topics::status_topic(&self.project);
        let online = presence::online(&self.shared.config.service_name);
        // Spawned: these wait for room in the client's queue, which only the
        // poll loop empties.
        tokio::spawn(async move {
            if subscribe {
                if let Err(e) = client.subscribe_many(&filters, QoS::AtLeastOnce).await {
                    tracing::warn!(error = %e, "cannot queue the subscription");
                }
            }
            let _ = publisher.publish(OutKind::Status, &status, online).await;
        });
    }

    fn on_message(&self, publish: Message) {
        let metrics = &self.shared.metrics;
        metrics.message_in(&self.project);
        let Some(ack) = self.acks.receive(&publish) else {
            return;
        };
        // The broker sets `retain` only when replaying a stored message to a
        // new subscription: a stale request (or a stale "clear_history")
        // that must not run again on every reconnect.
        if publish.retain {
            tracing::warn!(project = %self.project, topic = %publish.topic, "ignoring a retained message");
            metrics.dropped("retained");
            return;
        }
        let binding = self.shared.config.identity_binding;
        if let Some(input) = identity::input(&self.project, &publish.topic, binding) {
            self.on_user_input(&publish.payload, &publish.properties, ack, input);
        } else if let Some((kind, topic_sid)) = control::match_topic(&self.project, &publish.topic)
        {
            self.on_control(kind, topic_sid, &publish.payload, ack);
        } else if let Some(session_id) = cancel::match_topic(&self.project, &publish.topic) {
            // Acknowledged at once (`ack` dropped): a cancel is done when read.
            self.on_cancel(session_id, &publish.payload);
        } else {
            tracing::debug!(project = %self.project, topic = %publish.topic, "message on an unexpected topic");
            metrics.dropped("unknown_topic");
        }
    }

    fn on_user_input(
        &self,
        payload: &[u8],
        properties: &mqtt::RequestProperties,
        ack: Ack,
        input: identity::Input<'_>,
    ) {
        let config = &self.shared.config;
        let metrics = &self.shared.metrics;
        let parsed = request::parse(
            &self.project,
            payload,
            config.max_payload_bytes,
            properties,
            request::fresh_session_id,
        );
        match identity::apply(&self.project, config.identity_binding, input, parsed) {
            Parsed::Drop(reason) => {
                tracing::warn!(project = %self.project, reason = reason.as_str(), bytes = payload.len(), "request dropped");
                metrics.dropped(reason.as_str());
            }
            Parsed::Reject {
                reply_topic,
                correlation_data,
                error_text,
            } => {
                tracing::info!(project = %self.project, %reply_topic, error = %error_text, "request refused");
                metrics.error(ErrorKind::InvalidArgument.as_str());
                let _ = self.publisher.try_publish_error(
                    &reply_topic,
                    &correlation_data,
                    ErrorKind::InvalidArgument,
                    &error_text,
                );
            }
            Parsed::Chat(turn) => {
                let permit = if self.shared.draining.is_cancelled() {
                    if ack.redeliverable() {
                        // The next consumer gets it from the broker.
                        metrics.dropped("left_to_next_consumer");
                        ack.withhold();
                        return;
                    }
                    Err(ErrorKind::ShuttingDown)
                } else {
                    self.shared
                        .backlog
                        .try_admit()
                        .ok_or(ErrorKind::BacklogFull)
                };
                let permit = match permit {
                    Ok(permit) => permit,
                    Err(kind) => {
                        metrics.error(kind.as_str());
                        // Old clients know this string and retry later (with
                        // a shared group, possibly on another gateway).
                        tracing::warn!(project = %self.project, session_id = ?turn.session_id, "request refused: backlog full or shutting down");
                        let _ = self.publisher.try_publish_error(
                            &turn.reply_topic,
                            &turn.correlation_data,
                            kind,
                            OVERLOADED_TEXT,
                        );
                        return;
                    }
                };
                // Taken here, in arrival order, before the task exists.
                let ticket = self.shared.turns.ticket(&self.project, &turn.session_id);
                let registration = self.shared.turns.register(&self.project, &turn);
                let turns = self.shared.turns.clone();
                let publisher = self.publisher.clone();
                tokio::spawn(async move {
                    turns
                        .chat(publisher, turn, permit, ack, ticket, registration)
                        .await
                });
            }
        }
    }

    /// A cancel stops the turn it names, if that turn still runs here;
    /// anything else (unknown, finished, another client's) is a no-op.
    fn on_cancel(&self, session_id: &str, payload: &[u8]) {
        let metrics = &self.shared.metrics;
        if payload.len() > self.shared.config.max_payload_bytes {
            metrics.dropped(request::DropReason::TooLarge.as_str());
            return;
        }
        let Some(key) = TurnKey::parse(&self.project, session_id, payload) else {
            tracing::debug!(project = %self.project, session_id, "cancel without a request id ignored");
            metrics.dropped("cancel_unnamed");
            return;
        };
        let stopped = self.shared.turns.cancel(&key);
        tracing::debug!(project = %self.project, session_id, stopped, "cancel read");
    }

    fn on_control(
        &self,
        kind: control::ControlKind,
        topic_sid: Option<String>,
        payload: &[u8],
        ack: Ack,
    ) {
        let metrics = &self.shared.metrics;
        if self.shared.draining.is_cancelled() {
            metrics.dropped("shutting_down");
            ack.withhold();
            return;
        }
        let request = match control::parse(
            &self.project,
            kind,
            topic_sid,
            payload,
            self.shared.config.max_payload_bytes,
        ) {
            Ok(r) => r,
            Err(reason) => {
                tracing::warn!(project = %self.project, ?kind, reason = reason.as_str(), "control message dropped");
                metrics.dropped(reason.as_str());
                return;
            }
        };
        let session = request.op.session_id();
        if let Err(limit) = self.shared.control_rate.admit(&self.project, session) {
            tracing::warn!(project = %self.project, ?kind, session_id = ?session, reason = limit.as_str(), "control message dropped: rate limit");
            metrics.dropped(limit.as_str());
            return;
        }
        let Some(permit) = self.shared.backlog.try_admit() else {
            tracing::warn!(project = %self.project, ?kind, "control message dropped: backlog full");
            metrics.dropped("backlog_full");
            return;
        };
        // A session's control action takes its place in the session's line
        // like a chat message: a template or a clear sent just before a
        // message is applied before that message is stored, and one sent
        // just after waits for it to be stored.
        let ticket = request
            .op
            .session_id()
            .map(|sid| self.shared.turns.ticket(&self.project, sid));
        let turns = self.shared.turns.clone();
        let publisher = self.publisher.clone();
        tokio::spawn(async move { turns.control(publisher, request, permit, ack, ticket).await });
    }
}

/// Aborts a helper task when the link's run ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
