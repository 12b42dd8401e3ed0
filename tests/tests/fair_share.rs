//! A fair share of the generation slots: one client flooding inference-svc
//! with turns (each in a fresh session, so no per-session limit holds it)
//! cannot make another client wait behind its queue.
//!
//! Timing is relative to the fake vLLM's latency `L`: with 8 slots and
//! `FLOOD` turns always outstanding, a newcomer served in arrival order waits
//! for about `(FLOOD - 8) / 8` generations before its own; served by fair
//! share it waits for the next slot to free, at most one generation and
//! usually a fraction of one, since the flood's slots free at staggered times.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use palaver_core::projects::Projects;
use palaver_proto::session::v1::ChatRequest;
use palaver_tests::{Stack, StackOptions};
use tokio::time::Instant;

const L: Duration = Duration::from_millis(300);
/// Turns the flooding client keeps outstanding: 8 running, the rest queued.
const FLOOD: usize = 40;
/// Turns the calm client times, one after another, in each phase.
const SAMPLES: usize = 5;

fn chat(client: &str, session_id: String, message: &str) -> ChatRequest {
    ChatRequest {
        project: "general".into(),
        session_id,
        message: message.into(),
        client: client.into(),
        ..Default::default()
    }
}

/// The middle one of `SAMPLES` turns of client "calm", one after another.
async fn calm_latency(stack: &Stack, phase: &str) -> Duration {
    let mut c = stack.sessions(0).await;
    let mut took = Vec::new();
    for i in 0..SAMPLES {
        let started = Instant::now();
        c.chat(chat(
            "calm",
            format!("calm-{phase}"),
            &format!("{phase} {i}"),
        ))
        .await
        .unwrap_or_else(|e| panic!("calm turn {i} ({phase}) failed: {e}"));
        took.push(started.elapsed());
    }
    took.sort();
    took[SAMPLES / 2]
}

/// Client "calm"'s median latency alone, then while client "flood" keeps
/// `FLOOD` turns outstanding, each in a new session.
async fn idle_and_flooded(fair_share: bool) -> (Duration, Duration) {
    let stack = Stack::start(StackOptions {
        // No per-session limit, so no per-client one either: what holds the
        // flood back here can only be the admission queue.
        projects: Projects::from_toml("[projects.general]\nrate_limit = 0\n").unwrap(),
        inference: Box::new(move |c| c.fair_share = fair_share),
        gateway_started: false,
        ..StackOptions::replying_after(L)
    })
    .await;
    let idle = calm_latency(&stack, "idle").await;

    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicUsize::new(0));
    let mut flooders = Vec::new();
    for f in 0..FLOOD {
        // The first eight a slot apart, so the slots free at staggered
        // times, as under real traffic, rather than all at once.
        if f < 8 {
            tokio::time::sleep(L / 8).await;
        }
        let mut c = stack.sessions(0).await;
        let (stop, failed) = (stop.clone(), failed.clone());
        flooders.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                if c.chat(chat("flood", format!("flood-{f}-{n}"), "more"))
                    .await
                    .is_err()
                {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    // Until the flood holds every slot and the rest of it waits.
    let deadline = Instant::now() + L * 20;
    while stack.vllm.in_flight() < 8 {
        assert!(Instant::now() < deadline, "the flood never took every slot");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(L).await;
    let flooded = calm_latency(&stack, "flooded").await;
    stop.store(true, Ordering::Relaxed);
    for f in flooders {
        f.await.unwrap();
    }
    assert_eq!(failed.load(Ordering::Relaxed), 0, "flood turns failed");
    stack.stop().await;
    (idle, flooded)
}

/// Both in one test, one after the other: run side by side, the two
/// floods would share the machine's cores and blur each other's timing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_client_cannot_push_anothers_latency_past_twice_idle() {
    let (idle, flooded) = idle_and_flooded(true).await;
    eprintln!("fair share on: idle {idle:?}, flooded {flooded:?}");
    assert!(
        flooded <= idle * 2,
        "with fair share: idle {idle:?}, under the flood {flooded:?}"
    );

    // The same flood served in arrival order: the calm client queues behind
    // it (about (FLOOD - 8) / 8 generations), which is what fair share fixes.
    let (idle, flooded) = idle_and_flooded(false).await;
    eprintln!("fair share off: idle {idle:?}, flooded {flooded:?}");
    assert!(
        flooded >= idle * 3,
        "without fair share: idle {idle:?}, under the flood {flooded:?}"
    );
}
