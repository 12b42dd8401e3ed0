//! One trace per turn: a turn through the whole stack (MQTT → gateway →
//! session-svc → inference-svc → fake vLLM) reaches an in-test OTLP
//! collector as one trace, with each span under its own service and parent
//! links that follow the turn; the model server gets that trace's
//! `traceparent`. With tracing off nothing is exported.
//!
//! Each test runs its own runtime whose threads use its own subscriber
//! (rather than the process-wide one), so the two cannot see each other's
//! spans; the exporter lives on a second runtime, as it needs one to exist
//! before the subscriber can be built.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value, KeyValue};
use opentelemetry_proto::tonic::trace::v1::Span;
use palaver_core::telemetry::{OtlpArgs, Tracing};
use palaver_testkit::fake_vllm::Fault;
use palaver_tests::{Stack, StackOptions};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

/// The tests share the process's exporter threads (checked by the second):
/// one at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Spans received, each with the `service.name` of its resource.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<(String, Span)>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .as_ref()
                .and_then(|r| text(&r.attributes, "service.name"))
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    spans.push((service.clone(), span));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Collector {
    /// Serves OTLP/gRPC on a free port; returns its URL.
    async fn start(&self) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let incoming = TcpListenerStream::new(listener);
        let service = TraceServiceServer::new(self.clone());
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(incoming)
                .await
                .unwrap();
        });
        url
    }

    fn spans(&self) -> Vec<(String, Span)> {
        self.spans.lock().unwrap().clone()
    }
}

fn text(attributes: &[KeyValue], key: &str) -> Option<String> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
        .map(|v| match v {
            any_value::Value::StringValue(s) => s.clone(),
            other => format!("{other:?}"),
        })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A runtime whose every thread (workers and blocking pool) uses `dispatch`.
fn runtime_with(dispatch: tracing::Dispatch) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .on_thread_start(move || {
            // Lives as long as the thread.
            std::mem::forget(tracing::dispatcher::set_default(&dispatch));
        })
        .build()
        .unwrap()
}

fn exporter_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

/// One turn over MQTT, with a request id; waits for its reply.
async fn one_turn(stack: &Stack) {
    let mut client = stack.mqtt().await;
    client.subscribe("general/assistant_response/#").await;
    client
        .publish(
            "general/user_input",
            json!({"message": "hello", "sessionId": "traced", "requestId": "r-1", "clientId": "npc-7"})
                .to_string(),
        )
        .await;
    let reply = client
        .recv(Duration::from_secs(10))
        .await
        .expect("a reply within 10 s");
    assert!(!reply.payload.starts_with("Error"), "{}", reply.payload);
}

/// The names every turn's trace has, in `(service, span)` pairs.
const EXPECTED: &[(&str, &str)] = &[
    ("palaver-gateway", "turn"),
    ("session-svc", "turn"),
    ("session-svc", "phase1"),
    ("session-svc", "generate"),
    ("session-svc", "phase3"),
    ("inference-svc", "queue"),
    ("inference-svc", "generation"),
];

