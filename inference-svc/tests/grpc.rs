//! inference-svc over real gRPC, in front of the fake vLLM over real HTTP.

use std::time::{Duration, Instant};

use futures::StreamExt;
use inference_svc::{Config, Server};
use palaver_core::{ERROR_KIND_HEADER, ERROR_KIND_OVERLOADED};
use palaver_proto::inference::v1::inference_client::InferenceClient;
use palaver_proto::inference::v1::{ChatMessage, GenerateRequest, Sampling};
use palaver_testkit::fake_vllm::{FakeVllm, FakeVllmConfig, Fault, Reply};
use prometheus_client::registry::Registry;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::Code;

struct Running {
    client: InferenceClient<Channel>,
    addr: std::net::SocketAddr,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
    registry: Registry,
}

async fn start(config: Config) -> Running {
    let mut registry = Registry::default();
    let server = Server::new(config, &mut registry).expect("valid config");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(server.serve(listener, shutdown.clone()));
    let client = InferenceClient::connect(format!("http://{addr}"))
        .await
        .expect("connect");
    Running {
        client,
        addr,
        shutdown,
        task,
        registry,
    }
}

fn request(text: &str, max_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        messages: vec![
            ChatMessage {
                role: "system".into(),
                content: "You are terse.".into(),
            },
            ChatMessage {
                role: "user".into(),
                content: text.into(),
            },
        ],
        sampling: Some(Sampling {
            temperature: 0.0,
            top_p: 0.5,
            max_tokens,
        }),
        request_id: "req-42".into(),
        affinity_key: "session-1".into(),
        client: String::new(),
    }
}

fn fast_openai(fake: &FakeVllm) -> Config {
    let mut c = Config::openai(format!("{}/v1", fake.url()));
    c.first_token_timeout = Duration::from_secs(5);
    c.idle_timeout = Duration::from_secs(5);
    c.request_timeout = Duration::from_secs(10);
    c
}

fn metrics_text(registry: &Registry) -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry).unwrap();
    out
}

#[tokio::test]
async fn generate_sends_what_vllm_needs_and_returns_the_reply() {
    let fake = FakeVllm::start(FakeVllmConfig::default()).await;
    let mut s = start(fast_openai(&fake)).await;

    let reply = s
        .client
        .generate(request("hello there", 64))
        .await
        .unwrap()
        .into_inner();
    assert!(
        reply.text.starts_with("reply to: hello there"),
        "{}",
        reply.text
    );
    assert_eq!(reply.finish_reason, "stop");
    let usage = reply.usage.expect("usage");
    assert_eq!(usage.completion_tokens, 16);
    assert_eq!(usage.prompt_tokens, 5);

    let sent = fake.last_request().unwrap();
    assert_eq!(sent["model"], "fake-model", "discovered through /v1/models");
    assert_eq!(sent["stream"], true);
    assert_eq!(sent["stream_options"]["include_usage"], true);
    assert_eq!(sent["temperature"], 0.0);
    assert_eq!(sent["top_p"], 0.5);
    assert_eq!(sent["max_tokens"], 64);
    assert_eq!(sent["messages"][0]["role"], "system");
    assert_eq!(fake.last_request_id().as_deref(), Some("req-42"));

    // max_tokens cuts the reply.
    let reply = s
        .client
        .generate(request("hi", 3))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.text, "reply to: hi");
    assert_eq!(reply.finish_reason, "length");

    let metrics = metrics_text(&s.registry);
    assert!(
        metrics.contains("palaver_inference_requests_total{outcome=\"ok\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("palaver_inference_in_flight 0"),
        "{metrics}"
    );
    s.shutdown.cancel();
    s.task.await.unwrap().unwrap();
}

#[tokio::test]
async fn generate_stream_streams_and_strips_think_across_chunks() {
    let fake = FakeVllm::start(FakeVllmConfig {
        reply: Reply::Chunks(vec![
            "<thi".into(),
            "nk>the user wants".into(),
            " a greeting</th".into(),
            "ink>\n\nHel".into(),
            "lo!".into(),
        ]),
        ..FakeVllmConfig::default()
    })
    .await;
    let mut s = start(fast_openai(&fake)).await;
    let mut stream = s
        .client
        .generate_stream(request("hi", 64))
        .await
        .unwrap()
        .into_inner();
    let mut chunks = Vec::new();
    while let Some(c) = stream.next().await {
        chunks.push(c.unwrap());
    }
    let text: String = chunks.iter().map(|c| c.delta.as_str()).collect();
    assert_eq!(text, "Hello!");
    assert!(chunks.len() >= 2, "streamed in pieces: {chunks:?}");
    let last = chunks.last().unwrap();
    assert_eq!(last.finish_reason, "stop");
    assert!(last.usage.is_some());
    assert!(chunks[..chunks.len() - 1]
        .iter()
        .all(|c| c.finish_reason.is_empty()));
}

