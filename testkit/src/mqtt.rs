//! An MQTT client for tests: everything the broker delivers queues up for
//! the test to read, with a timestamp.

use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// One message received from the broker.
#[derive(Debug, Clone)]
pub struct Received {
    pub topic: String,
    pub payload: String,
    pub at: Instant,
}

/// An MQTT client whose received messages queue up for the test to read.
pub struct TestClient {
    client: AsyncClient,
    messages: mpsc::UnboundedReceiver<Received>,
    subacks: mpsc::UnboundedReceiver<()>,
    poller: tokio::task::JoinHandle<()>,
}

impl TestClient {
    /// Connects to the broker on `port` and waits for its ConnAck.
    pub async fn connect(port: u16, client_id: &str) -> Self {
        let mut opts = MqttOptions::new(client_id, "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_max_packet_size(4 << 20, 4 << 20);
        let (client, mut eventloop) = AsyncClient::new(opts, 1024);
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
                        let _ = msg_tx.send(Received {
                            topic: p.topic.clone(),
                            payload: String::from_utf8_lossy(&p.payload).into_owned(),
                            at: Instant::now(),
                        });
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = ack_tx.send(());
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), conn_rx)
            .await
            .expect("broker accepted the test client in time")
            .expect("poller alive");
        Self {
            client,
            messages,
            subacks,
            poller,
        }
    }

    /// Subscribes at QoS 1 and waits for the SubAck.
    pub async fn subscribe(&mut self, filter: &str) {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .expect("subscribe queued");
        tokio::time::timeout(Duration::from_secs(10), self.subacks.recv())
            .await
            .expect("SubAck in time")
            .expect("poller alive");
    }

    /// Publishes at QoS 1.
    pub async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.into())
            .await
            .expect("publish queued");
    }

    /// Publishes at QoS 1 with the retain flag: the broker keeps it and
    /// replays it to every later subscriber.
    pub async fn publish_retained(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, true, payload.into())
            .await
            .expect("publish queued");
    }

    /// The next message, or `None` after `timeout`.
    pub async fn recv(&mut self, timeout: Duration) -> Option<Received> {
        tokio::time::timeout(timeout, self.messages.recv())
            .await
            .ok()
            .flatten()
    }

    /// Receives `n` messages, panicking if they do not all come within `timeout`.
    pub async fn recv_n(&mut self, n: usize, timeout: Duration) -> Vec<Received> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv(left).await {
                Some(m) => out.push(m),
                None => panic!(
                    "got {} of {n} messages within {timeout:?}: {out:#?}",
                    out.len()
                ),
            }
        }
        out
    }

    /// Everything that arrives within `window`.
    pub async fn drain(&mut self, window: Duration) -> Vec<Received> {
        let deadline = Instant::now() + window;
        let mut out = Vec::new();
        while let Some(m) = self
            .recv(deadline.saturating_duration_since(Instant::now()))
            .await
        {
            out.push(m);
        }
        out
    }
}

impl Drop for TestClient {
    fn drop(&mut self) {
        self.poller.abort();
    }
}
