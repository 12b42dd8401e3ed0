//! Turn integrity (DESIGN.md): one turn per request id, one owner per turn,
//! nothing orphaned whatever fails, bounded contention, and prompts every
//! chat template accepts.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::join_all;
use palaver_core::projects::Projects;
use palaver_proto::session::v1::sessions_client::SessionsClient;
use palaver_proto::session::v1::{ChatRequest, Role, SessionRef};
use palaver_testkit::fake_vllm::Fault;
use palaver_testkit::link::Link;
use palaver_tests::{Stack, StackOptions};
use prometheus_client::registry::Registry;
use serde_json::json;
use session_svc::dialog::{Dialog, Ending, Opened, Opening};
use session_svc::keys::KeySpace;
use session_svc::store::{Lease, LockAttempt, Quota, SessionId, Step, Store, StoreError};
use session_svc::RedisStore;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic::Code;

/// No rate limit and room for every message of these tests.
fn roomy_projects() -> Projects {
    Projects::from_toml(
        "[projects.general]\nrate_limit = 0\nmax_history_messages = 1000\nmax_history_tokens = 1000000\n",
    )
    .unwrap()
}

fn chat(session_id: &str, message: &str, request_id: &str) -> ChatRequest {
    ChatRequest {
        project: "general".into(),
        session_id: session_id.into(),
        message: message.into(),
        request_id: request_id.into(),
        ..Default::default()
    }
}

async fn history(c: &mut SessionsClient<Channel>, session_id: &str) -> Vec<(Role, String)> {
    c.get_history(SessionRef {
        project: "general".into(),
        session_id: session_id.into(),
    })
    .await
    .unwrap()
    .into_inner()
    .messages
    .into_iter()
    .map(|m| (m.role(), m.content))
    .collect()
}

/// Checks that `h` is whole pairs, each reply the echo of its own message,
/// and returns the messages in order.
fn pairs(h: &[(Role, String)]) -> Vec<String> {
    assert_eq!(h.len() % 2, 0, "a message without its reply: {h:?}");
    h.chunks(2)
        .map(|p| {
            assert_eq!((p[0].0, p[1].0), (Role::User, Role::Assistant), "{h:?}");
            assert!(
                p[1].1.contains(&p[0].1),
                "{:?} is not after {:?}",
                p[1].1,
                p[0].1
            );
            p[0].1.clone()
        })
        .collect()
}

