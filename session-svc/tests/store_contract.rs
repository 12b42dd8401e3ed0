//! One contract, two stores: the in-memory store of the local stack must
//! behave like Redis in everything the turn engine relies on.

use std::time::Duration;

use palaver_testkit::process::RedisServer;
use session_svc::dialog::{Dialog, Ending, Limits, Opened, Opening};
use session_svc::keys::KeySpace;
use session_svc::store::{LockAttempt, Quota, RateLimit, SessionId, Step, Store};
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
    d.open(&opening(msg));
    d
}

async fn lock_excludes_others_and_only_the_holder_writes<S: Store>(s: &S) {
    let id = sid("lock-basic");
    assert!(matches!(
        s.try_lock(id, "a", TTL).await.unwrap(),
        LockAttempt::Locked(None)
    ));
    assert!(matches!(
        s.try_lock(id, "b", TTL).await.unwrap(),
        LockAttempt::Busy
    ));
    let d = dialog_with("hello");
    assert!(
        !s.commit(id, "b", Some(&d), TTL).await.unwrap(),
        "non-holder wrote"
    );
    assert!(s.commit(id, "a", Some(&d), TTL).await.unwrap());
    match s.try_lock(id, "b", TTL).await.unwrap() {
        LockAttempt::Locked(Some(got)) => assert_eq!(got, d),
        other => panic!("expected the stored dialog, got {other:?}"),
    }
    s.release(id, "a").await.unwrap(); // not the holder: no effect
    assert!(matches!(
        s.try_lock(id, "c", TTL).await.unwrap(),
        LockAttempt::Busy
    ));
    s.release(id, "b").await.unwrap();
    assert!(matches!(
        s.try_lock(id, "c", TTL).await.unwrap(),
        LockAttempt::Locked(Some(_))
    ));
    assert!(s.commit(id, "c", None, TTL).await.unwrap(), "delete");
    assert_eq!(s.load(id).await.unwrap(), None);
}

