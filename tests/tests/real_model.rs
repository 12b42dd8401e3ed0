//! The pipeline against a real model: llama.cpp's `llama-server` running
//! Gemma 3 270M on the CPU, with Gemma 3's chat template. What palaver's own
//! fake cannot show — a real template, tokenizer, SSE framing, multi-byte
//! characters split across chunks, a context window that overflows — is
//! checked here. The tests judge what the protocol promises, not what a 270M
//! base model says.
//!
//! Needs `PALAVER_LLAMA_SERVER` and `PALAVER_MODEL_FILE` (scripts/test sets
//! them from scripts/real-model). Without them each test prints why and
//! passes, except under CI, where they fail.
//!
//! One server serves the whole file (loading the model takes seconds), and
//! the tests take turns at it: each counts what reaches the server, which
//! another test's requests would blur.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use futures::StreamExt;
use palaver_core::projects::Projects;
use palaver_proto::session::v1::sessions_client::SessionsClient;
use palaver_proto::session::v1::{chat_event, ChatReply, ChatRequest, History, Role, SessionRef};
use palaver_testkit::llama_server::{LlamaServer, LlamaServerSpec};
use palaver_tests::{Stack, StackOptions};
use serde_json::{json, Value};
use tonic::transport::Channel;

/// Longest wait for one reply: a few seconds on an idle machine; generous
/// for a 2-core CI machine building other things.
const REPLY_TIMEOUT: Duration = Duration::from_secs(120);

/// The server's slots, as palaver's limit: none of palaver's requests should
/// ever wait inside the server.
const SLOTS: u32 = 8;
/// The whole context; each slot (each conversation) gets CONTEXT / SLOTS.
const CONTEXT: u32 = 8192;

const SYSTEM_PROMPT: &str = "You are a friendly assistant. Answer briefly.";

/// Projects of these tests: no rate limit (the tests send in bursts) and
/// short replies by default (a CPU generates a few dozen tokens a second).
/// `trim` keeps little history, to see trimming at the server.
const PROJECTS: &str = r#"
[defaults]
system_prompt = "You are a friendly assistant. Answer briefly."
rate_limit = 0
max_tokens = 12

[projects.general]

[projects.trim]
max_history_tokens = 200
max_history_messages = 100
"#;

/// The one model server of this test binary, or why there is none.
static SERVER: OnceLock<Result<LlamaServer, String>> = OnceLock::new();

/// One test at a time at the server.
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn template() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/gemma3-chat-template.jinja")
}

/// The shared server, started on first use; `None` (after printing why)
/// when the parts are not installed and this is not CI.
fn server() -> Option<&'static LlamaServer> {
    let started = SERVER.get_or_init(|| {
        let mut spec = LlamaServerSpec::from_env(Some(template()))?;
        spec.slots = SLOTS;
        spec.context = CONTEXT;
        Ok(LlamaServer::start(&spec).unwrap_or_else(|e| panic!("llama-server: {e:#}")))
    });
    match started {
        Ok(s) => Some(s),
        Err(why) => {
            eprintln!("skipping the real-model test: {why}");
            None
        }
    }
}

/// The real pipeline (redis-server, mosquitto, the three services) in front
/// of the shared model server.
async fn stack(server: &LlamaServer) -> Stack {
    Stack::start(StackOptions {
        projects: Projects::from_toml(PROJECTS).expect("test projects parse"),
        model_url: Some(server.url()),
        ..StackOptions::default()
    })
    .await
}

fn request(project: &str, session: &str, message: &str, max_tokens: u32) -> ChatRequest {
    ChatRequest {
        project: project.into(),
        session_id: session.into(),
        message: message.into(),
        max_tokens: Some(max_tokens),
        ..Default::default()
    }
}

async fn chat(client: &mut SessionsClient<Channel>, req: ChatRequest) -> ChatReply {
    tokio::time::timeout(REPLY_TIMEOUT, client.chat(req))
        .await
        .expect("a reply within the timeout")
        .expect("Chat succeeds")
        .into_inner()
}

