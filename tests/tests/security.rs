//! Every link over TLS, and gRPC behind bearer tokens, with real servers and
//! certificates made here: inference-svc and session-svc with mutual TLS and
//! tokens, session-svc on Redis over `rediss://`, inference-svc's model
//! server over HTTPS, the gateway on mosquitto over `mqtts://` with a login.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use palaver_core::auth::{Bearer, ClientAuthArgs, ServerAuthArgs};
use palaver_core::tls::{ClientTlsArgs, ServerTlsArgs};
use palaver_proto::session::v1::sessions_client::SessionsClient;
use palaver_proto::session::v1::{ChatRequest, SessionRef};
use palaver_testkit::fake_vllm::{FakeVllm, FakeVllmConfig};
use palaver_testkit::mqtt::TestClient;
use palaver_testkit::process::free_port;
use prometheus_client::registry::Registry;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use serde_json::json;
use session_svc::keys::KeySpace;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::Code;

/// A CA, a server certificate for 127.0.0.1/localhost and a client
/// certificate, as PEM files in a fresh directory.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "palaver-sec-{name}-{}-{:08x}",
            std::process::id(),
            rand_u32()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |file: &str, text: String| std::fs::write(dir.join(file), text).unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, format!("palaver test CA {name}"));
        write("ca.pem", ca.self_signed(&ca_key).unwrap().pem());
        let issuer = Issuer::new(ca, ca_key);
        for (who, sans) in [
            (
                "server",
                vec!["localhost".to_owned(), "127.0.0.1".to_owned()],
            ),
            ("client", vec!["palaver-client".to_owned()]),
        ] {
            let key = KeyPair::generate().unwrap();
            let cert = CertificateParams::new(sans)
                .unwrap()
                .signed_by(&key, &issuer)
                .unwrap();
            write(&format!("{who}.pem"), cert.pem());
            write(&format!("{who}-key.pem"), key.serialize_pem());
        }
        Self { dir }
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    fn server_tls(&self, mutual: bool) -> ServerTlsArgs {
        ServerTlsArgs {
            tls_cert_file: Some(self.path("server.pem")),
            tls_key_file: Some(self.path("server-key.pem")),
            tls_client_ca_file: mutual.then(|| self.path("ca.pem")),
        }
    }

    fn client_tls(&self, with_cert: bool) -> ClientTlsArgs {
        ClientTlsArgs {
            tls_ca_file: Some(self.path("ca.pem")),
            tls_client_cert_file: with_cert.then(|| self.path("client.pem")),
            tls_client_key_file: with_cert.then(|| self.path("client-key.pem")),
        }
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn rand_u32() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos()
}

fn tokens_file(dir: &Path) -> ServerAuthArgs {
    let path = dir.join("tokens.toml");
    std::fs::write(
        &path,
        "[tokens]\n\"chat-token-1\" = \"chat\"\n\"admin-token-1\" = \"admin\"\n",
    )
    .unwrap();
    ServerAuthArgs {
        auth_tokens_file: Some(path),
    }
}

/// A child process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn wait_port(port: u16) {
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("nothing listens on port {port}");
}

/// redis-server with only a TLS port (clients need no certificate).
async fn redis_tls(pki: &Pki) -> (Proc, u16) {
    let port = free_port();
    let child = Command::new("redis-server")
        .args(["--port", "0", "--tls-port", &port.to_string()])
        .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .arg("--tls-cert-file")
        .arg(pki.path("server.pem"))
        .arg("--tls-key-file")
        .arg(pki.path("server-key.pem"))
        .arg("--tls-ca-cert-file")
        .arg(pki.path("ca.pem"))
        .args(["--tls-auth-clients", "no"])
        .arg("--dir")
        .arg(&pki.dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server");
    let proc = Proc(child);
    wait_port(port).await;
    (proc, port)
}

/// A TLS front for `backend`: what a model server behind HTTPS looks like.
async fn https_front(pki: &Pki, backend: SocketAddr) -> SocketAddr {
    use rustls_pki::pem::PemObject;
    let certs = rustls_pki::CertificateDer::pem_file_iter(pki.path("server.pem"))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = rustls_pki::PrivateKeyDer::from_pem_file(pki.path("server-key.pem")).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                if let Ok(mut up) = tokio::net::TcpStream::connect(backend).await {
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
                }
            });
        }
    });
    addr
}

