//! One contract, two stores: the in-memory store of the local stack must
//! behave like Redis in everything the turn engine relies on.

use std::time::Duration;

use palaver_testkit::process::RedisServer;
use session_svc::dialog::{Dialog, Ending, Limits, Opened, Opening};
use session_svc::keys::KeySpace;
use session_svc::store::{Admit, RateLimit, SessionId, Step, Store};
use session_svc::{MemoryStore, RedisStore};

const TTL: Duration = Duration::from_secs(60);

fn sid(session_id: &str) -> SessionId<'_> {
    SessionId {
        project: "general",
        session_id,
    }
}

fn dialog_with(msg: &str) -> Dialog {
    let mut d = Dialog::starting_at(0);
    d.begin(msg, None, None);
    d
}

async fn lock_excludes_others_and_only_the_holder_writes<S: Store>(s: &S) {
    let id = sid("lock-basic");
    assert!(matches!(
        s.admit(id, "a", TTL).await.unwrap(),
        Admit::Locked(None)
    ));
    assert!(matches!(s.admit(id, "b", TTL).await.unwrap(), Admit::Busy));
    let d = dialog_with("hello");
    assert!(
        !s.commit(id, "b", Some(&d), TTL).await.unwrap(),
        "non-holder wrote"
    );
    assert!(s.commit(id, "a", Some(&d), TTL).await.unwrap());
    match s.admit(id, "b", TTL).await.unwrap() {
        Admit::Locked(Some(got)) => assert_eq!(got, d),
        other => panic!("expected the stored dialog, got {other:?}"),
    }
    s.release(id, "a").await.unwrap(); // not the holder: no effect
    assert!(matches!(s.admit(id, "c", TTL).await.unwrap(), Admit::Busy));
    s.release(id, "b").await.unwrap();
    assert!(matches!(
        s.admit(id, "c", TTL).await.unwrap(),
        Admit::Locked(Some(_))
    ));
    assert!(s.commit(id, "c", None, TTL).await.unwrap(), "delete");
    assert_eq!(s.load(id).await.unwrap(), None);
}