async fn history(stack: &Stack, project: &str, session: &str) -> History {
    stack
        .sessions(0)
        .await
        .get_history(SessionRef {
            project: project.into(),
            session_id: session.into(),
        })
        .await
        .expect("GetHistory")
        .into_inner()
}

fn roles(h: &History) -> Vec<Role> {
    h.messages.iter().map(|m| m.role()).collect()
}

/// An answer, not one of the error texts a client would get instead.
fn assert_answer(what: &str, payload: &str) {
    assert!(
        !payload.trim().is_empty()
            && !payload.starts_with("Error")
            && !payload.starts_with("Server is overloaded"),
        "{what}: not an answer: {payload:?}"
    );
}

/// The server's own count of prompt tokens for `messages`: one token
/// generated straight from the server, around palaver.
async fn server_prompt_tokens(server: &LlamaServer, messages: &Value) -> u64 {
    let reply: Value = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", server.url()))
        .json(&json!({"messages": messages, "max_tokens": 1, "temperature": 0}))
        .send()
        .await
        .expect("llama-server answers")
        .json()
        .await
        .expect("a JSON reply");
    reply["usage"]["prompt_tokens"]
        .as_u64()
        .unwrap_or_else(|| panic!("no usage in {reply}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_reply_comes_back_over_the_unchanged_wire_protocol() {
    let _turn = TURN.lock().await;
    let Some(server) = server() else { return };
    let stack = stack(server).await;
    let predicted_before = server
        .metric("llamacpp:tokens_predicted_total")
        .expect("metrics");

    let mut c = stack.mqtt().await;
    c.subscribe("general/assistant_response/#").await;
    let topic = "general/assistant_response/wire-1/cli-7/req-1";
    c.publish(
        "general/user_input",
        json!({
            "message": "Hello! What is the capital of France?",
            "sessionId": "wire-1",
            "clientId": "cli-7",
            "requestId": "req-1",
            "replyTopic": topic,
            "maxTokens": 12,
            "images": [],
        })
        .to_string(),
    )
    .await;
    let reply = c.recv(REPLY_TIMEOUT).await.expect("a reply");
    assert_eq!(reply.topic, topic);
    assert_answer("reply", &reply.payload);

    let h = history(&stack, "general", "wire-1").await;
    assert_eq!(roles(&h), [Role::User, Role::Assistant]);
    assert_eq!(
        h.messages[0].content,
        "Hello! What is the capital of France?"
    );
    assert_eq!(
        h.messages[1].content, reply.payload,
        "the stored reply is the one sent"
    );
    let predicted = server.metric("llamacpp:tokens_predicted_total").unwrap() - predicted_before;
    assert!(
        (1.0..=12.0).contains(&predicted),
        "the model server generated {predicted} tokens for one reply of at most 12"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_reaches_the_model() {
    let _turn = TURN.lock().await;
    let Some(server) = server() else { return };
    let stack = stack(server).await;
    let mut client = stack.sessions(0).await;

    // The same message twice: without history the two prompts would be equal.
    let msg = "Tell me something about the sea.";
    let first = chat(&mut client, request("general", "hist-1", msg, 8)).await;
    let second = chat(&mut client, request("general", "hist-1", msg, 8)).await;
    assert!(
        first.prompt_tokens > 0 && first.completion_tokens > 0,
        "the server reports usage: {first:?}"
    );
    assert!(
        second.prompt_tokens > first.prompt_tokens + first.completion_tokens,
        "the second prompt ({} tokens) holds the first turn ({} + {} tokens) and more",
        second.prompt_tokens,
        first.prompt_tokens,
        first.completion_tokens
    );
}

/// Needs prompts whose roles alternate even while earlier messages of the
/// session still wait for their replies: Gemma's template refuses two user
/// turns in a row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_sent_back_to_back_in_one_session_are_all_answered() {
    let _turn = TURN.lock().await;
    let Some(server) = server() else { return };
    let stack = stack(server).await;
    let mut c = stack.mqtt().await;
    c.subscribe("general/assistant_response/#").await;

    let bursts = [("b2b-two", 2), ("b2b-three", 3)];
    for (session, n) in bursts {
        for i in 1..=n {
            c.publish(
                "general/user_input",
                json!({
                    "message": format!("Message {i}: name a color."),
                    "sessionId": session,
                    "requestId": format!("{i}"),
                    "clientId": "cli",
                    "replyTopic": format!("general/assistant_response/{session}/cli/{i}"),
                    "maxTokens": 8,
                })
                .to_string(),
            )
            .await;
        }
    }
    let replies = c.recv_n(5, REPLY_TIMEOUT).await;
    for r in &replies {
        assert_answer(&r.topic, &r.payload);
    }
    for (session, n) in bursts {
        let h = history(&stack, "general", session).await;
        let want: Vec<Role> = (0..n).flat_map(|_| [Role::User, Role::Assistant]).collect();
        assert_eq!(
            roles(&h),
            want,
            "{session}: every message answered and stored"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_sessions_at_once_are_all_answered_with_at_most_eight_at_the_server() {
    let _turn = TURN.lock().await;
    let Some(server) = server() else { return };
    let stack = stack(server).await;
    let mut c = stack.mqtt().await;
    c.subscribe("general/assistant_response/#").await;

    // Sample what the server runs and queues while the ten turns are on.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let done = done.clone();
        tokio::task::spawn_blocking(move || {
            let (mut running, mut waiting) = (0.0f64, 0.0f64);
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                running = running.max(server.metric("llamacpp:requests_processing").unwrap());
                waiting = waiting.max(server.metric("llamacpp:requests_deferred").unwrap());
                std::thread::sleep(Duration::from_millis(20));
            }
            (running, waiting)
        })
    };
    for i in 0..10 {
        c.publish(
            "general/user_input",
            json!({
                "message": format!("Session {i} here. Count from one to ten."),
                "sessionId": format!("ten-{i}"),
                "maxTokens": 16,
            })
            .to_string(),
        )
        .await;
    }
    let replies = c.recv_n(10, REPLY_TIMEOUT).await;
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let (running, waiting) = sampler.await.unwrap();
    eprintln!("at the server: at most {running} running, {waiting} waiting");

    let mut topics: Vec<_> = replies.iter().map(|r| r.topic.clone()).collect();
    topics.sort();
    topics.dedup();
    assert_eq!(topics.len(), 10, "one reply per session: {topics:?}");
    for r in &replies {
        assert_answer(&r.topic, &r.payload);
    }
    assert!(
        running <= 8.0,
        "{running} generations ran at the server at once"
    );
    assert_eq!(
        waiting, 0.0,
        "requests waited for a slot inside the server: palaver sent more than its 8"
    );
    assert!(
        running >= 2.0,
        "the sessions were served one after another (at most {running} at once)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_deltas_make_up_the_stored_reply_with_multi_byte_text_intact() {
    let _turn = TURN.lock().await;
    let Some(server) = server() else { return };
    let stack = stack(server).await;
    let mut client = stack.sessions(0).await;

    // Prompts a base model continues in kind; a reply without any multi-byte
    // character would test nothing, so try a few.
    let prompts = [
        "日本語で答えてください。東京の天気はどうですか？",
        "Écris une phrase en français sur l'été à Genève, s'il te plaît.",
        "Напиши одно предложение о Москве.",
        "Γράψε μια πρόταση για την Αθήνα.",
    ];
    let mut multi_byte = Vec::new();
    for (i, prompt) in prompts.iter().enumerate() {
        let session = format!("stream-{i}");
        let mut req = request("general", &session, prompt, 24);
        req.final_only = false;
        let mut events = tokio::time::timeout(REPLY_TIMEOUT, client.chat_stream(req))
            .await
            .expect("the stream opens in time")
            .expect("ChatStream")
            .into_inner();
        let mut deltas = Vec::new();
        let mut done = None;
        let mut accepted = false;
        while let Some(event) = tokio::time::timeout(REPLY_TIMEOUT, events.next())
            .await
            .expect("the next event in time")
        {
            match event.expect("no error in the stream").event {
                Some(chat_event::Event::Accepted(_)) => accepted = true,
                Some(chat_event::Event::Delta(d)) => {
                    assert!(accepted, "a delta before `accepted`");
                    assert!(done.is_none(), "a delta after `done`");
                    deltas.push(d);
                }
                Some(chat_event::Event::Done(reply)) => done = Some(reply),
                None => panic!("an empty event"),
            }
        }
        let done = done.expect("the stream ends with `done`");
        let joined: String = deltas.concat();
        assert_eq!(joined, done.text, "the deltas make up the reply");
        assert!(
            !joined.contains('\u{FFFD}'),
            "a character was broken: {joined:?}"
        );
        assert_answer("streamed reply", &joined);
        let h = history(&stack, "general", &session).await;
        assert_eq!(
            h.messages[1].content, joined,
            "the stored reply is the streamed one"
        );
        if joined.len() > joined.chars().count() {
            multi_byte.push((deltas.len(), joined));
        }
        if multi_byte.len() >= 2 {
            break;
        }
    }
    eprintln!("multi-byte replies (pieces, text): {multi_byte:?}");
    assert!(
        !multi_byte.is_empty(),
        "no reply had a multi-byte character, so none was checked"
    );
    assert!(
        multi_byte.iter().any(|(n, _)| *n > 1),
        "replies came in one piece, not streamed: {multi_byte:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_max_tokens_give_a_short_reply_cut_at_the_length() {
    let _turn = TURN.lock().await;
    let Some(server) = server() else { return };
    let stack = stack(server).await;
    let mut client = stack.sessions(0).await;

    let msg = "Write a long story about a dragon who learns to cook.";
    let reply = chat(&mut client, request("general", "short-1", msg, 5)).await;
    assert_eq!(reply.finish_reason, "length", "{reply:?}");
    assert_eq!(reply.completion_tokens, 5, "{reply:?}");
    assert_answer("short reply", &reply.text);
    // Five tokens are at most a few words.
    assert!(reply.text.chars().count() <= 80, "{:?}", reply.text);

    // Over MQTT the same limit is `maxTokens`: the server generates exactly
    // five tokens (this test has the server to itself).
    let predicted_before = server.metric("llamacpp:tokens_predicted_total").unwrap();
    let mut c = stack.mqtt().await;
    c.subscribe("general/assistant_response/short-2").await;
    c.publish(
        "general/user_input",
        json!({"message": msg, "sessionId": "short-2", "maxTokens": 5}).to_string(),
    )
    .await;
    let reply = c.recv(REPLY_TIMEOUT).await.expect("a reply");
    assert_answer("short MQTT reply", &reply.payload);
    assert!(reply.payload.chars().count() <= 80, "{:?}", reply.payload);
    let predicted = server.metric("llamacpp:tokens_predicted_total").unwrap() - predicted_before;
    assert_eq!(predicted, 5.0, "tokens generated for maxTokens 5");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_longer_than_the_context_gets_a_clear_error_and_nothing_is_stored() {
    let _turn = TURN.lock().await;
    let Some(server) = server() else { return };
    let stack = stack(server).await;
    let mut c = stack.mqtt().await;
    c.subscribe("general/assistant_response/#").await;

    // Within palaver's own limit on a message (8000 characters), well past
    // a slot's 1024 tokens: only the model server can tell.
    let per_slot = CONTEXT / SLOTS;
    let long = "the sea is blue and ".repeat(390);
    assert!(long.chars().count() < 8000);
    c.publish(
        "general/user_input",
        json!({"message": long, "sessionId": "long-1"}).to_string(),
    )
    .await;
    let reply = c.recv(REPLY_TIMEOUT).await.expect("a reply");
    assert_eq!(reply.topic, "general/assistant_response/long-1");
    assert!(
        reply.payload.starts_with("Error: ") && reply.payload.contains("too long"),
        "not a clear error for a message over the context ({per_slot} tokens): {:?}",
        reply.payload
    );
    let h = history(&stack, "general", "long-1").await;
    assert!(h.messages.is_empty(), "stored: {:?}", roles(&h));

    // The session is not poisoned: the next message is answered.
    c.publish(
        "general/user_input",
        json!({"message": "Hello again.", "sessionId": "long-1", "maxTokens": 6}).to_string(),
    )
    .await;
    let next = c.recv(REPLY_TIMEOUT).await.expect("a reply");
    assert_answer("the message after", &next.payload);
    let h = history(&stack, "general", "long-1").await;
    assert_eq!(roles(&h), [Role::User, Role::Assistant]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_trimmed_by_max_history_tokens_stays_within_budget_at_the_server() {
    let _turn = TURN.lock().await;
    let Some(server) = server() else { return };
    let stack = stack(server).await;
    let mut client = stack.sessions(0).await;
    const BUDGET: u32 = 200; // the project's max_history_tokens (palaver's estimate)
    const TURNS: usize = 8;

    // About 80 estimated tokens each, the same every turn, so the prompt's
    // growth over the first turn's is the history alone.
    let msg = "Please describe, in a few words, a quiet harbor town at dawn, with its \
               boats, gulls, nets and fishermen, the bakeries opening their shutters, the \
               smell of salt and fresh bread, the church bell ringing six, the ferry from \
               the island coming in, and an old dog asleep on the warm stones of the pier.";
    let mut replies = Vec::new();
    for _ in 0..TURNS {
        replies.push(chat(&mut client, request("trim", "trim-1", msg, 8)).await);
    }
    let prompts: Vec<u32> = replies.iter().map(|r| r.prompt_tokens).collect();
    eprintln!("prompt tokens at the server, turn by turn: {prompts:?}");
    let alone = replies[0].prompt_tokens;
    let most = replies.iter().map(|r| r.prompt_tokens).max().unwrap();
    assert!(
        replies[1].prompt_tokens > alone,
        "the second prompt carries history: {replies:?}"
    );
    // Untrimmed, the history would hold all the turns before the last.
    let per_turn = replies[1].prompt_tokens - alone;
    assert!(
        (TURNS as u32 - 1) * per_turn > 2 * BUDGET,
        "the test sends too little to need trimming"
    );
    let h = history(&stack, "trim", "trim-1").await;
    assert!(
        h.messages.len() < 2 * TURNS,
        "nothing was trimmed: {} messages",
        h.messages.len()
    );
    // palaver estimates 4 characters a token; the real count may differ,
    // and the template adds a few tokens a turn, but not twice the budget.
    assert!(
        most - alone <= 2 * BUDGET,
        "history reached {} real tokens at the server for a budget of {BUDGET}: {:?}",
        most - alone,
        prompts
    );

    // What the last turn sent is exactly the history kept: the same list,
    // sent straight to the server, counts the same tokens.
    let last = replies.last().unwrap();
    let mut messages = vec![json!({"role": "system", "content": SYSTEM_PROMPT})];
    let kept = &h.messages[..h.messages.len() - 1];
    for m in kept {
        let role = if m.role() == Role::User {
            "user"
        } else {
            "assistant"
        };
        messages.push(json!({"role": role, "content": m.content}));
    }
    assert_eq!(h.messages.last().unwrap().content, last.text);
    assert_eq!(
        u64::from(last.prompt_tokens),
        server_prompt_tokens(server, &Value::Array(messages)).await,
        "palaver's last prompt is not the kept history"
    );
}
