//! One contract, two stores: the in-memory store of the local stack must
//! behave like Redis in everything the turn engine relies on.

use std::time::Duration;

use palaver_testkit::process::RedisServer;
use session_svc::dialog::Dialog;
use session_svc::keys::KeySpace;
use session_svc::store::{Admit, RateLimit, SessionId, Store};
use session_svc::{MemoryStore, RedisStore};

const TTL: Duration = Duration::from_secs(60);

fn sid(session_id: &str) -> SessionId<'_> {
    SessionId {
        project: "general",
        session_id,
    }
}

fn dialog_with(msg: &str) -> Dialog {
    let mut d = Dialog::default();
    d.begin(msg, None, None);
    d
}

async fn lock_excludes_others_and_only_the_holder_writes<S: Store>(s: &S) {
    let id = sid("lock-basic");
    assert!(matches!(
        s.admit(id, None, "a", TTL).await.unwrap(),
        Admit::Locked(None)
    ));
    assert!(matches!(
        s.admit(id, None, "b", TTL).await.unwrap(),
        Admit::Busy
    ));
    let d = dialog_with("hello");
    assert!(
        !s.commit(id, "b", Some(&d), TTL).await.unwrap(),
        "non-holder wrote"
    );
    assert!(s.commit(id, "a", Some(&d), TTL).await.unwrap());
    match s.admit(id, None, "b", TTL).await.unwrap() {
        Admit::Locked(Some(got)) => assert_eq!(got, d),
        other => panic!("expected the stored dialog, got {other:?}"),
    }
    s.release(id, "a").await.unwrap(); // not the holder: no effect
    assert!(matches!(
        s.admit(id, None, "c", TTL).await.unwrap(),
        Admit::Busy
    ));
    s.release(id, "b").await.unwrap();
    assert!(matches!(
        s.admit(id, None, "c", TTL).await.unwrap(),
        Admit::Locked(Some(_))
    ));
    assert!(s.commit(id, "c", None, TTL).await.unwrap(), "delete");
    assert_eq!(s.load(id).await.unwrap(), None);
}