/// A reply that is all reasoning (a thinking model out of max_tokens inside
/// `<think>`) is an error, not an empty answer.
#[tokio::test]
async fn a_reply_that_is_all_reasoning_is_an_error() {
    for chunks in [
        vec!["<think>the user wants".to_owned(), " a greeting".to_owned()],
        vec!["<think>done</think>".to_owned(), "\n\n".to_owned()],
    ] {
        let fake = FakeVllm::start(FakeVllmConfig {
            reply: Reply::Chunks(chunks.clone()),
            ..FakeVllmConfig::default()
        })
        .await;
        let mut s = start(fast_openai(&fake)).await;
        let err = s.client.generate(request("hi", 64)).await.unwrap_err();
        assert_eq!(err.code(), Code::Internal, "{chunks:?}");
        assert!(
            err.message().contains("had no text outside its reasoning"),
            "{chunks:?}: {}",
            err.message()
        );
    }
}

#[tokio::test]
async fn never_more_than_max_concurrent_generations_reach_vllm() {
    let fake = FakeVllm::start(FakeVllmConfig {
        ttft: Duration::from_millis(50),
        tpot: Duration::from_millis(10),
        tokens: 10,
        ..FakeVllmConfig::default()
    })
    .await;
    let mut config = fast_openai(&fake);
    config.max_concurrent = 3;
    let s = start(config).await;
    let started = Instant::now();
    let calls: Vec<_> = (0..9)
        .map(|i| {
            let mut client = s.client.clone();
            tokio::spawn(async move { client.generate(request(&format!("m{i}"), 64)).await })
        })
        .collect();
    for c in calls {
        c.await.unwrap().unwrap();
    }
    let elapsed = started.elapsed();
    assert_eq!(
        fake.max_in_flight(),
        3,
        "the limit is reached and never passed"
    );
    assert_eq!(fake.requests(), 9);
    // Three waves of ~140 ms (50 ms ttft + 9 × 10 ms); one wave would be ~140 ms.
    assert!(elapsed >= Duration::from_millis(3 * 140), "{elapsed:?}");
}