#[test]
fn a_turn_is_one_trace_across_the_three_services_and_the_model_server() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let exporter_rt = exporter_runtime();
    let collector = Collector::default();
    let traces = exporter_rt.block_on(async {
        let url = collector.start().await;
        let args = OtlpArgs {
            otlp_endpoint: Some(url),
            ..OtlpArgs::default()
        };
        Tracing::start(
            &args,
            &[gateway::TRACED, session_svc::TRACED, inference_svc::TRACED],
        )
        .unwrap()
        .expect("an endpoint turns tracing on")
    });
    let dispatch = tracing::Dispatch::new(traces.subscriber("warn"));
    let rt = runtime_with(dispatch.clone());
    let _here = tracing::dispatcher::set_default(&dispatch);

    let traceparent = rt.block_on(async {
        let stack = Stack::start(StackOptions::replying_after(Duration::from_millis(20))).await;
        one_turn(&stack).await;
        let traceparent = stack.vllm.last_traceparent();
        stack.stop().await;
        traceparent
    });

    // Spans leave in batches: flush until the whole turn is there.
    let mut spans = Vec::new();
    for _ in 0..50 {
        exporter_rt.block_on(traces.flush());
        spans = collector.spans();
        let complete = EXPECTED.iter().all(|(service, name)| {
            spans
                .iter()
                .any(|(s, span)| s == service && span.name == *name)
        });
        if complete {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    exporter_rt.block_on(traces.shutdown());

    let find = |service: &str, name: &str| -> Span {
        let found: Vec<&Span> = spans
            .iter()
            .filter(|(s, span)| s == service && span.name == name)
            .map(|(_, span)| span)
            .collect();
        assert_eq!(
            found.len(),
            1,
            "one {name} span from {service}; got {:?}",
            spans
                .iter()
                .map(|(s, span)| format!("{s}/{}", span.name))
                .collect::<Vec<_>>()
        );
        found[0].clone()
    };
    let gateway_turn = find("palaver-gateway", "turn");
    let session_turn = find("session-svc", "turn");
    let phase1 = find("session-svc", "phase1");
    let generate = find("session-svc", "generate");
    let phase3 = find("session-svc", "phase3");
    let queue = find("inference-svc", "queue");
    let generation = find("inference-svc", "generation");

    let trace = &gateway_turn.trace_id;
    for span in [
        &session_turn,
        &phase1,
        &generate,
        &phase3,
        &queue,
        &generation,
    ] {
        assert_eq!(
            &span.trace_id, trace,
            "{} is in the turn's trace",
            span.name
        );
    }
    assert!(
        gateway_turn.parent_span_id.is_empty(),
        "the gateway's turn is the root"
    );
    let child_of = |child: &Span, parent: &Span, what: &str| {
        assert_eq!(
            hex(&child.parent_span_id),
            hex(&parent.span_id),
            "{what}: {} under {}",
            child.name,
            parent.name
        );
    };
    child_of(&session_turn, &gateway_turn, "over gRPC");
    child_of(&phase1, &session_turn, "in session-svc");
    child_of(&generate, &session_turn, "in session-svc");
    child_of(&phase3, &session_turn, "in session-svc");
    child_of(&generation, &generate, "over gRPC");
    child_of(&queue, &generation, "in inference-svc");

    let attribute = |span: &Span, key: &str| text(&span.attributes, key);
    assert_eq!(attribute(&gateway_turn, "outcome").as_deref(), Some("ok"));
    assert_eq!(
        attribute(&gateway_turn, "project").as_deref(),
        Some("general")
    );
    assert_eq!(
        attribute(&gateway_turn, "request_id").as_deref(),
        Some("r-1")
    );
    assert_eq!(
        attribute(&gateway_turn, "client_id").as_deref(),
        Some("npc-7")
    );
    assert_eq!(
        attribute(&gateway_turn, "trace_id"),
        Some(hex(trace)),
        "the id log lines carry"
    );
    assert_eq!(
        attribute(&generation, "finish_reason").as_deref(),
        Some("stop")
    );
    assert!(attribute(&generation, "model").is_some());
    assert!(attribute(&generation, "ttft_ms").is_some());

    assert_eq!(
        traceparent,
        Some(format!("00-{}-{}-01", hex(trace), hex(&generation.span_id))),
        "vLLM's spans join the turn under inference-svc's generation"
    );
}

/// Log lines, as the services would write them to stderr.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_warning_inside_a_turn_names_its_trace_at_the_default_log_level() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let exporter_rt = exporter_runtime();
    let collector = Collector::default();
    let traces = exporter_rt.block_on(async {
        let args = OtlpArgs {
            otlp_endpoint: Some(collector.start().await),
            ..OtlpArgs::default()
        };
        Tracing::start(&args, &[gateway::TRACED]).unwrap().unwrap()
    });
    let logs = Captured::default();
    let writer = logs.clone();
    // `info`, as the services run: the turn's span itself is at debug.
    let dispatch =
        tracing::Dispatch::new(traces.subscriber_writing_to("info", move || writer.clone(), false));
    let rt = runtime_with(dispatch.clone());
    let _here = tracing::dispatcher::set_default(&dispatch);
    rt.block_on(async {
        let stack = Stack::start(StackOptions::replying_after(Duration::from_millis(20))).await;
        stack.vllm.set_fault(Fault::ContextTooLong);
        let mut client = stack.mqtt().await;
        client.subscribe("general/assistant_response/#").await;
        client
            .publish(
                "general/user_input",
                json!({"message": "hello", "sessionId": "failing"}).to_string(),
            )
            .await;
        let reply = client.recv(Duration::from_secs(10)).await.expect("a reply");
        assert!(reply.payload.starts_with("Error"), "{}", reply.payload);
        stack.stop().await;
    });
    exporter_rt.block_on(traces.shutdown());
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let line = text
        .lines()
        .find(|l| l.contains("turn failed"))
        .unwrap_or_else(|| panic!("no warning for the failed turn in:\n{text}"));
    assert!(
        line.contains("turn{") && line.contains("trace_id="),
        "{line}"
    );
}