async fn a_dead_holders_lock_expires_and_its_late_write_is_refused<S: Store>(s: &S) {
    let id = sid("lock-ttl");
    let short = Duration::from_millis(150);
    assert!(matches!(
        s.admit(id, None, "dead", short).await.unwrap(),
        Admit::Locked(_)
    ));
    assert!(matches!(
        s.admit(id, None, "next", TTL).await.unwrap(),
        Admit::Busy
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(matches!(
        s.admit(id, None, "next", TTL).await.unwrap(),
        Admit::Locked(None)
    ));
    let d = dialog_with("late");
    assert!(!s.commit(id, "dead", Some(&d), TTL).await.unwrap());
    assert!(s.commit(id, "next", None, TTL).await.unwrap());
}

async fn sessions_expire_after_their_ttl<S: Store>(s: &S) {
    let id = sid("expiry");
    assert!(matches!(
        s.admit(id, None, "t", TTL).await.unwrap(),
        Admit::Locked(None)
    ));
    let d = dialog_with("soon gone");
    assert!(s
        .commit(id, "t", Some(&d), Duration::from_millis(150))
        .await
        .unwrap());
    assert_eq!(s.load(id).await.unwrap(), Some(d));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(s.load(id).await.unwrap(), None);
}

async fn rate_limit_is_a_sliding_window_per_session<S: Store>(s: &S) {
    let rate = RateLimit {
        limit: 3,
        window: Duration::from_millis(600),
    };
    let (a, b) = (sid("rate-a"), sid("rate-b"));
    for i in 0..3 {
        match s.admit(a, Some(rate), "t", TTL).await.unwrap() {
            Admit::Locked(_) => s.release(a, "t").await.unwrap(),
            other => panic!("request {i} refused: {other:?}"),
        }
    }
    assert!(matches!(
        s.admit(a, Some(rate), "t", TTL).await.unwrap(),
        Admit::RateLimited
    ));
    // A refused request takes no lock.
    assert!(matches!(
        s.admit(a, None, "u", TTL).await.unwrap(),
        Admit::Locked(_)
    ));
    s.release(a, "u").await.unwrap();
    // Another session is unaffected.
    assert!(matches!(
        s.admit(b, Some(rate), "t", TTL).await.unwrap(),
        Admit::Locked(_)
    ));
    s.release(b, "t").await.unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(matches!(
        s.admit(a, Some(rate), "t", TTL).await.unwrap(),
        Admit::Locked(_)
    ));
    s.release(a, "t").await.unwrap();
    // forget() clears the window.
    for _ in 0..2 {
        s.admit(a, Some(rate), "x", TTL).await.unwrap();
        s.release(a, "x").await.unwrap();
    }
    assert!(matches!(
        s.admit(a, Some(rate), "t", TTL).await.unwrap(),
        Admit::RateLimited
    ));
    s.forget(a).await.unwrap();
    assert!(matches!(
        s.admit(a, Some(rate), "t", TTL).await.unwrap(),
        Admit::Locked(_)
    ));
    s.release(a, "t").await.unwrap();
}

async fn project_index_and_prompt<S: Store>(s: &S) {
    let p = SessionId {
        project: "tutor",
        session_id: "x",
    };
    let q = SessionId {
        project: "tutor",
        session_id: "y/z:{}",
    };
    s.touch_index(p, TTL).await.unwrap();
    s.touch_index(q, TTL).await.unwrap();
    let mut ids = s.sessions("tutor").await.unwrap();
    ids.sort();
    assert_eq!(ids, ["x", "y/z:{}"]);
    s.forget(p).await.unwrap();
    assert_eq!(s.sessions("tutor").await.unwrap(), ["y/z:{}"]);
    assert!(s.sessions("npc").await.unwrap().is_empty());

    assert_eq!(s.project_prompt("tutor").await.unwrap(), None);
    s.set_project_prompt("tutor", "be kind").await.unwrap();
    assert_eq!(
        s.project_prompt("tutor").await.unwrap().as_deref(),
        Some("be kind")
    );
    assert_eq!(s.project_prompt("npc").await.unwrap(), None);
}

/// The turn engine on top of the store: idempotent retries and replies
/// stored after their own message, whatever order they finish in.
async fn turns_keep_order_and_do_not_repeat_retries<S: Store>(s: &S) {
    use palaver_core::projects::Projects;
    use session_svc::turn::{LockConfig, NewTurn, Prepared, Turns};

    let metrics = std::sync::Arc::new(session_svc::metrics::Metrics::new(
        &mut prometheus_client::registry::Registry::default(),
    ));
    let turns = Turns::new(
        s.clone(),
        Projects::builtin(),
        LockConfig::default(),
        metrics,
    );
    let turn = |message: &'static str, request_id: &'static str| NewTurn {
        project: "general",
        session_id: "engine",
        message,
        request_id: Some(request_id),
        system_prompt: None,
    };
    let seq = |p: Prepared| match p {
        Prepared::Generate { seq, messages } => {
            assert_eq!(messages[0].0, session_svc::dialog::Role::System);
            seq
        }
        Prepared::Replay(r) => panic!("unexpected replay {r}"),
    };
    let s1 = seq(turns.prepare(&turn("u1", "r1")).await.unwrap());
    let s2 = seq(turns.prepare(&turn("u2", "r2")).await.unwrap());
    // A retry of r1 while it is still generating reuses its turn.
    assert_eq!(seq(turns.prepare(&turn("u1", "r1")).await.unwrap()), s1);
    turns
        .store_reply("general", "engine", s2, "a2")
        .await
        .unwrap();
    turns
        .store_reply("general", "engine", s1, "a1")
        .await
        .unwrap();
    match turns.prepare(&turn("u1", "r1")).await.unwrap() {
        Prepared::Replay(r) => assert_eq!(r, "a1"),
        other => panic!("a finished retry must replay, got {other:?}"),
    }
    let history: Vec<String> = s
        .load(sid("engine"))
        .await
        .unwrap()
        .unwrap()
        .history()
        .into_iter()
        .map(|(_, t)| t)
        .collect();
    assert_eq!(history, ["u1", "a1", "u2", "a2"]);
}

async fn contract<S: Store>(s: S) {
    turns_keep_order_and_do_not_repeat_retries(&s).await;
    lock_excludes_others_and_only_the_holder_writes(&s).await;
    a_dead_holders_lock_expires_and_its_late_write_is_refused(&s).await;
    sessions_expire_after_their_ttl(&s).await;
    rate_limit_is_a_sliding_window_per_session(&s).await;
    project_index_and_prompt(&s).await;
}

#[tokio::test]
async fn memory_store_meets_the_contract() {
    contract(MemoryStore::new()).await;
}

#[tokio::test]
async fn redis_store_meets_the_contract() {
    let redis = RedisServer::start().expect("redis-server");
    let store = RedisStore::connect(&redis.url(), KeySpace::default())
        .await
        .expect("connect");
    contract(store).await;
}