/// Waits until `check` holds, or fails saying `what`.
async fn eventually<F, Fut>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !check().await {
        assert!(Instant::now() < deadline, "{what} within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The reproduction of a retry during generation: one slot, no queue, the
/// same payload published twice 100 ms apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_while_its_turn_generates_waits_for_it_and_gets_the_same_reply() {
    let latency = Duration::from_millis(800);
    let stack = Stack::start(StackOptions {
        inference: Box::new(|c| {
            c.max_concurrent = 1;
            c.max_queue = 0;
        }),
        ..StackOptions::replying_after(latency)
    })
    .await;
    let mut c = stack.mqtt().await;
    c.subscribe("general/assistant_response/dup/#").await;
    let payload = json!({"message": "once", "sessionId": "dup", "clientId": "c", "requestId": "r1",
        "replyTopic": "general/assistant_response/dup/c/r1"})
    .to_string();
    c.publish("general/user_input", payload.clone()).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    c.publish("general/user_input", payload).await;
    let replies = c.recv_n(2, latency * 5).await;
    assert_eq!(replies.len(), 2, "both publishes answered: {replies:?}");
    assert!(replies[0].payload.contains("once"), "{:?}", replies[0]);
    assert_eq!(replies[0].payload, replies[1].payload, "the same reply");
    assert_eq!(
        stack.vllm.requests(),
        1,
        "one generation for one request id"
    );
    let mut s = stack.sessions(0).await;
    assert_eq!(pairs(&history(&mut s, "dup").await), ["once"]);
}

/// The same when the first attempt fails: the retry gets the same error,
/// nothing is stored, and a retry after that starts a new turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_waiting_on_a_failing_turn_gets_the_same_error() {
    let latency = Duration::from_millis(600);
    let stack = Stack::start(StackOptions::with_backend(
        latency,
        Duration::from_millis(5),
        8,
    ))
    .await;
    stack.vllm.set_fault(Fault::ErrorMidStream);
    let s = stack.sessions(0).await;
    let first = {
        let mut s = s.clone();
        tokio::spawn(async move { s.chat(chat("fail", "doomed", "r1")).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let retry = s.clone().chat(chat("fail", "doomed", "r1")).await;
    let first = first.await.unwrap();
    let (a, b) = (first.unwrap_err(), retry.unwrap_err());
    assert_eq!(
        (a.code(), a.message()),
        (b.code(), b.message()),
        "the same error"
    );
    assert_eq!(stack.vllm.requests(), 1, "the retry did not generate");
    let mut s2 = s.clone();
    assert!(history(&mut s2, "fail").await.is_empty(), "taken back");

    stack.vllm.set_fault(Fault::None);
    let again = s.clone().chat(chat("fail", "doomed", "r1")).await.unwrap();
    assert!(again.into_inner().text.contains("doomed"));
    assert_eq!(pairs(&history(&mut s2, "fail").await), ["doomed"]);
}

/// Gemma's, Mistral's and other templates refuse two user turns in a row:
/// messages sent before the previous reply must still all be answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_messages_in_one_session_are_all_answered_by_a_strict_template() {
    let stack = Stack::start(StackOptions::replying_after(Duration::from_millis(300))).await;
    let mut c = stack.mqtt().await;
    c.subscribe("general/assistant_response/rapid").await;
    for i in 0..3 {
        let m = json!({"message": format!("rapid-{i}"), "sessionId": "rapid"});
        c.publish("general/user_input", m.to_string()).await;
    }
    let replies = c.recv_n(3, Duration::from_secs(10)).await;
    assert_eq!(replies.len(), 3);
    for r in &replies {
        assert!(!r.payload.starts_with("Error"), "{}", r.payload);
    }
    let mut s = stack.sessions(0).await;
    assert_eq!(
        pairs(&history(&mut s, "rapid").await),
        ["rapid-0", "rapid-1", "rapid-2"]
    );
}

/// Every call on one busy session ends within the swap's wait bound, as a
/// turn or as ABORTED, and the history holds exactly the turns that were
/// answered, each reply after its own message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_turns_on_one_session_end_within_the_bound() {
    let stack = Stack::start(StackOptions {
        projects: roomy_projects(),
        session_replicas: 2,
        ..StackOptions::replying_after(Duration::from_millis(20))
    })
    .await;
    let clients = [stack.sessions(0).await, stack.sessions(1).await];
    // The lock wait (3 s) bounds each of the two swaps; the rest is the
    // fake's 20 ms and queueing for 8 slots.
    let bound = Duration::from_secs(3) * 2 + Duration::from_secs(4);
    let calls = (0..200).map(|i| {
        let mut c = clients[i % 2].clone();
        async move {
            let started = Instant::now();
            let r = c
                .chat(chat("busy", &format!("m{i:03}"), &format!("r{i}")))
                .await;
            (started.elapsed(), r.map(|r| r.into_inner().text))
        }
    });
    let mut ok = 0;
    for (i, (took, r)) in join_all(calls).await.into_iter().enumerate() {
        assert!(took < bound, "call {i} took {took:?}");
        match r {
            Ok(text) => {
                assert!(text.contains(&format!("m{i:03}")), "{text}");
                ok += 1;
            }
            Err(s) => assert_eq!(s.code(), Code::Aborted, "call {i}: {s:?}"),
        }
    }
    let mut c = clients[0].clone();
    let stored = pairs(&history(&mut c, "busy").await);
    assert_eq!(stored.len(), ok, "exactly the answered turns are stored");
    let unique: std::collections::HashSet<_> = stored.iter().collect();
    assert_eq!(unique.len(), stored.len(), "no message twice");
}

/// Deleting a session does not reset its rate limit, and a retry of a
/// stored request is answered even at the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limit_survives_delete_and_spares_retries() {
    let stack = Stack::start(StackOptions {
        projects: Projects::from_toml("[projects.general]\nrate_limit = 2\n").unwrap(),
        ..StackOptions::replying_after(Duration::from_millis(5))
    })
    .await;
    let mut s = stack.sessions(0).await;
    s.chat(chat("lim", "one", "r1")).await.unwrap();
    s.chat(chat("lim", "two", "r2")).await.unwrap();
    let retried = s.chat(chat("lim", "two", "r2")).await.unwrap();
    assert!(
        retried.into_inner().text.contains("two"),
        "the stored reply"
    );
    assert_eq!(stack.vllm.requests(), 2);
    s.delete_session(SessionRef {
        project: "general".into(),
        session_id: "lim".into(),
    })
    .await
    .unwrap();
    let third = s.chat(chat("lim", "three", "r3")).await.unwrap_err();
    assert_eq!(third.code(), Code::ResourceExhausted, "{third:?}");
}