use rustls::pki_types as rustls_pki;

/// inference-svc (fake vLLM behind HTTPS) and session-svc (Redis over TLS),
/// both gRPC over mutual TLS with tokens; session-svc's client of
/// inference-svc uses a client certificate and a chat token.
struct SecureStack {
    pki: Pki,
    session_url: String,
    inference_url: String,
    _redis: Proc,
    _vllm: FakeVllm,
    stop: CancellationToken,
}

impl Drop for SecureStack {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn secure_stack() -> SecureStack {
    let pki = Pki::new("stack");
    let stop = CancellationToken::new();
    let auth = tokens_file(&pki.dir);

    let vllm = FakeVllm::start(FakeVllmConfig {
        ttft: Duration::ZERO,
        tpot: Duration::ZERO,
        tokens: 2,
        ..FakeVllmConfig::default()
    })
    .await;
    let front = https_front(&pki, vllm.addr()).await;
    let mut inference =
        inference_svc::Config::openai(format!("https://localhost:{}", front.port()));
    inference.vllm_ca_file = Some(pki.path("ca.pem"));
    let inference = inference_svc::Server::new(inference, &mut Registry::default()).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let inference_port = listener.local_addr().unwrap().port();
    let security = inference_svc::Security {
        tls: pki.server_tls(true).server_config().unwrap(),
        auth: auth
            .layer(inference_svc::CHAT_METHODS, None, "inference-svc")
            .unwrap(),
    };
    tokio::spawn(inference.serve_secured(listener, security, stop.clone()));

