//! `palaver health` as a container healthcheck runs it: the built binary
//! against a real gRPC server with the standard health service, and against
//! the probe routes that the gateway serves beside /metrics.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use tokio::process::Command;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;

const PALAVER: &str = env!("CARGO_BIN_EXE_palaver");
const SERVICE: &str = "palaver.test.v1.Probe";

/// Runs `palaver health ARGS` with none of the caller's `PALAVER_*`
/// settings; returns its exit code and stdout + stderr.
async fn health(args: &[&str]) -> (i32, String) {
    let mut cmd = Command::from(palaver_testkit::process::palaver_command(PALAVER));
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        cmd.arg("health").args(args).kill_on_drop(true).output(),
    )
    .await
    .expect("palaver health returns in time")
    .expect("palaver health runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().expect("exited, not killed"), text)
}

/// An address where nothing listens: bound once, then released.
fn closed_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

#[tokio::test]
async fn grpc_probe_follows_the_serving_status() {
    let incoming = TcpIncoming::bind("127.0.0.1:0".parse().unwrap()).expect("bind");
    let addr = incoming.local_addr().expect("addr").to_string();
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status(SERVICE, ServingStatus::Serving)
        .await;
    let stop = CancellationToken::new();
    let server = tokio::spawn({
        let stop = stop.clone();
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, async move { stop.cancelled().await })
    });

    let (code, out) = health(&["--grpc", &addr]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("SERVING"), "{out}");

    let url = format!("http://{addr}");
    let (code, out) = health(&["--grpc", &url, "--service", SERVICE]).await;
    assert_eq!(code, 0, "an http:// address works too: {out}");

    reporter
        .set_service_status(SERVICE, ServingStatus::NotServing)
        .await;
    let (code, out) = health(&["--grpc", &addr, "--service", SERVICE]).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("NOT_SERVING"), "{out}");

    let (code, out) = health(&["--grpc", &addr, "--service", "no.such.Service"]).await;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("NotFound"),
        "an unknown service is named: {out}"
    );

    stop.cancel();
    server.await.expect("server task").expect("server ran");
    let (code, out) = health(&["--grpc", &closed_port().to_string()]).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("cannot connect"), "{out}");
}

#[tokio::test]
async fn http_probe_follows_readiness() {
    let (ready, rx) = watch::channel(false);
    let stop = CancellationToken::new();
    let addr = palaver_core::telemetry::spawn_metrics_and_probes(
        "127.0.0.1:0".parse().unwrap(),
        Arc::new(Registry::default()),
        Some(rx),
        stop.clone(),
    )
    .await
    .expect("serve probes");
    let readyz = format!("http://{addr}/readyz");
    let healthz = format!("http://{addr}/healthz");

    let (code, out) = health(&["--http", &readyz]).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("503"), "{out}");
    let (code, out) = health(&["--http", &healthz]).await;
    assert_eq!(code, 0, "alive while not ready: {out}");

    ready.send_replace(true);
    let (code, out) = health(&["--http", &readyz]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("200"), "{out}");

    let (code, out) = health(&["--http", &format!("http://{addr}/nope")]).await;
    assert_eq!(code, 1, "a 404 is not healthy: {out}");

    stop.cancel();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (code, out) = health(&["--http", &format!("http://{}/readyz", closed_port())]).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("cannot connect"), "{out}");
}

#[tokio::test]
async fn both_probes_must_pass_and_one_is_needed() {
    let (code, out) = health(&[]).await;
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("--grpc"), "says what to give: {out}");

    let (ready, rx) = watch::channel(true);
    let stop = CancellationToken::new();
    let addr = palaver_core::telemetry::spawn_metrics_and_probes(
        "127.0.0.1:0".parse().unwrap(),
        Arc::new(Registry::default()),
        Some(rx),
        stop.clone(),
    )
    .await
    .expect("serve probes");
    let readyz = format!("http://{addr}/readyz");
    let dead = closed_port().to_string();
    let (code, out) = health(&["--http", &readyz, "--grpc", &dead]).await;
    assert_eq!(code, 1, "one failing probe fails the whole: {out}");
    assert!(
        out.contains("200") && out.contains("cannot connect"),
        "{out}"
    );
    drop(ready);
    stop.cancel();
}