/// Which store step fails, and how.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Op {
    OpenTurn,
    StoreReply,
    TouchIndex,
    ProjectPrompt,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum When {
    /// The step fails without running.
    Before,
    /// The step runs, then its answer is lost (a timeout, a cut link).
    After,
}

/// A store whose next `op` fails once, `when` it says.
#[derive(Clone)]
struct Flaky {
    inner: RedisStore,
    fault: Arc<Mutex<Option<(Op, When)>>>,
}

impl Flaky {
    fn take(&self, op: Op) -> Option<When> {
        let mut f = self.fault.lock().unwrap();
        match *f {
            Some((o, when)) if o == op => {
                *f = None;
                Some(when)
            }
            _ => None,
        }
    }

    async fn run<T>(
        &self,
        op: Op,
        step: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let lost = || Err(StoreError::Unavailable(format!("injected: {op:?}")));
        match self.take(op) {
            Some(When::Before) => lost(),
            Some(When::After) => {
                step.await?;
                lost()
            }
            None => step.await,
        }
    }
}

impl Store for Flaky {
    async fn open_turn(
        &self,
        id: SessionId<'_>,
        quota: Quota<'_>,
        opening: &Opening<'_>,
        ttl: Duration,
    ) -> Result<Step<Opened>, StoreError> {
        self.run(Op::OpenTurn, self.inner.open_turn(id, quota, opening, ttl))
            .await
    }
    async fn end_turn(
        &self,
        id: SessionId<'_>,
        attempt: &str,
        ending: Ending<'_>,
        ttl: Duration,
    ) -> Result<Step<()>, StoreError> {
        let op = match ending {
            Ending::Reply(_) => Op::StoreReply,
            _ => return self.inner.end_turn(id, attempt, ending, ttl).await,
        };
        self.run(op, self.inner.end_turn(id, attempt, ending, ttl))
            .await
    }
    async fn take_over(
        &self,
        id: SessionId<'_>,
        request_id: &str,
        from: &str,
        to: &str,
        ends_by: u64,
        ttl: Duration,
    ) -> Result<Step<Option<Opened>>, StoreError> {
        self.inner
            .take_over(id, request_id, from, to, ends_by, ttl)
            .await
    }
    async fn heartbeat(&self, replica: &str, ttl: Duration) -> Result<(), StoreError> {
        self.inner.heartbeat(replica, ttl).await
    }
    async fn alive(&self, replica: &str) -> Result<bool, StoreError> {
        self.inner.alive(replica).await
    }
    async fn hold_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<Lease, StoreError> {
        self.inner.hold_lease(name, holder, ttl).await
    }
    async fn try_lock(
        &self,
        id: SessionId<'_>,
        token: &str,
        lock_ttl: Duration,
    ) -> Result<LockAttempt, StoreError> {
        self.inner.try_lock(id, token, lock_ttl).await
    }
    async fn load(&self, id: SessionId<'_>) -> Result<Option<Dialog>, StoreError> {
        self.inner.load(id).await
    }
    async fn commit(
        &self,
        id: SessionId<'_>,
        token: &str,
        dialog: Option<&Dialog>,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        self.inner.commit(id, token, dialog, ttl).await
    }
    async fn release(&self, id: SessionId<'_>, token: &str) -> Result<(), StoreError> {
        self.inner.release(id, token).await
    }
    async fn touch_index(&self, id: SessionId<'_>, ttl: Duration) -> Result<(), StoreError> {
        self.run(Op::TouchIndex, self.inner.touch_index(id, ttl))
            .await
    }
    async fn sessions(&self, project: &str) -> Result<Vec<String>, StoreError> {
        self.inner.sessions(project).await
    }
    async fn forget(&self, id: SessionId<'_>) -> Result<(), StoreError> {
        self.inner.forget(id).await
    }
    async fn project_prompt(&self, project: &str) -> Result<Option<String>, StoreError> {
        self.run(Op::ProjectPrompt, self.inner.project_prompt(project))
            .await
    }
    async fn set_project_prompt(&self, project: &str, prompt: &str) -> Result<(), StoreError> {
        self.inner.set_project_prompt(project, prompt).await
    }
}

