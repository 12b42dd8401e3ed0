//! Deleting and clearing sessions, one and all.
//!
//! A session deleted while one of its replies is being generated, and begun
//! again at once under the same id: the late reply belongs to the dialog
//! that was deleted, never to the new one. Timing is relative to the fake
//! vLLM's latency `L`: the old reply arrives about `L` after its request,
//! the new turn opens a few milliseconds after the delete, so the old reply
//! comes back while the new turn waits for its own.

use std::time::Duration;

use palaver_core::projects::Projects;
use palaver_proto::session::v1::sessions_client::SessionsClient;
use palaver_proto::session::v1::{
    ChatRequest, ResetSessionRequest, Role, SessionAction, SessionRef, UpdateProjectRequest,
};
use palaver_tests::{Stack, StackOptions};
use tokio::time::Instant;
use tonic::transport::Channel;

const L: Duration = Duration::from_millis(800);

fn chat(project: &str, session_id: &str, message: &str) -> ChatRequest {
    ChatRequest {
        project: project.into(),
        session_id: session_id.into(),
        message: message.into(),
        ..Default::default()
    }
}

fn session(project: &str, session_id: &str) -> SessionRef {
    SessionRef {
        project: project.into(),
        session_id: session_id.into(),
    }
}

/// Project `brief` alone, its sessions living `ttl_secs`, no rate limit.
fn brief(ttl_secs: u64) -> Projects {
    Projects::from_toml(&format!(
        "[projects.brief]\nsession_ttl_secs = {ttl_secs}\nrate_limit = 0\n"
    ))
    .unwrap()
}