async fn a_dead_holders_lock_expires_and_its_late_write_is_refused<S: Store>(s: &S) {
    let id = sid("lock-ttl");
    let short = Duration::from_millis(150);
    assert!(matches!(
        s.try_lock(id, "dead", short).await.unwrap(),
        LockAttempt::Locked(_)
    ));
    assert!(matches!(
        s.try_lock(id, "next", TTL).await.unwrap(),
        LockAttempt::Busy
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(matches!(
        s.try_lock(id, "next", TTL).await.unwrap(),
        LockAttempt::Locked(None)
    ));
    let d = dialog_with("late");
    assert!(!s.commit(id, "dead", Some(&d), TTL).await.unwrap());
    assert!(s.commit(id, "next", None, TTL).await.unwrap());
}

async fn sessions_expire_after_their_ttl<S: Store>(s: &S) {
    let id = sid("expiry");
    assert!(matches!(
        s.try_lock(id, "t", TTL).await.unwrap(),
        LockAttempt::Locked(None)
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

/// An opening whose attempt is named after its message.
fn opening(message: &str) -> Opening<'_> {
    Opening {
        message,
        request_id: None,
        attempt: message,
        ends_by: u64::MAX,
        now_ms: 0,
        system_prompt: None,
        limits: WIDE,
        first_seq: 0,
    }
}

/// Only the per-session limit `rate`.
fn per_session(rate: RateLimit) -> Quota<'static> {
    Quota {
        session: Some(rate),
        client: None,
    }
}

/// Opens a turn of `id` counted against `rate`: "ok", "limited" or "busy".
async fn try_open<S: Store>(s: &S, id: SessionId<'_>, rate: RateLimit) -> &'static str {
    try_open_as(s, id, per_session(rate)).await
}

/// Opens a turn of `id` counted against `quota`: "ok", "limited" or "busy".
async fn try_open_as<S: Store>(s: &S, id: SessionId<'_>, quota: Quota<'_>) -> &'static str {
    loop {
        return match s.open_turn(id, quota, &opening("m"), TTL).await.unwrap() {
            Step::Done { .. } => "ok",
            Step::RateLimited => "limited",
            Step::Busy => "busy",
            Step::Changed => continue,
        };
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
    // A request that finds the session locked is not counted: retried, it
    // counts once.
    assert!(matches!(
        s.try_lock(a, "holder", TTL).await.unwrap(),
        LockAttempt::Locked(_)
    ));
    assert_eq!(try_open(s, a, rate).await, "busy");
    s.release(a, "holder").await.unwrap();
    assert_eq!(try_open(s, a, rate).await, "ok");
    assert_eq!(try_open(s, a, rate).await, "limited");
    // Deleting a session does not reset its window.
    s.forget(a).await.unwrap();
    assert_eq!(try_open(s, a, rate).await, "limited");
}

/// A retry of a request the dialog holds is not counted: at the limits (the
/// session's and its client's) it still gets its turn's outcome.
async fn a_retry_is_not_counted_against_the_rate_limit<S: Store>(s: &S) {
    let rate = RateLimit {
        limit: 1,
        window: Duration::from_secs(60),
    };
    let id = sid("rate-retry");
    let both = Quota {
        session: Some(rate),
        client: Some(("rate-retry", rate)),
    };
    let first = Opening {
        request_id: Some("r1"),
        ..opening("m")
    };
    assert!(matches!(
        until_done(|| s.open_turn(id, both, &first, TTL)).await,
        Opened::Generate { .. }
    ));
    let retry = Opening {
        attempt: "retry",
        ..first
    };
    assert_eq!(
        until_done(|| s.open_turn(id, both, &retry, TTL)).await,
        Opened::InFlight {
            attempt: "m".into()
        }
    );
    assert_eq!(try_open(s, id, rate).await, "limited", "a new one is");
}

/// A client's limit counts over all its sessions; other clients, other
/// projects and anonymous callers have their own (or none); a request
/// refused per session or finding the session locked does not count.
async fn a_client_limit_spans_its_sessions<S: Store>(s: &S) {
    let rate = |limit| RateLimit {
        limit,
        window: Duration::from_millis(600),
    };
    let of = |client| Quota {
        session: Some(rate(1)),
        client: Some((client, rate(3))),
    };
    for i in 1..=3 {
        assert_eq!(try_open_as(s, sid(&format!("cs-{i}")), of("k")).await, "ok");
    }
    assert_eq!(try_open_as(s, sid("cs-4"), of("k")).await, "limited");
    assert_eq!(s.load(sid("cs-4")).await.unwrap(), None, "refused: no turn");
    assert_eq!(try_open_as(s, sid("cs-5"), of("j")).await, "ok");
    let elsewhere = SessionId {
        project: "other",
        session_id: "cs-6",
    };
    assert_eq!(try_open_as(s, elsewhere, of("k")).await, "ok");
    let anonymous = per_session(rate(1));
    assert_eq!(try_open_as(s, sid("cs-7"), anonymous).await, "ok");

    // "m": refused by its session's limit, then by a lock: neither counts.
    assert_eq!(try_open_as(s, sid("cs-8"), of("m")).await, "ok");
    assert_eq!(try_open_as(s, sid("cs-8"), of("m")).await, "limited");
    assert!(matches!(
        s.try_lock(sid("cs-9"), "holder", TTL).await.unwrap(),
        LockAttempt::Locked(_)
    ));
    assert_eq!(try_open_as(s, sid("cs-9"), of("m")).await, "busy");
    s.release(sid("cs-9"), "holder").await.unwrap();
    assert_eq!(try_open_as(s, sid("cs-9"), of("m")).await, "ok");
    assert_eq!(try_open_as(s, sid("cs-10"), of("m")).await, "ok");
    assert_eq!(try_open_as(s, sid("cs-11"), of("m")).await, "limited");

    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(try_open_as(s, sid("cs-12"), of("k")).await, "ok");
}

/// Clearing a session's history or deleting it (as `ResetSession` and
/// `DeleteSession` do: under the lock, then out of the index) leaves its
/// window and its client's as they were.
async fn clearing_or_deleting_a_session_keeps_its_windows<S: Store>(s: &S) {
    let rate = |limit| RateLimit {
        limit,
        window: Duration::from_secs(60),
    };
    let quota = Quota {
        session: Some(rate(2)),
        client: Some(("kd", rate(3))),
    };
    let id = sid("keep-windows");
    assert_eq!(try_open_as(s, id, quota).await, "ok");
    // Cleared, as ResetSession without keep_history does.
    let LockAttempt::Locked(Some(mut d)) = s.try_lock(id, "clear", TTL).await.unwrap() else {
        panic!("the session exists and is free");
    };
    d.clear();
    assert!(s.commit(id, "clear", Some(&d), TTL).await.unwrap());
    assert_eq!(try_open_as(s, id, quota).await, "ok");
    assert_eq!(try_open_as(s, id, quota).await, "limited", "cleared: kept");
    // Deleted, as DeleteSession does.
    assert!(matches!(
        s.try_lock(id, "delete", TTL).await.unwrap(),
        LockAttempt::Locked(Some(_))
    ));
    assert!(s.commit(id, "delete", None, TTL).await.unwrap());
    s.forget(id).await.unwrap();
    assert_eq!(s.load(id).await.unwrap(), None);
    assert_eq!(try_open_as(s, id, quota).await, "limited", "deleted: kept");
    // The client's window too: one left of its three.
    assert_eq!(try_open_as(s, sid("keep-windows-2"), quota).await, "ok");
    assert_eq!(
        try_open_as(s, sid("keep-windows-3"), quota).await,
        "limited"
    );
}

/// What a one-step change returned, without the hold time.
fn done<T: std::fmt::Debug>(step: Step<T>) -> T {
    match step {
        Step::Done { value, .. } => value,
        other => panic!("expected Done, got {other:?}"),
    }
}

/// A one-step change tried until done: a store may answer that another
/// change got in first ([`Step::Changed`]), as the turn engine retries.
async fn until_done<T: std::fmt::Debug, F, Fut>(mut attempt: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Step<T>, session_svc::store::StoreError>>,
{
    for _ in 0..10 {
        match attempt().await.unwrap() {
            Step::Changed => continue,
            other => return done(other),
        }
    }
    panic!("a change lost ten times in a row with no one else writing");
}

/// A turn step for [`apply_on_both`].
enum TurnStep<'a> {
    Open(Opening<'a>),
    /// End the turn of attempt `.0`.
    End(&'a str, Ending<'a>),
}

/// Applies `steps` to a plain `Dialog` and to session `id` of the store,
/// checking after each that both returned and hold the same; returns the
/// dialog.
async fn apply_on_both<S: Store>(s: &S, id: SessionId<'_>, steps: Vec<TurnStep<'_>>) -> Dialog {
    let mut want = Dialog::starting_at(0);
    for (i, step) in steps.into_iter().enumerate() {
        match step {
            TurnStep::Open(o) => {
                let expected = want.open(&o);
                let got = until_done(|| s.open_turn(id, Quota::default(), &o, TTL)).await;
                assert_eq!(got, expected, "{}: step {i}", id.session_id);
            }
            TurnStep::End(attempt, ending) => {
                want.end(attempt, ending);
                until_done(|| s.end_turn(id, attempt, ending, TTL)).await;
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
        attempt: message,
        ends_by: u64::MAX,
        now_ms: 0,
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
            TurnStep::End("second", Ending::Reply("a2")),
            TurnStep::Open(open("retry", Some("r1"), None)), // retry while generating
            TurnStep::End("retry", Ending::Reply("not the owner")),
            TurnStep::End("first", Ending::Reply(odd)),
            TurnStep::Open(open("ignored", Some("r1"), Some("ignored"))), // replay
            TurnStep::Open(open("third", None, Some(odd))),               // trims by tokens
            TurnStep::End("third", Ending::Reply("a3")),
            TurnStep::Open(open(&long, Some("r4"), None)),
            TurnStep::End(
                &long,
                Ending::Fail {
                    code: 8,
                    message: "overloaded",
                    kind: None,
                },
            ),
            TurnStep::End("nobody", Ending::Reply("nobody's")),
            TurnStep::Open(open("fifth", None, None)),
            TurnStep::End("fifth", Ending::Reply("a5")),
            TurnStep::Open(open("sixth", None, None)), // trims by messages
        ],
    )
    .await;
    assert!(want.turns[0].seq > 1, "the steps must have trimmed");

    // A dialog whose last turn was taken back has no turns, and reads back.
    let empty = sid("rules-empty");
    let x = opening("x");
    let Opened::Generate { seq, .. } =
        until_done(|| s.open_turn(empty, Quota::default(), &x, TTL)).await
    else {
        panic!("a new turn generates");
    };
    until_done(|| s.end_turn(empty, "x", Ending::Abandon, TTL)).await;
    let d = s.load(empty).await.unwrap().expect("kept");
    assert!(d.turns.is_empty());
    assert_eq!(d.next_seq, seq + 1);

    // Ending a turn of a session that is gone writes nothing.
    let gone = sid("rules-gone");
    until_done(|| s.end_turn(gone, "x", Ending::Reply("late"), TTL)).await;
    assert_eq!(s.load(gone).await.unwrap(), None);
}

/// A one-step change waits for a two-step change's lock.
async fn one_step_changes_respect_the_lock<S: Store>(s: &S) {
    let id = sid("rules-locked");
    assert!(matches!(
        s.try_lock(id, "holder", TTL).await.unwrap(),
        LockAttempt::Locked(None)
    ));
    assert_eq!(
        s.open_turn(id, Quota::default(), &opening("x"), TTL)
            .await
            .unwrap(),
        Step::Busy
    );
    assert_eq!(
        s.end_turn(id, "x", Ending::Abandon, TTL).await.unwrap(),
        Step::Busy
    );
    assert!(s.commit(id, "holder", None, TTL).await.unwrap());
    let x = opening("x");
    until_done(|| s.open_turn(id, Quota::default(), &x, TTL)).await;
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
    use session_svc::turn::{LockConfig, NewTurn, Prepared, TurnEngine};

    let metrics = std::sync::Arc::new(session_svc::metrics::Metrics::new(
        &mut prometheus_client::registry::Registry::default(),
    ));
    let turns = TurnEngine::new(
        s.clone(),
        Projects::builtin(),
        LockConfig::default(),
        metrics,
    );
    let turns = std::sync::Arc::new(turns);
    let turn = |message: &'static str, request_id: &'static str| NewTurn {
        project: "general",
        session_id: "engine",
        message,
        request_id: Some(request_id),
        system_prompt: None,
        client: None,
        deadline: tokio::time::Instant::now() + Duration::from_secs(60),
    };
    let generates = |p: Prepared| match p {
        Prepared::Generate { messages } => {
            assert_eq!(messages[0].0, session_svc::dialog::Role::System);
        }
        other => panic!("expected a new turn, got {other:?}"),
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let o1 = turns.owner("general", "engine");
    generates(turns.prepare(&turn("u1", "r1"), &o1).await.unwrap());
    let o2 = turns.owner("general", "engine");
    generates(turns.prepare(&turn("u2", "r2"), &o2).await.unwrap());
    // A retry of r1 while it is still generating waits for it.
    let retry = turns.owner("general", "engine");
    match turns.prepare(&turn("u1", "r1"), &retry).await.unwrap() {
        Prepared::InFlight { attempt } => assert_eq!(attempt, o1.attempt()),
        other => panic!("a retry in flight must wait, got {other:?}"),
    }
    retry.forget();
    o2.store_reply("a2", deadline).await.unwrap();
    o1.store_reply("a1", deadline).await.unwrap();
    let again = turns.owner("general", "engine");
    match turns.prepare(&turn("u1", "r1"), &again).await.unwrap() {
        Prepared::Replay(r) => assert_eq!(r, "a1"),
        other => panic!("a finished retry must replay, got {other:?}"),
    }
    again.forget();
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

/// A lease is held by one holder at a time, changes hands with a larger
/// epoch, and frees itself after its TTL or when released.
async fn a_lease_has_one_holder_at_a_time<S: Store>(s: &S) {
    let short = Duration::from_millis(150);
    let a = s.hold_lease("gateway/p", "a", short).await.unwrap();
    assert!(a.held);
    let b = s.hold_lease("gateway/p", "b", short).await.unwrap();
    assert!(!b.held, "taken");
    assert_eq!(b.holder.as_deref(), Some("a"));
    let renewed = s.hold_lease("gateway/p", "a", short).await.unwrap();
    assert_eq!(
        (renewed.held, renewed.epoch),
        (true, a.epoch),
        "a renewal keeps the epoch"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let b = s.hold_lease("gateway/p", "b", TTL).await.unwrap();
    assert!(b.held, "a's lease expired");
    assert!(b.epoch > a.epoch);
    let late = s.hold_lease("gateway/p", "a", TTL).await.unwrap();
    assert!(!late.held, "the old holder cannot renew it back");
    let released = s
        .hold_lease("gateway/p", "b", Duration::ZERO)
        .await
        .unwrap();
    assert!(!released.held);
    let other = s.hold_lease("gateway/q", "b", TTL).await.unwrap();
    assert!(other.held, "leases are independent");
    let a = s.hold_lease("gateway/p", "a", TTL).await.unwrap();
    assert!(a.held && a.epoch > b.epoch, "free after release");
}

async fn contract<S: Store>(s: S) {
    a_lease_has_one_holder_at_a_time(&s).await;
    turns_keep_order_and_do_not_repeat_retries(&s).await;
    lock_excludes_others_and_only_the_holder_writes(&s).await;
    a_dead_holders_lock_expires_and_its_late_write_is_refused(&s).await;
    sessions_expire_after_their_ttl(&s).await;
    rate_limit_is_a_sliding_window_per_session(&s).await;
    a_retry_is_not_counted_against_the_rate_limit(&s).await;
    a_client_limit_spans_its_sessions(&s).await;
    clearing_or_deleting_a_session_keeps_its_windows(&s).await;
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
            until_done(|| store.open_turn(id, Quota::default(), &o, TTL)).await,
            expected
        );
        assert!(matches!(expected, Opened::Generate { .. }));
        // The reply is stored by the other replica.
        let reply = format!("a{i}");
        want.end(&message, Ending::Reply(&reply));
        until_done(|| other.end_turn(id, &message, Ending::Reply(&reply), TTL)).await;
    }
    assert_eq!(a.load(id).await.unwrap(), Some(want.clone()));
    // And a two-step change by one is seen by the other's next turn.
    let token = "reset";
    assert!(matches!(
        a.try_lock(id, token, TTL).await.unwrap(),
        LockAttempt::Locked(_)
    ));
    assert!(a.commit(id, token, None, TTL).await.unwrap());
    let o = opening("after reset");
    match until_done(|| b.open_turn(id, Quota::default(), &o, TTL)).await {
        Opened::Generate { seq, history, .. } => {
            assert_eq!(seq, 0, "a deleted session starts over");
            assert_eq!(history.len(), 1);
        }
        other => panic!("expected a new turn, got {other:?}"),
    }
}