/// A session-svc in this process over `store`, talking to the stack's
/// inference-svc; returns a client of it.
async fn session_svc_over<S: Store>(stack: &Stack, store: S) -> SessionsClient<Channel> {
    let mut cfg = session_svc::Config::new(stack.inference_url.clone());
    cfg.projects = roomy_projects();
    let server = session_svc::Server::new(cfg, store, &mut Registry::default()).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = stack.shutdown.clone();
    tokio::spawn(async move { server.serve(listener, shutdown).await });
    SessionsClient::connect(url).await.unwrap()
}

/// No unanswered message stays in the session (a take-back runs in the
/// background once its owner is dropped).
async fn no_orphan(store: &RedisStore, session_id: &str) {
    let id = SessionId {
        project: "general",
        session_id,
    };
    eventually(
        &format!("{session_id}: no message without its reply"),
        Duration::from_secs(3),
        || async {
            let d = store.load(id).await.unwrap();
            d.is_none_or(|d| d.turns.iter().all(|t| t.reply.is_some()))
        },
    )
    .await;
}

/// Each step of a turn failing once, before or after it ran: the turn ends
/// answered and stored, or taken back, never half.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_step_failing_once_leaves_no_orphan() {
    let stack = Stack::start(StackOptions::replying_after(Duration::from_millis(50))).await;
    let inner = RedisStore::connect(&stack.redis.url(), KeySpace::default())
        .await
        .unwrap();
    let fault = Arc::new(Mutex::new(None));
    let flaky = Flaky {
        inner: inner.clone(),
        fault: fault.clone(),
    };
    let client = session_svc_over(&stack, flaky).await;
    // (fault, whether the client gets its reply)
    let cases = [
        ((Op::TouchIndex, When::Before), true),
        ((Op::ProjectPrompt, When::Before), false),
        ((Op::OpenTurn, When::After), false),
        ((Op::StoreReply, When::Before), true),
        ((Op::StoreReply, When::After), true),
    ];
    for (i, (f, answered)) in cases.into_iter().enumerate() {
        let sid = format!("flaky-{i}");
        *fault.lock().unwrap() = Some(f);
        let r = client.clone().chat(chat(&sid, "hello", "r1")).await;
        assert!(fault.lock().unwrap().is_none(), "{f:?} was injected");
        assert_eq!(r.is_ok(), answered, "{f:?}: {r:?}");
        no_orphan(&inner, &sid).await;
        let mut c = client.clone();
        let stored = pairs(&history(&mut c, &sid).await);
        assert_eq!(stored.len(), usize::from(answered), "{f:?}: {stored:?}");
        // The session goes on normally.
        client
            .clone()
            .chat(chat(&sid, "again", "r2"))
            .await
            .unwrap();
    }
}

/// The link to Redis cut while the model generates, restored within the
/// turn's deadline: the reply is stored once Redis is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_link_cut_mid_turn_is_ridden_through() {
    let stack = Stack::start(StackOptions::replying_after(Duration::from_millis(600))).await;
    let link = Link::start(([127, 0, 0, 1], stack.redis.port()).into())
        .await
        .unwrap();
    let store = RedisStore::connect(&format!("redis://{}/", link.addr()), KeySpace::default())
        .await
        .unwrap();
    let client = session_svc_over(&stack, store).await;
    let turn = {
        let mut c = client.clone();
        tokio::spawn(async move { c.chat(chat("cut", "through", "r1")).await })
    };
    eventually("the generation starts", Duration::from_secs(3), || async {
        stack.vllm.in_flight() == 1
    })
    .await;
    link.cut();
    tokio::time::sleep(Duration::from_millis(800)).await;
    link.restore();
    let reply = turn.await.unwrap().expect("answered");
    assert!(reply.into_inner().text.contains("through"));
    let direct = RedisStore::connect(&stack.redis.url(), KeySpace::default())
        .await
        .unwrap();
    no_orphan(&direct, "cut").await;
    let mut c = client.clone();
    assert_eq!(pairs(&history(&mut c, "cut").await), ["through"]);
}
