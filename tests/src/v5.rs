//! An MQTT 5 client for the end-to-end tests (rumqttc's v5 client), the
//! counterpart of the testkit's 3.1.1 [`crate::TestClient`]: requests with
//! MQTT 5 properties, answers with theirs.

use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::{Filter, Packet, Publish, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tokio::sync::mpsc;

/// How long a test waits for the broker's answers.
const WAIT: Duration = Duration::from_secs(10);

/// A message's topic as text.
pub fn topic(p: &Publish) -> String {
    String::from_utf8_lossy(&p.topic).into_owned()
}

/// An MQTT 5 client whose received messages queue up for the test.
pub struct V5Client {
    client: AsyncClient,
    messages: mpsc::UnboundedReceiver<Publish>,
    subacks: mpsc::UnboundedReceiver<()>,
    poller: tokio::task::JoinHandle<()>,
}

impl V5Client {
    pub async fn connect(port: u16, id: &str) -> Self {
        Self::connect_with(port, id, |_| {}).await
    }

    pub async fn connect_with(port: u16, id: &str, tweak: impl FnOnce(&mut MqttOptions)) -> Self {
        let mut opts = MqttOptions::new(id, "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(30));
        tweak(&mut opts);
        let (client, mut eventloop) = AsyncClient::new(opts, 256);
        let (msg_tx, messages) = mpsc::unbounded_channel();
        let (ack_tx, subacks) = mpsc::unbounded_channel();
        let (conn_tx, conn_rx) = tokio::sync::oneshot::channel();
        let poller = tokio::spawn(async move {
            let mut conn_tx = Some(conn_tx);
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        if let Some(tx) = conn_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let _ = msg_tx.send(p);
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = ack_tx.send(());
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        tokio::time::timeout(WAIT, conn_rx)
            .await
            .expect("broker accepted the v5 client in time")
            .expect("poller alive");
        Self {
            client,
            messages,
            subacks,
            poller,
        }
    }

    pub async fn subscribe(&mut self, filter: &str) {
        self.client
            .subscribe_many([Filter::new(filter, QoS::AtLeastOnce)])
            .await
            .expect("subscribe queued");
        tokio::time::timeout(WAIT, self.subacks.recv())
            .await
            .expect("SubAck in time")
            .expect("poller alive");
    }

    /// Publishes a request at QoS 1 with these properties.
    pub async fn request(&self, payload: serde_json::Value, properties: PublishProperties) {
        self.client
            .publish_with_properties(
                "general/user_input",
                QoS::AtLeastOnce,
                false,
                payload.to_string(),
                properties,
            )
            .await
            .expect("publish queued");
    }

    pub async fn recv(&mut self, timeout: Duration) -> Option<Publish> {
        tokio::time::timeout(timeout, self.messages.recv())
            .await
            .ok()
            .flatten()
    }

    /// The next message not on a status topic (heartbeats come any time).
    pub async fn answer(&mut self) -> Publish {
        loop {
            let p = self.recv(WAIT).await.expect("an answer in time");
            if !topic(&p).ends_with("/status") {
                return p;
            }
        }
    }

    pub async fn disconnect(self) {
        let _ = self.client.disconnect().await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        self.poller.abort();
    }
}

impl Drop for V5Client {
    fn drop(&mut self) {
        self.poller.abort();
    }
}
