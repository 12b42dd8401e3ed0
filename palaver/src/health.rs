//! `palaver health`: one probe of a running service, for container
//! healthchecks (the image has no curl or grpcurl) and for scripts.
//!
//! `--grpc ADDR` asks the standard `grpc.health.v1` service that session-svc
//! and inference-svc serve; `--http URL` GETs a URL such as the gateway's
//! `/readyz`. Both repeat. Exit 0 when every probe given says healthy, 1
//! otherwise (2: nothing to probe), with one line per probe saying what was
//! found.

use std::process::ExitCode;
use std::time::Duration;

use tonic::transport::Endpoint;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// Flags of `palaver health`.
#[derive(Debug, Clone, clap::Args)]
pub struct HealthArgs {
    /// gRPC server to ask with grpc.health.v1/Check, as host:port or
    /// http://host:port (session-svc: 127.0.0.1:50051, inference-svc:
    /// 127.0.0.1:50052). Repeatable (comma-separated in the environment): every
    /// one must be SERVING.
    #[arg(
        long,
        value_name = "ADDR",
        env = "PALAVER_HEALTH_GRPC",
        value_delimiter = ','
    )]
    pub grpc: Vec<String>,

    /// Service name to ask the gRPC server about. Empty (the default) means the
    /// server as a whole: SERVING while it listens. palaver.session.v1.Sessions
    /// or palaver.inference.v1.Inference turns NOT_SERVING as soon as the
    /// service starts draining on SIGTERM: use that for readiness.
    #[arg(long, value_name = "NAME", default_value = "")]
    pub service: String,

    /// URL to GET; any 2xx answer is healthy, e.g. the gateway's
    /// http://127.0.0.1:9100/readyz (or /healthz for liveness). Repeatable
    /// (comma-separated in the environment): every one must answer 2xx.
    #[arg(
        long,
        value_name = "URL",
        env = "PALAVER_HEALTH_HTTP",
        value_delimiter = ','
    )]
    pub http: Vec<String>,

    /// Give up on each probe after this many milliseconds (connecting included).
    #[arg(long, env = "PALAVER_HEALTH_TIMEOUT_MS", default_value_t = 3000)]
    pub timeout_ms: u64,
}

/// What one probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The target says it is healthy.
    Healthy(String),
    /// The target answered but is not healthy, or could not be reached.
    Unhealthy(String),
}

/// Runs the probes that `args` names and prints one line for each.
pub async fn run(args: HealthArgs) -> ExitCode {
    if args.grpc.is_empty() && args.http.is_empty() {
        eprintln!(
            "palaver health: nothing to probe: give --grpc ADDR and/or --http URL \
             (or PALAVER_HEALTH_GRPC / PALAVER_HEALTH_HTTP)"
        );
        return ExitCode::from(2);
    }
    let timeout = Duration::from_millis(args.timeout_ms.max(1));
    let mut verdicts = Vec::new();
    for addr in &args.grpc {
        verdicts.push(check_grpc(addr, &args.service, timeout).await);
    }
    for url in &args.http {
        verdicts.push(check_http(url, timeout).await);
    }
    let mut healthy = true;
    for verdict in verdicts {
        match verdict {
            Verdict::Healthy(line) => println!("{line}"),
            Verdict::Unhealthy(line) => {
                healthy = false;
                println!("{line}");
            }
        }
    }
    if healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Asks `addr` over `grpc.health.v1` about `service`; only SERVING is healthy.
pub async fn check_grpc(addr: &str, service: &str, timeout: Duration) -> Verdict {
    let url = if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    };
    let endpoint = match Endpoint::from_shared(url.clone()) {
        Ok(e) => e.connect_timeout(timeout).timeout(timeout),
        Err(e) => return Verdict::Unhealthy(format!("gRPC {url}: not a usable address: {e}")),
    };
    let what = if service.is_empty() {
        format!("gRPC {url}")
    } else {
        format!("gRPC {url} service {service:?}")
    };
    // The whole probe, connection included, stays within one timeout so a
    // healthcheck never outlives the interval it runs in.
    let probe = async {
        let channel = endpoint.connect().await.map_err(|e| {
            format!(
                "cannot connect: {}",
                std::error::Error::source(&e).map_or_else(|| e.to_string(), |s| s.to_string())
            )
        })?;
        HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .map(|r| r.into_inner().status)
            .map_err(|s| format!("health check failed: {:?}: {}", s.code(), s.message()))
    };
    match tokio::time::timeout(timeout, probe).await {
        Err(_) => Verdict::Unhealthy(format!("{what}: no answer within {timeout:?}")),
        Ok(Err(why)) => Verdict::Unhealthy(format!("{what}: {why}")),
        Ok(Ok(status)) => {
            let name = ServingStatus::try_from(status)
                .map(|s| s.as_str_name())
                .unwrap_or("an unknown status");
            if status == ServingStatus::Serving as i32 {
                Verdict::Healthy(format!("{what}: {name}"))
            } else {
                Verdict::Unhealthy(format!("{what}: {name}"))
            }
        }
    }
}

/// GETs `url`; a 2xx status is healthy. The body's first line is shown.
pub async fn check_http(url: &str, timeout: Duration) -> Verdict {
    let client = match reqwest::Client::builder().timeout(timeout).build() {
        Ok(c) => c,
        Err(e) => return Verdict::Unhealthy(format!("HTTP {url}: no HTTP client: {e}")),
    };
    let response = match client.get(url).send().await {
        Ok(r) => r,
        Err(e) => {
            let why = if e.is_timeout() {
                format!("no answer within {timeout:?}")
            } else if e.is_builder() {
                format!("not a usable URL: {e}")
            } else {
                format!(
                    "cannot connect: {}",
                    std::error::Error::source(&e).map_or_else(|| e.to_string(), |s| s.to_string())
                )
            };
            return Verdict::Unhealthy(format!("HTTP {url}: {why}"));
        }
    };
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    let first = body.lines().next().unwrap_or("").trim();
    let line = if first.is_empty() {
        format!("HTTP {url}: {status}")
    } else {
        format!("HTTP {url}: {status} {first}")
    };
    if status.is_success() {
        Verdict::Healthy(line)
    } else {
        Verdict::Unhealthy(line)
    }
}
