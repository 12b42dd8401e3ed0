//! `palaver-lab otlp-sink`: an OTLP/gRPC trace receiver that only counts
//! what it is sent, so the cost of tracing can be measured with a real
//! exporter on the other end and no collector's own work in the figures.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use tokio_stream::wrappers::TcpListenerStream;

#[derive(Debug, clap::Args)]
pub struct OtlpSinkArgs {
    /// Address to receive OTLP/gRPC on; port 0 picks a free one, printed as
    /// `otlp-sink ready url=http://IP:PORT`.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
}

/// Spans and export calls received.
#[derive(Default, Clone)]
struct Counts {
    spans: Arc<AtomicU64>,
    exports: Arc<AtomicU64>,
}

#[tonic::async_trait]
impl TraceService for Counts {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let spans: usize = request
            .get_ref()
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        self.spans.fetch_add(spans as u64, Ordering::Relaxed);
        self.exports.fetch_add(1, Ordering::Relaxed);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// Serves until SIGINT/SIGTERM, then prints what it received.
pub async fn run(args: OtlpSinkArgs) -> ExitCode {
    let listener = match tokio::net::TcpListener::bind(args.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "palaver-lab otlp-sink: cannot listen on {}: {e}",
                args.listen
            );
            return ExitCode::FAILURE;
        }
    };
    let addr = listener
        .local_addr()
        .expect("a bound socket has an address");
    eprintln!("otlp-sink ready url=http://{addr}");
    let counts = Counts::default();
    let stop = palaver_core::shutdown::on_signal();
    let served = tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(counts.clone()))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), stop.cancelled_owned())
        .await;
    println!(
        "{{\"spans\": {}, \"exports\": {}}}",
        counts.spans.load(Ordering::Relaxed),
        counts.exports.load(Ordering::Relaxed)
    );
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("palaver-lab otlp-sink: {e}");
            ExitCode::FAILURE
        }
    }
}