    let (redis, redis_port) = redis_tls(&pki).await;
    let store = session_svc::RedisStore::connect_tls(
        &format!("rediss://127.0.0.1:{redis_port}/0"),
        KeySpace::new("sec"),
        Some(&pki.path("ca.pem")),
    )
    .await
    .expect("session-svc reaches Redis over TLS");
    let mut config = session_svc::Config::new(format!("https://127.0.0.1:{inference_port}"));
    config.inference_tls = pki.client_tls(true);
    config.inference_token = Bearer::new("chat-token-1").unwrap();
    let session = session_svc::Server::new(config, store, &mut Registry::default()).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let session_url = format!(
        "https://localhost:{}",
        listener.local_addr().unwrap().port()
    );
    let security = session_svc::Security {
        tls: pki.server_tls(true).server_config().unwrap(),
        auth: auth
            .layer(session_svc::CHAT_METHODS, None, "session-svc")
            .unwrap(),
    };
    tokio::spawn(session.serve_secured(listener, security, stop.clone()));
    SecureStack {
        pki,
        session_url,
        inference_url: format!("https://localhost:{inference_port}"),
        _redis: redis,
        _vllm: vllm,
        stop,
    }
}

impl SecureStack {
    async fn client(
        &self,
        tls: ClientTlsArgs,
        token: Option<&str>,
    ) -> SessionsClient<palaver_core::auth::Channel> {
        let channel = tls.endpoint(&self.session_url).unwrap().connect_lazy();
        let bearer = token.map_or(Bearer::none(), |t| Bearer::new(t).unwrap());
        SessionsClient::with_interceptor(channel, bearer)
    }
}

fn chat(session: &str) -> ChatRequest {
    ChatRequest {
        project: "general".into(),
        session_id: session.into(),
        message: "hello".into(),
        ..ChatRequest::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_and_tokens_on_every_grpc_link_with_rediss_and_an_https_model() {
    let stack = secure_stack().await;

    // A chat token through mTLS: session-svc (over rediss://) asks
    // inference-svc (over mTLS with its token), which asks the HTTPS model.
    let mut c = stack
        .client(stack.pki.client_tls(true), Some("chat-token-1"))
        .await;
    let reply = c
        .chat(chat("s1"))
        .await
        .expect("chat over TLS")
        .into_inner();
    assert!(!reply.text.is_empty(), "{reply:?}");
    let history = c
        .get_history(SessionRef {
            project: "general".into(),
            session_id: "s1".into(),
        })
        .await
        .expect("chat may read history");
    assert_eq!(history.into_inner().messages.len(), 2);

    // Tokens: none, unknown, and chat on an admin method.
    let mut none = stack.client(stack.pki.client_tls(true), None).await;
    assert_eq!(
        none.chat(chat("s2")).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    let mut wrong = stack
        .client(stack.pki.client_tls(true), Some("chat-token-2"))
        .await;
    assert_eq!(
        wrong.chat(chat("s2")).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    let denied = c
        .delete_session(SessionRef {
            project: "general".into(),
            session_id: "s1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    let mut admin = stack
        .client(stack.pki.client_tls(true), Some("admin-token-1"))
        .await;
    admin
        .delete_session(SessionRef {
            project: "general".into(),
            session_id: "s1".into(),
        })
        .await
        .expect("admin may delete");

    // Health stays open: no token.
    let channel = stack
        .pki
        .client_tls(true)
        .endpoint(&stack.session_url)
        .unwrap()
        .connect_lazy();
    let health = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect("health without a token");
    assert_eq!(health.into_inner().status, 1, "SERVING");

    // inference-svc wants a token too; its health does not.
    use palaver_proto::inference::v1::inference_client::InferenceClient;
    use palaver_proto::inference::v1::{ChatMessage, GenerateRequest, Sampling};
    let channel = stack
        .pki
        .client_tls(true)
        .endpoint(&stack.inference_url)
        .unwrap()
        .connect_lazy();
    let generate = || GenerateRequest {
        messages: vec![ChatMessage {
            role: "user".into(),
            content: "hi".into(),
        }],
        sampling: Some(Sampling {
            temperature: 0.5,
            top_p: 1.0,
            max_tokens: 8,
        }),
        ..GenerateRequest::default()
    };
    let err = InferenceClient::new(channel.clone())
        .generate(generate())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    let mut chat_client =
        InferenceClient::with_interceptor(channel.clone(), Bearer::new("chat-token-1").unwrap());
    chat_client
        .generate(generate())
        .await
        .expect("a chat token may generate");
    let mut too_many = generate();
    too_many.sampling.as_mut().unwrap().max_tokens = u32::MAX;
    let err = chat_client.generate(too_many).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect("inference-svc health without a token");

    // Mutual TLS: without a client certificate the handshake is refused.
    // (TLS 1.3 lets the client finish first; the server then closes.)
    let mut no_cert = stack
        .client(stack.pki.client_tls(false), Some("admin-token-1"))
        .await;
    let err = no_cert.chat(chat("s3")).await.unwrap_err();
    // When the server's alert arrives after the request went out, hyper
    // reports it as a transport error on the call instead.
    assert!(
        matches!(err.code(), Code::Unavailable | Code::Cancelled)
            || format!("{err:?}").contains("CertificateRequired"),
        "{err:?}"
    );

    // A client trusting another CA does not talk to this server.
    let other = Pki::new("other");
    let mut stranger = stack
        .client(other.client_tls(true), Some("admin-token-1"))
        .await;
    let err = stranger.chat(chat("s4")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
}

#[test]
fn an_https_url_is_tls_or_an_error_never_plaintext() {
    let pki = Pki::new("urls");
    // TLS files with an http:// URL would be silently unused: refused.
    assert!(pki
        .client_tls(false)
        .endpoint("http://127.0.0.1:1")
        .is_err());
    // An unreadable CA file is a startup error, not a fallback.
    let missing = ClientTlsArgs {
        tls_ca_file: Some(pki.path("nope.pem")),
        ..ClientTlsArgs::default()
    };
    let err = missing
        .endpoint("https://127.0.0.1:1")
        .unwrap_err()
        .to_string();
    assert!(err.contains("nope.pem"), "{err}");
    // The gateway and session-svc refuse the same at construction.
    let mut config =
        gateway::Config::new("127.0.0.1", 1, "http://127.0.0.1:1", vec!["general".into()]);
    config.session_tls = pki.client_tls(false);
    assert!(gateway::Gateway::new(config, &mut Registry::default()).is_err());
    let mut config = session_svc::Config::new("http://127.0.0.1:1");
    config.inference_tls = pki.client_tls(false);
    assert!(session_svc::Server::new(
        config,
        session_svc::MemoryStore::new(),
        &mut Registry::default()
    )
    .is_err());
    // A client token flag and file are read; a token with a space is refused.
    let args = ClientAuthArgs {
        auth_token: Some("two words".into()),
        auth_token_file: None,
    };
    assert!(args.bearer().is_err());
}

#[tokio::test]
async fn https_grpc_to_a_plaintext_server_fails_instead_of_downgrading() {
    let pki = Pki::new("plain");
    let session = session_svc::Server::new(
        session_svc::Config::new("http://127.0.0.1:1"),
        session_svc::MemoryStore::new(),
        &mut Registry::default(),
    )
    .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let stop = CancellationToken::new();
    tokio::spawn(session.serve(listener, stop.clone()));
    let channel = pki
        .client_tls(false)
        .endpoint(&format!("https://127.0.0.1:{port}"))
        .unwrap()
        .connect_lazy();
    let err = SessionsClient::new(channel)
        .get_history(SessionRef {
            project: "general".into(),
            session_id: "x".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    stop.cancel();
}

/// mosquitto with a plain listener for the test's end user and a TLS listener
/// with a password file for the gateway.
async fn mosquitto_tls(pki: &Pki) -> (Proc, u16, u16) {
    let (plain, tls) = (free_port(), free_port());
    let passwd = pki.path("passwd");
    std::fs::write(&passwd, "").unwrap();
    let status = Command::new("mosquitto_passwd")
        .arg("-b")
        .arg(&passwd)
        .args(["gateway", "gw-secret"])
        .status()
        .expect("mosquitto_passwd");
    assert!(status.success());
    let conf = pki.path("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "per_listener_settings true\npersistence false\n\
             listener {plain} 127.0.0.1\nallow_anonymous true\n\
             listener {tls} 127.0.0.1\nallow_anonymous false\npassword_file {}\n\
             cafile {}\ncertfile {}\nkeyfile {}\n",
            passwd.display(),
            pki.path("ca.pem").display(),
            pki.path("server.pem").display(),
            pki.path("server-key.pem").display(),
        ),
    )
    .unwrap();
    let child = Command::new("mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("mosquitto");
    let proc = Proc(child);
    wait_port(plain).await;
    wait_port(tls).await;
    (proc, plain, tls)
}

fn gateway_args(pki: &Pki, tls_port: u16, session_url: &str, ca: &Path) -> gateway::GatewayArgs {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        g: gateway::GatewayArgs,
    }
    let ca = ca.display().to_string();
    let cert = pki.path("client.pem").display().to_string();
    let key = pki.path("client-key.pem").display().to_string();
    Cli::parse_from([
        "gateway",
        "--mqtt-url",
        &format!("mqtts://localhost:{tls_port}"),
        "--mqtt-ca-file",
        &ca,
        "--mqtt-username",
        "gateway",
        "--session-url",
        session_url,
        "--tls-ca-file",
        &pki.path("ca.pem").display().to_string(),
        "--tls-client-cert-file",
        &cert,
        "--tls-client-key-file",
        &key,
        "--project",
        "general",
    ])
    .g
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_answers_over_mqtts_with_a_login_and_refuses_a_wrong_ca() {
    let stack = secure_stack().await;
    let (_broker, plain, tls) = mosquitto_tls(&stack.pki).await;
    let token = stack.pki.path("gateway-token");
    // Admin: the gateway relays the control topics too.
    std::fs::write(&token, "admin-token-1\n").unwrap();
    let password = stack.pki.path("mqtt-password");
    std::fs::write(&password, "gw-secret\n").unwrap();

    let mut args = gateway_args(
        &stack.pki,
        tls,
        &stack.session_url,
        &stack.pki.path("ca.pem"),
    );
    args.mqtt_password_file = Some(password.clone());
    args.session_auth.auth_token_file = Some(token);
    let config = args.into_config().expect("gateway config");
    let gateway = gateway::Gateway::new(config, &mut Registry::default()).unwrap();
    let ready = gateway.ready();
    let stop = CancellationToken::new();
    let run = tokio::spawn(gateway.run(stop.clone()));
    tokio::time::timeout(Duration::from_secs(10), ready)
        .await
        .expect("the gateway subscribes over mqtts://");

    let mut user = TestClient::connect(plain, "sec-user").await;
    user.subscribe("general/assistant_response/#").await;
    user.publish(
        "general/user_input",
        json!({"message": "hello over TLS", "sessionId": "m1"}).to_string(),
    )
    .await;
    let reply = user
        .recv(Duration::from_secs(10))
        .await
        .expect("a reply through mqtts:// and gRPC over mTLS");
    assert_eq!(reply.topic, "general/assistant_response/m1");
    assert!(!reply.payload.starts_with("Error"), "{}", reply.payload);
    user.subscribe("general/hint/#").await;
    user.publish("general/template/m1", "Answer in French.")
        .await;
    let ack = user
        .recv(Duration::from_secs(10))
        .await
        .expect("a template relayed with the gateway's admin token is acknowledged");
    assert_eq!(ack.topic, "general/hint/m1", "{}", ack.payload);
    stop.cancel();
    let _ = run.await;

    // Another CA: the handshake fails, and the error says why.
    let other = Pki::new("wrong-ca");
    let mut args = gateway_args(&stack.pki, tls, &stack.session_url, &other.path("ca.pem"));
    args.mqtt_password_file = Some(password);
    let config = args.into_config().unwrap();
    let (_client, mut events) = gateway::mqtt::Client::new(&config, "general", 10);
    let err = tokio::time::timeout(Duration::from_secs(10), events.poll())
        .await
        .expect("the handshake ends")
        .expect_err("a broker signed by another CA is refused");
    let text = format!("{err}: {err:?}");
    assert!(
        text.contains("UnknownIssuer") || text.contains("invalid peer certificate"),
        "{text}"
    );
}

#[tokio::test]
async fn reset_session_holds_the_prompt_limit_and_services_bind_loopback_by_default() {
    use clap::Parser;
    use palaver_proto::session::v1::ResetSessionRequest;
    let session = session_svc::Server::new(
        session_svc::Config::new("http://127.0.0.1:1"),
        session_svc::MemoryStore::new(),
        &mut Registry::default(),
    )
    .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    tokio::spawn(session.serve(listener, stop.clone()));
    let mut c = SessionsClient::connect(url).await.unwrap();
    let reset = |chars: usize| ResetSessionRequest {
        project: "general".into(),
        session_id: "r".into(),
        system_prompt: Some("x".repeat(chars)),
        ..ResetSessionRequest::default()
    };
    let err = c.reset_session(reset(32_001)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    c.reset_session(reset(32_000)).await.expect("at the limit");
    stop.cancel();

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        listen: session_svc::ListenArgs,
    }
    let cli = Cli::parse_from(["session-svc"]);
    assert!(
        cli.listen.listen.ip().is_loopback(),
        "{}",
        cli.listen.listen
    );
}