#[tokio::test]
async fn a_full_queue_is_refused_as_overloaded() {
    let fake = FakeVllm::start(FakeVllmConfig {
        ttft: Duration::from_millis(500),
        ..FakeVllmConfig::default()
    })
    .await;
    let mut config = fast_openai(&fake);
    config.max_concurrent = 1;
    config.max_queue = 0;
    let s = start(config).await;
    let mut busy = s.client.clone();
    let running = tokio::spawn(async move { busy.generate(request("first", 8)).await });
    while fake.in_flight() == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let err = s
        .client
        .clone()
        .generate(request("second", 8))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert_eq!(
        err.metadata()
            .get(ERROR_KIND_HEADER)
            .and_then(|v| v.to_str().ok()),
        Some(ERROR_KIND_OVERLOADED)
    );
    running.await.unwrap().unwrap();
    let metrics = metrics_text(&s.registry);
    assert!(
        metrics.contains("palaver_inference_errors_total{kind=\"queue_full\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn vllm_errors_map_to_status_codes() {
    let fake = FakeVllm::start(FakeVllmConfig::default()).await;
    let mut s = start(fast_openai(&fake)).await;

    fake.set_fault(Fault::ContextTooLong);
    let err = s.client.generate(request("x", 8)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(err.message(), "the conversation is too long for the model");

    fake.set_fault(Fault::Status(
        500,
        r#"{"object":"error","message":"engine dead","type":"InternalServerError","code":500}"#
            .into(),
    ));
    let err = s.client.generate(request("x", 8)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    // A server error's body (stack traces, addresses) stays in the log.
    assert_eq!(err.message(), "the model server failed (500)");

    // The server over its own capacity: overloaded, like a full queue here.
    for code in [429, 503] {
        fake.set_fault(Fault::Status(
            code,
            r#"{"error":{"message":"too many waiting requests","code":503}}"#.into(),
        ));
        let err = s.client.generate(request("x", 8)).await.unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted, "{code}");
        assert_eq!(
            err.metadata()
                .get(ERROR_KIND_HEADER)
                .and_then(|v| v.to_str().ok()),
            Some(ERROR_KIND_OVERLOADED),
            "{code}"
        );
    }

    fake.set_fault(Fault::ErrorMidStream);
    let err = s.client.generate(request("x", 8)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    let mut stream = s
        .client
        .generate_stream(request("one two three four", 64))
        .await
        .unwrap()
        .into_inner();
    let mut text = String::new();
    let status = loop {
        match stream.next().await {
            Some(Ok(c)) => text.push_str(&c.delta),
            Some(Err(status)) => break status,
            None => panic!("stream ended without the error"),
        }
    };
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        text.starts_with("reply to:"),
        "chunks before the error: {text:?}"
    );

    // vLLM finishing a reply with "abort" cut it short: no reply, either way.
    fake.set_fault(Fault::AbortMidStream);
    let err = s.client.generate(request("x", 8)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.message().contains("aborted"), "{}", err.message());
    let mut stream = s
        .client
        .generate_stream(request("one two three four", 64))
        .await
        .unwrap()
        .into_inner();
    let status = loop {
        match stream.next().await {
            Some(Ok(c)) => assert!(c.finish_reason.is_empty(), "finished: {c:?}"),
            Some(Err(status)) => break status,
            None => panic!("stream ended without the error"),
        }
    };
    assert_eq!(status.code(), Code::Unavailable);

    fake.set_fault(Fault::None);
    let mut config = fast_openai(&fake);
    config.model = Some("not-served".into());
    let mut other = start(config).await;
    let err = other.client.generate(request("x", 8)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.message().contains("not-served"), "{}", err.message());
}

#[tokio::test]
async fn a_dropped_connection_is_retried_once_then_unavailable() {
    let fake = FakeVllm::start(FakeVllmConfig::default()).await;
    let mut config = fast_openai(&fake);
    config.model = Some("fake-model".into());
    let mut s = start(config).await;
    fake.set_fault(Fault::Drop);
    let err = s.client.generate(request("x", 8)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(fake.requests(), 2, "one retry, no more");

    // A status that arrived is never retried.
    fake.reset_stats();
    fake.set_fault(Fault::Status(500, "{}".into()));
    let err = s.client.generate(request("x", 8)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert_eq!(fake.requests(), 1);

    fake.shutdown().await;
    let err = s.client.generate(request("x", 8)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(
        err.message().contains("cannot connect"),
        "{}",
        err.message()
    );
}

#[tokio::test]
async fn timeouts_are_deadline_exceeded_and_free_the_slot() {
    let fake = FakeVllm::start(FakeVllmConfig {
        tpot: Duration::from_millis(400),
        tokens: 5,
        ..FakeVllmConfig::default()
    })
    .await;
    let mut config = fast_openai(&fake);
    config.max_concurrent = 1;
    config.first_token_timeout = Duration::from_millis(200);
    config.idle_timeout = Duration::from_millis(150);
    let mut s = start(config).await;

    // Stalls between tokens (400 ms > 150 ms idle).
    let started = Instant::now();
    let err = s.client.generate(request("x", 8)).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded);
    assert!(err.message().contains("stalled"), "{}", err.message());
    assert!(started.elapsed() < Duration::from_millis(400 + 300));

    // Never sends the first token.
    fake.set_fault(Fault::Hang);
    let started = Instant::now();
    let err = s.client.generate(request("x", 8)).await.unwrap_err();
    let waited = started.elapsed();
    assert_eq!(err.code(), Code::DeadlineExceeded);
    assert!(
        err.message().contains("no token within 200 ms"),
        "{}",
        err.message()
    );
    assert!(waited >= Duration::from_millis(200), "{waited:?}");
    assert!(waited < Duration::from_millis(200 + 500), "{waited:?}");
    // Giving up closed the connection, so vLLM stops working on it too.
    let deadline = Instant::now() + Duration::from_secs(2);
    while fake.in_flight() > 0 {
        assert!(Instant::now() < deadline, "hung vLLM request still counted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // The single slot is free again: a normal call is admitted at once.
    fake.set_fault(Fault::None);
    let reply = tokio::time::timeout(Duration::from_secs(3), s.client.generate(request("y", 1)))
        .await
        .expect("admitted");
    assert!(reply.is_ok(), "{reply:?}");
}

/// The whole reply's deadline: `request_timeout`, or longer when
/// `max_tokens` at `min_tokens_per_sec` needs it. The fake takes 20 ms to
/// its first token and 100 ms for each of the other four.
#[tokio::test]
async fn the_whole_reply_deadline_grows_with_max_tokens() {
    let fake = FakeVllm::start(FakeVllmConfig {
        ttft: Duration::from_millis(20),
        tpot: Duration::from_millis(100),
        tokens: 5,
        ..FakeVllmConfig::default()
    })
    .await;
    let mut config = fast_openai(&fake);
    config.first_token_timeout = Duration::from_millis(200);
    config.request_timeout = Duration::from_millis(300);
    config.min_tokens_per_sec = 50.0;
    let mut s = start(config).await;

    // 5 tokens: 200 ms + 5 / 50 s is no more than the 300 ms, and the
    // reply's 420 ms are past it.
    let err = s.client.generate(request("x", 5)).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded);
    assert!(
        err.message().contains("did not finish within 300 ms"),
        "{}",
        err.message()
    );

    // 40 tokens may take 200 ms + 40 / 50 s = 1 s: the same 420 ms reply
    // is in time.
    let reply = s.client.generate(request("x", 40)).await;
    assert!(reply.is_ok(), "{reply:?}");
}

#[tokio::test]
async fn a_client_that_leaves_aborts_the_vllm_request() {
    let fake = FakeVllm::start(FakeVllmConfig {
        tpot: Duration::from_millis(50),
        tokens: 200,
        ..FakeVllmConfig::default()
    })
    .await;
    let mut config = fast_openai(&fake);
    config.max_concurrent = 1;
    let mut s = start(config).await;
    let mut stream = s
        .client
        .generate_stream(request("long", 512))
        .await
        .unwrap()
        .into_inner();
    stream.next().await.unwrap().unwrap();
    assert_eq!(fake.in_flight(), 1);
    drop(stream);
    // vLLM sees the connection close within a token or two.
    let deadline = Instant::now() + Duration::from_secs(2);
    while fake.in_flight() > 0 {
        assert!(Instant::now() < deadline, "vLLM request still running");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // And the slot is free for the next caller.
    let next = tokio::time::timeout(
        Duration::from_secs(3),
        s.client.generate_stream(request("next", 1)),
    )
    .await
    .expect("admitted");
    assert!(next.is_ok());
    let metrics = metrics_text(&s.registry);
    assert!(
        metrics.contains("palaver_inference_requests_total{outcome=\"cancelled\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn simulator_health_and_shutdown() {
    let mut config = Config::sim();
    config.sim_ttft = Duration::from_millis(10);
    config.sim_tokens_per_sec = 1000.0;
    let mut s = start(config).await;
    let reply = s
        .client
        .generate(request("are you real?", 512))
        .await
        .unwrap()
        .into_inner();
    assert!(
        reply
            .text
            .starts_with("[simulated reply] You said: \"are you real?\""),
        "{}",
        reply.text
    );

    let err = s
        .client
        .generate(GenerateRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    let channel = Channel::from_shared(format!("http://{}", s.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let check = |service: &str| tonic_health::pb::HealthCheckRequest {
        service: service.into(),
    };
    let status = health
        .check(check("palaver.inference.v1.Inference"))
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    // Reflection lists the services, so grpcurl needs no proto files.
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let mut reflection = ServerReflectionClient::new(channel.clone());
    let ask = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = reflection
        .server_reflection_info(futures::stream::iter([ask]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        answers.next().await.unwrap().unwrap().message_response
    else {
        panic!("no service list");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in ["palaver.inference.v1.Inference", "grpc.health.v1.Health"] {
        assert!(names.iter().any(|n| n == expected), "{names:?}");
    }
    drop((answers, reflection));

    let mut watch = health.watch(check("")).await.unwrap().into_inner();
    watch.next().await.unwrap().unwrap();
    s.shutdown.cancel();
    let next = watch.next().await.unwrap().unwrap();
    assert_eq!(
        next.status,
        tonic_health::pb::health_check_response::ServingStatus::NotServing as i32
    );
    drop((watch, health, channel));
    tokio::time::timeout(Duration::from_secs(5), s.task)
        .await
        .expect("drained")
        .unwrap()
        .unwrap();
}