#[test]
fn with_tracing_off_nothing_is_exported_and_no_exporter_runs() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let rt = runtime_with(tracing::Dispatch::none());
    rt.block_on(async {
        let off = Tracing::start(
            &OtlpArgs::default(),
            &[gateway::TRACED, session_svc::TRACED, inference_svc::TRACED],
        )
        .unwrap();
        assert!(off.is_none(), "no endpoint, no exporter");
        let stack = Stack::start(StackOptions::replying_after(Duration::from_millis(20))).await;
        one_turn(&stack).await;
        assert_eq!(
            stack.vllm.last_traceparent(),
            None,
            "no trace context leaves"
        );
        stack.stop().await;
    });
    // The SDK's batch exporter is a thread of its own: none may run.
    let exporters: Vec<String> = std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with("OpenTelemetry"))
        .collect();
    assert!(exporters.is_empty(), "exporter threads: {exporters:?}");
}

/// An MQTT 5 request's `traceparent` user property (issue 25): the client's
/// trace is the parent of the gateway's turn, so a client that traces its
/// own work sees palaver's spans inside it.
#[test]
fn an_mqtt5_requests_traceparent_is_the_parent_of_its_turn() {
    use palaver_tests::v5::V5Client;
    use rumqttc::v5::mqttbytes::v5::PublishProperties;

    const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const CLIENT_SPAN: &str = "00f067aa0ba902b7";
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let exporter_rt = exporter_runtime();
    let collector = Collector::default();
    let traces = exporter_rt.block_on(async {
        let args = OtlpArgs {
            otlp_endpoint: Some(collector.start().await),
            ..OtlpArgs::default()
        };
        Tracing::start(&args, &[gateway::TRACED]).unwrap().unwrap()
    });
    let dispatch = tracing::Dispatch::new(traces.subscriber("warn"));
    let rt = runtime_with(dispatch.clone());
    let _here = tracing::dispatcher::set_default(&dispatch);
    rt.block_on(async {
        let stack = Stack::start(StackOptions {
            gateway: Box::new(|c| c.mqtt_protocol = gateway::config::Protocol::V5),
            ..StackOptions::replying_after(Duration::from_millis(20))
        })
        .await;
        let mut listener = stack.mqtt().await;
        listener.subscribe("general/assistant_response/#").await;
        let client = V5Client::connect(stack.broker.port(), "traced-v5").await;
        let properties = PublishProperties {
            user_properties: vec![(
                "traceparent".into(),
                format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"),
            )],
            ..Default::default()
        };
        client
            .request(
                json!({"message": "hello", "sessionId": "traced-5", "requestId": "r-5"}),
                properties,
            )
            .await;
        let reply = listener
            .recv(Duration::from_secs(10))
            .await
            .expect("a reply within 10 s");
        assert!(!reply.payload.starts_with("Error"), "{}", reply.payload);
        client.disconnect().await;
        stack.stop().await;
    });

    let mut turn = None;
    for _ in 0..50 {
        exporter_rt.block_on(traces.flush());
        turn = collector
            .spans()
            .into_iter()
            .map(|(_, span)| span)
            .find(|span| span.name == "turn");
        if turn.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    exporter_rt.block_on(traces.shutdown());
    let turn = turn.expect("the gateway's turn span was exported");
    assert_eq!(hex(&turn.trace_id), CLIENT_TRACE, "the client's trace");
    assert_eq!(
        hex(&turn.parent_span_id),
        CLIENT_SPAN,
        "under the client's span"
    );
}