/// Runs a project-wide action; how many sessions it touched.
async fn for_all(
    c: &SessionsClient<Channel>,
    project: &str,
    system_prompt: Option<&str>,
    action: SessionAction,
) -> u32 {
    let request = UpdateProjectRequest {
        project: project.into(),
        system_prompt: system_prompt.map(str::to_owned),
        sessions: action.into(),
    };
    c.clone()
        .update_project(request)
        .await
        .unwrap()
        .into_inner()
        .sessions
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_finishing_after_its_session_was_deleted_stays_out_of_the_new_dialog() {
    let stack = Stack::start(StackOptions::with_backend(L, Duration::ZERO, 4)).await;
    let mut client = stack.sessions(0).await;

    let old = tokio::spawn({
        let mut c = client.clone();
        async move { c.chat(chat("general", "again", "before the delete")).await }
    });
    let deadline = Instant::now() + L / 2;
    while stack.vllm.in_flight() == 0 {
        assert!(
            Instant::now() < deadline,
            "the first turn never reached vLLM"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let deleted = client
        .delete_session(session("general", "again"))
        .await
        .unwrap()
        .into_inner();
    assert!(deleted.existed, "the first turn's message was stored");
    let new = tokio::spawn({
        let mut c = client.clone();
        async move { c.chat(chat("general", "again", "after the delete")).await }
    });

    // Both callers get their own reply: the old one is delivered, only not
    // stored (its dialog is gone).
    let old = old.await.unwrap().expect("the old turn is answered");
    let new = new.await.unwrap().expect("the new turn is answered");
    assert!(old.get_ref().text.contains("before the delete"), "{old:?}");
    assert!(new.get_ref().text.contains("after the delete"), "{new:?}");

    let history = client
        .get_history(session("general", "again"))
        .await
        .unwrap()
        .into_inner();
    let stored: Vec<(Role, &str)> = history
        .messages
        .iter()
        .map(|m| (m.role(), m.content.as_str()))
        .collect();
    assert_eq!(
        stored,
        [
            (Role::User, "after the delete"),
            (Role::Assistant, new.get_ref().text.as_str()),
        ],
        "the new dialog holds its own turn and reply only"
    );
}

/// Project-wide actions reach every live session: more sessions than the
/// service works on at once, all cleared, then all deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_project_wide_clear_and_delete_reach_every_session() {
    let stack = Stack::start(StackOptions::default()).await;
    let client = stack.sessions(0).await;
    let ids: Vec<String> = (0..40).map(|i| format!("many-{i}")).collect();
    let turns = ids.iter().map(|sid| {
        let mut c = client.clone();
        let request = chat("general", sid, "remember me");
        async move { c.chat(request).await.expect("answered") }
    });
    futures::future::join_all(turns).await;
    let history = |sid: &str| {
        let mut c = client.clone();
        let session = session("general", sid);
        async move { c.get_history(session).await.unwrap().into_inner() }
    };
    assert_eq!(history("many-7").await.messages.len(), 2);

    let cleared = for_all(
        &client,
        "general",
        Some("Speak like a pirate."),
        SessionAction::Clear,
    )
    .await;
    assert_eq!(cleared, 40, "every session was cleared");
    for sid in &ids {
        let h = history(sid).await;
        assert!(h.messages.is_empty(), "{sid} kept {:?}", h.messages);
        assert_eq!(h.system_prompt, "Speak like a pirate.");
    }

    assert_eq!(
        for_all(&client, "general", None, SessionAction::Delete).await,
        40,
        "every session was deleted"
    );
    assert_eq!(
        for_all(&client, "general", None, SessionAction::Delete).await,
        0,
        "nothing left to delete"
    );
}

/// A session kept alive by control actions alone (here new prompts, the
/// history kept) stays in the project's index as long as its dialog lives.
/// Sessions live 3 s here. A message, answered at 0, keeps its session
/// indexed for two TTLs: to 6 s at most, never later. New prompts at 1.5,
/// 3 and 4.5 s each come 1.5 s before the dialog would go, and keep it to
/// 7.5 s. The clear comes at 6.2 s, after the message's index entry would
/// have gone and 1.3 s before the dialog goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_kept_alive_by_control_actions_stays_in_the_project_index() {
    let stack = Stack::start(StackOptions {
        projects: brief(3),
        ..StackOptions::default()
    })
    .await;
    let mut c = stack.sessions(0).await;
    c.chat(chat("brief", "kept", "hello"))
        .await
        .expect("answered");
    let answered = Instant::now();

    for (at, prompt) in [
        (1500, "Be brief."),
        (3000, "Be briefer."),
        (4500, "Be brief again."),
    ] {
        tokio::time::sleep_until(answered + Duration::from_millis(at)).await;
        c.reset_session(ResetSessionRequest {
            project: "brief".into(),
            session_id: "kept".into(),
            system_prompt: Some(prompt.into()),
            keep_history: true,
        })
        .await
        .unwrap();
    }

    tokio::time::sleep_until(answered + Duration::from_millis(6200)).await;
    let history = c.get_history(session("brief", "kept")).await.unwrap();
    assert_eq!(
        history.into_inner().messages.len(),
        2,
        "the dialog is still alive"
    );
    assert_eq!(
        for_all(&c, "brief", None, SessionAction::Clear).await,
        1,
        "the live session was found"
    );
    let history = c
        .get_history(session("brief", "kept"))
        .await
        .unwrap()
        .into_inner();
    assert!(history.messages.is_empty(), "{:?}", history.messages);
}

/// A reply stored late in its session's life keeps the dialog a TTL past
/// itself, and the index entry its message made still covers that. Sessions
/// live 2 s, the backend takes 1.5 s: the message is indexed at about -1.5 s
/// (the reply counts as 0), the dialog lives to 2 s, the clear comes at
/// 1.2 s, 0.7 s after a one-TTL entry would have gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_whose_reply_came_late_stays_in_the_project_index() {
    let stack = Stack::start(StackOptions {
        projects: brief(2),
        ..StackOptions::with_backend(Duration::from_millis(1500), Duration::ZERO, 4)
    })
    .await;
    let mut c = stack.sessions(0).await;
    c.chat(chat("brief", "late", "take your time"))
        .await
        .expect("answered");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        for_all(&c, "brief", None, SessionAction::Clear).await,
        1,
        "the live session was found"
    );
}