async fn a_dead_holders_lock_expires_and_its_late_write_is_refused<S: Store>(s: &S) {
    let id = sid("lock-ttl");
    let short = Duration::from_millis(150);
    assert!(matches!(
        s.admit(id, "dead", short).await.unwrap(),
        Admit::Locked(_)
    ));
    assert!(matches!(
        s.admit(id, "next", TTL).await.unwrap(),
        Admit::Busy
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(matches!(
        s.admit(id, "next", TTL).await.unwrap(),
        Admit::Locked(None)
    ));
    let d = dialog_with("late");
    assert!(!s.commit(id, "dead", Some(&d), TTL).await.unwrap());
    assert!(s.commit(id, "next", None, TTL).await.unwrap());
}

async fn sessions_expire_after_their_ttl<S: Store>(s: &S) {
    let id = sid("expiry");
    assert!(matches!(
        s.admit(id, "t", TTL).await.unwrap(),
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

const WIDE: Limits = Limits {
    max_messages: 100,
    max_tokens: 100_000,
};

fn opening(message: &str) -> Opening<'_> {
    Opening {
        message,
        request_id: None,
        system_prompt: None,
        limits: WIDE,
        first_seq: 0,
    }
}

/// Opens a turn of `id` counted against `rate`: "ok", "limited" or "busy".
async fn try_open<S: Store>(s: &S, id: SessionId<'_>, rate: RateLimit) -> &'static str {
    match s
        .open_turn(id, Some(rate), &opening("m"), TTL)
        .await
        .unwrap()
    {
        Step::Done { .. } => "ok",
        Step::RateLimited => "limited",
        Step::Busy => "busy",
    }
}

async fn rate_limit_is_a_sliding_window_per_session<S: Store>(s: &S) {
    let rate = RateLimit {
        limit: 3,
        window: Duration::from_millis(600),
    };
    let (a, b) = (sid("rate-a"), sid("rate-b"));
    for _ in 0..3 {
        assert_eq!(try_open(s, a, rate).await, "ok");
    }
    assert_eq!(try_open(s, a, rate).await, "limited");
    // A refused request opened no turn.
    let turns = s.load(a).await.unwrap().unwrap().turns.len();
    assert_eq!(turns, 3);
    // Another session is unaffected.
    assert_eq!(try_open(s, b, rate).await, "ok");
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(try_open(s, a, rate).await, "ok");
    assert_eq!(try_open(s, a, rate).await, "ok");
    // A request that finds the session locked still counts.
    assert!(matches!(
        s.admit(a, "holder", TTL).await.unwrap(),
        Admit::Locked(_)
    ));
    assert_eq!(try_open(s, a, rate).await, "busy");
    s.release(a, "holder").await.unwrap();
    assert_eq!(try_open(s, a, rate).await, "limited");
    // forget() clears the window.
    s.forget(a).await.unwrap();
    assert_eq!(try_open(s, a, rate).await, "ok");
}

/// What a one-step change returned, without the hold time.
fn done<T: std::fmt::Debug>(step: Step<T>) -> T {
    match step {
        Step::Done { value, .. } => value,
        other => panic!("expected Done, got {other:?}"),
    }
}

/// A turn step for [`apply_on_both`].
enum TurnStep<'a> {
    Open(Opening<'a>),
    /// End the n-th turn opened so far (or, past those, turn number n).
    End(usize, Ending<'a>),
}

/// Applies `steps` to a plain `Dialog` and to session `id` of the store,
/// checking after each that both returned and hold the same; returns the
/// dialog.
async fn apply_on_both<S: Store>(s: &S, id: SessionId<'_>, steps: Vec<TurnStep<'_>>) -> Dialog {
    let mut want = Dialog::starting_at(0);
    let mut seqs = Vec::new();
    for (i, step) in steps.into_iter().enumerate() {
        match step {
            TurnStep::Open(o) => {
                let expected = want.open(&o);
                let got = done(s.open_turn(id, None, &o, TTL).await.unwrap());
                assert_eq!(got, expected, "{}: step {i}", id.session_id);
                if let Opened::Generate { seq, .. } = got {
                    if !seqs.contains(&seq) {
                        seqs.push(seq);
                    }
                }
            }
            TurnStep::End(n, ending) => {
                let seq = seqs.get(n).copied().unwrap_or(n as u64);
                want.end(seq, ending);
                done(s.end_turn(id, seq, ending, TTL).await.unwrap());
            }
        }
        let stored = s.load(id).await.unwrap();
        assert_eq!(stored.as_ref(), Some(&want), "{}: step {i}", id.session_id);
    }
    want
}

/// A store's one-step turn changes store exactly what dialog.rs's rules
/// produce: the same openings and endings, applied to a plain `Dialog` and
/// to the store, return the same snapshots and leave the same dialog after
/// every step — through trimming by messages and by tokens, retries,
/// replays, prompts, text JSON must escape, and (in Redis) each swap's
/// expected value. The rules themselves are tested in dialog.rs.
async fn one_step_changes_follow_the_dialog_rules<S: Store>(s: &S) {
    // Tight enough that the steps below trim both ways.
    let limits = Limits {
        max_messages: 5,
        max_tokens: 16,
    };
    let open = |message, request_id, system_prompt| Opening {
        message,
        request_id,
        system_prompt,
        limits,
        first_seq: 0,
    };
    let long = "x".repeat(30);
    let odd = "quotes \" \\ / tab\t newline\n nul\u{0} ünïcödé 🎉";
    let want = apply_on_both(
        s,
        sid("rules"),
        vec![
            TurnStep::Open(open("first", Some("r1"), Some("be brief"))),
            TurnStep::Open(open("second", Some("r2"), None)),
            TurnStep::End(1, Ending::Reply("a2")),
            TurnStep::Open(open("first", Some("r1"), None)), // retry while generating
            TurnStep::End(0, Ending::Reply(odd)),
            TurnStep::Open(open("ignored", Some("r1"), Some("ignored"))), // replay
            TurnStep::Open(open("third", None, Some(odd))),               // trims by tokens
            TurnStep::End(2, Ending::Reply("a3")),
            TurnStep::Open(open(&long, Some("r4"), None)),
            TurnStep::End(3, Ending::Abandon),
            TurnStep::End(99, Ending::Reply("nobody's")),
            TurnStep::Open(open("fifth", None, None)),
            TurnStep::End(4, Ending::Reply("a5")),
            TurnStep::Open(open("sixth", None, None)), // trims by messages
        ],
    )
    .await;
    assert!(want.turns[0].seq > 1, "the steps must have trimmed");

    // A dialog whose last turn was taken back has no turns, and reads back.
    let empty = sid("rules-empty");
    let Opened::Generate { seq, .. } =
        done(s.open_turn(empty, None, &opening("x"), TTL).await.unwrap())
    else {
        panic!("a new turn generates");
    };
    done(s.end_turn(empty, seq, Ending::Abandon, TTL).await.unwrap());
    let d = s.load(empty).await.unwrap().expect("kept");
    assert!(d.turns.is_empty());
    assert_eq!(d.next_seq, seq + 1);

    // Ending a turn of a session that is gone writes nothing.
    let gone = sid("rules-gone");
    done(
        s.end_turn(gone, 0, Ending::Reply("late"), TTL)
            .await
            .unwrap(),
    );
    assert_eq!(s.load(gone).await.unwrap(), None);
}

/// A one-step change waits for a two-step change's lock.
async fn one_step_changes_respect_the_lock<S: Store>(s: &S) {
    let id = sid("rules-locked");
    assert!(matches!(
        s.admit(id, "holder", TTL).await.unwrap(),
        Admit::Locked(None)
    ));
    assert_eq!(
        s.open_turn(id, None, &opening("x"), TTL).await.unwrap(),
        Step::Busy
    );
    assert_eq!(
        s.end_turn(id, 0, Ending::Abandon, TTL).await.unwrap(),
        Step::Busy
    );
    assert!(s.commit(id, "holder", None, TTL).await.unwrap());
    done(s.open_turn(id, None, &opening("x"), TTL).await.unwrap());
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

    // Each id leaves the index when its own session expires, and only then,
    // whichever TTL the project's other sessions were touched with last.
    let brief = SessionId {
        project: "tutor",
        session_id: "one-message",
    };
    s.touch_index(q, TTL).await.unwrap();
    s.touch_index(brief, Duration::from_millis(150))
        .await
        .unwrap();
    let mut ids = s.sessions("tutor").await.unwrap();
    ids.sort();
    assert_eq!(ids, ["one-message", "y/z:{}"]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(s.sessions("tutor").await.unwrap(), ["y/z:{}"]);

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
    one_step_changes_follow_the_dialog_rules(&s).await;
    one_step_changes_respect_the_lock(&s).await;
    project_index_and_prompt(&s).await;
}

#[tokio::test]
async fn memory_store_meets_the_contract() {
    contract(MemoryStore::new()).await;
}

/// A store on `redis`, as a session-svc replica would open it.
async fn connect(redis: &RedisServer) -> RedisStore {
    RedisStore::connect(&redis.url(), KeySpace::default())
        .await
        .expect("connect")
}

#[tokio::test]
async fn redis_store_meets_the_contract() {
    let redis = RedisServer::start().expect("redis-server");
    contract(connect(&redis).await).await;
}

/// Two replicas on one Redis take turns on one session: each one's idea of
/// the dialog goes stale whenever the other writes, and nothing is lost or
/// numbered twice.
#[tokio::test]
async fn redis_replicas_interleaving_on_one_session_lose_nothing() {
    let redis = RedisServer::start().expect("redis-server");
    let a = connect(&redis).await;
    let b = connect(&redis).await;
    let id = sid("two-replicas");
    let mut want = Dialog::starting_at(0);
    for i in 0..6 {
        let (store, other) = if i % 2 == 0 { (&a, &b) } else { (&b, &a) };
        let message = format!("u{i}");
        let o = opening(&message);
        let expected = want.open(&o);
        assert_eq!(
            done(store.open_turn(id, None, &o, TTL).await.unwrap()),
            expected
        );
        let Opened::Generate { seq, .. } = expected else {
            panic!("a new message generates");
        };
        // The reply is stored by the other replica.
        let reply = format!("a{i}");
        want.end(seq, Ending::Reply(&reply));
        done(
            other
                .end_turn(id, seq, Ending::Reply(&reply), TTL)
                .await
                .unwrap(),
        );
    }
    assert_eq!(a.load(id).await.unwrap(), Some(want.clone()));
    // And a two-step change by one is seen by the other's next turn.
    let token = "reset";
    assert!(matches!(
        a.admit(id, token, TTL).await.unwrap(),
        Admit::Locked(_)
    ));
    assert!(a.commit(id, token, None, TTL).await.unwrap());
    let o = opening("after reset");
    match done(b.open_turn(id, None, &o, TTL).await.unwrap()) {
        Opened::Generate { seq, history, .. } => {
            assert_eq!(seq, 0, "a deleted session starts over");
            assert_eq!(history.len(), 1);
        }
        other => panic!("expected a new turn, got {other:?}"),
    }
}
