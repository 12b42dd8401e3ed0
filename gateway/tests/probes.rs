//! The gateway's HTTP probes against a real mosquitto: `/readyz` answers 200
//! only while every project is subscribed, and flips with the broker;
//! `/healthz` answers while the process serves. No session-svc is needed:
//! the gateway connects to it lazily (and runs without the consumer lease,
//! which is held through session-svc).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use gateway::{Config, Gateway};
use palaver_testkit::process::Mosquitto;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(15);

/// GET `path` over plain HTTP/1.1; returns the status code.
async fn get(addr: SocketAddr, path: &str) -> u16 {
    let mut stream = TcpStream::connect(addr).await.expect("probe port open");
    let request = format!("GET {path} HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .expect("read response");
    response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"))
}

/// Polls `path` until it answers `want`, or fails after [`WAIT`].
async fn wait_for(addr: SocketAddr, path: &str, want: u16, why: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let got = get(addr, path).await;
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{path} still answers {got}, not {want}: {why}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn readyz_follows_the_subscriptions() {
    let mut broker = Mosquitto::start().expect("mosquitto starts (scripts/test installs it)");
    let mut config = Config::new(
        "127.0.0.1",
        broker.port(),
        "http://127.0.0.1:1",
        vec!["general".into(), "npc".into()],
    );
    config.keep_alive = gateway::mqtt::MIN_V5_KEEP_ALIVE;
    config.consumer_lease = None;
    let mut registry = Registry::default();
    let gateway = Gateway::new(config, &mut registry).expect("gateway settings");
    let stop = CancellationToken::new();
    let probes = palaver_core::telemetry::spawn_metrics_and_probes(
        "127.0.0.1:0".parse().unwrap(),
        Arc::new(registry),
        Some(gateway.ready_watch()),
        stop.clone(),
    )
    .await
    .expect("serve probes");

    assert_eq!(
        get(probes, "/readyz").await,
        503,
        "not ready before running"
    );
    assert_eq!(get(probes, "/healthz").await, 200);
    assert_eq!(get(probes, "/metrics").await, 200);

    let gateway_stop = CancellationToken::new();
    let run = tokio::spawn(gateway.run(gateway_stop.clone()));
    wait_for(probes, "/readyz", 200, "both projects subscribe").await;

    broker.stop();
    wait_for(probes, "/readyz", 503, "the broker is gone").await;
    assert_eq!(get(probes, "/healthz").await, 200, "alive while not ready");

    broker.start_again().expect("mosquitto restarts");
    wait_for(probes, "/readyz", 200, "resubscribed after the restart").await;

    gateway_stop.cancel();
    tokio::time::timeout(WAIT, run)
        .await
        .expect("gateway stops in time")
        .expect("gateway task")
        .expect("gateway ran");
    assert_eq!(get(probes, "/readyz").await, 503, "not ready once stopped");
    stop.cancel();
}
