//! One active consumer per project, so that several gateways keep a
//! session's messages in the order the broker delivered them.
//!
//! A `$share` subscription hands consecutive messages of one session to
//! different gateways, whose turns then race into the history. Instead the
//! gateways of a deployment share one MQTT client id per project (one
//! persistent session at the broker) and a lease per project, held through
//! session-svc (`Sessions/HoldLease`, kept in Redis): only the holder
//! connects. The others are hot standbys that ask for the lease every third
//! of its TTL. When the holder stops (drained, it releases the lease; dead,
//! the lease runs out), a standby takes it and connects with the same client
//! id: the broker delivers what it queued meanwhile, and re-delivers what the
//! old holder received but had not finished (requests are acknowledged only
//! once answered), in their original order.
//!
//! A holder that cannot renew gives the project up after half the TTL, well
//! before anyone else can take it over.

use std::time::Duration;

use palaver_core::auth::Channel;
use palaver_proto::session::v1::sessions_client::SessionsClient;
use palaver_proto::session::v1::LeaseRequest;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Where this process stands with a project's lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// Not known yet (no answer from session-svc so far).
    Unknown,
    /// This process holds it: it consumes the project.
    Holder,
    /// Another process holds it; this one takes over when it is free.
    Standby,
}

/// The lease of one project's consumer, held for this process.
pub struct ConsumerLease {
    sessions: SessionsClient<Channel>,
    name: String,
    holder: String,
    ttl: Duration,
    standing: watch::Sender<Standing>,
}

impl ConsumerLease {
    /// The lease of `project` for `holder` (unique per process).
    pub fn new(
        sessions: SessionsClient<Channel>,
        project: &str,
        holder: &str,
        ttl: Duration,
    ) -> Self {
        Self {
            sessions,
            name: format!("gateway/{project}"),
            holder: holder.to_owned(),
            ttl,
            standing: watch::Sender::new(Standing::Unknown),
        }
    }

    /// Where this process stands with the lease, as it changes.
    pub fn standing(&self) -> watch::Receiver<Standing> {
        self.standing.subscribe()
    }

    fn stand(&self, standing: Standing) {
        self.standing
            .send_if_modified(|s| std::mem::replace(s, standing) != standing);
    }

    /// Takes and renews the lease until `stop`, then leaves it held (see
    /// [`ConsumerLease::release`]) so that the project is not taken over
    /// while this gateway still drains.
    pub async fn keep(&self, stop: CancellationToken) {
        let every = self.ttl / 3;
        let mut last_renewed: Option<Instant> = None;
        loop {
            let asked = Instant::now();
            match self.ask(self.ttl).await {
                Ok(true) => {
                    if last_renewed.is_none() {
                        tracing::info!(lease = %self.name, "took the project's lease: consuming");
                    }
                    last_renewed = Some(asked);
                    self.stand(Standing::Holder);
                }
                Ok(false) => {
                    if last_renewed.take().is_some() {
                        tracing::warn!(lease = %self.name, "lost the project's lease: standing by");
                    }
                    self.stand(Standing::Standby);
                }
                Err(status) => {
                    // Give the project up before another gateway may take it.
                    if last_renewed.is_some_and(|t| t.elapsed() > self.ttl / 2) {
                        tracing::warn!(lease = %self.name, error = %status.message(),
                            "cannot renew the project's lease: standing by");
                        last_renewed = None;
                        self.stand(Standing::Unknown);
                    } else {
                        tracing::debug!(lease = %self.name, error = %status.message(), "lease call failed");
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep_until(asked + every) => {}
                _ = stop.cancelled() => return,
            }
        }
    }

    /// Gives the lease up (after draining), so a standby takes over at once.
    pub async fn release(&self) {
        if *self.standing.borrow() == Standing::Holder {
            if let Err(status) = self.ask(Duration::ZERO).await {
                tracing::warn!(lease = %self.name, error = %status.message(),
                    "could not release the lease; a standby takes over when it runs out");
            }
        }
        self.stand(Standing::Unknown);
    }

    async fn ask(&self, ttl: Duration) -> Result<bool, tonic::Status> {
        let mut request = tonic::Request::new(LeaseRequest {
            name: self.name.clone(),
            holder: self.holder.clone(),
            ttl_ms: u32::try_from(ttl.as_millis()).unwrap_or(u32::MAX),
        });
        // An answer later than this is no use for renewing in time.
        request.set_timeout(self.ttl / 3);
        let reply = self.sessions.clone().hold_lease(request).await?;
        Ok(reply.into_inner().held)
    }
}
