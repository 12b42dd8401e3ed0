//! The balancing benchmark behind BENCHMARKS.md's "More than one GPU":
//!
//! 1. Time to first token with session affinity against round-robin: 2
//!    replicas, 32 sessions whose histories grow turn by turn (60-word
//!    messages, 48-word replies), fakes that charge 200 µs of prefill for
//!    every prompt word they have not seen before (20 ms ttft, 4 ms/token).
//! 2. Throughput with 1, 2 and 3 replicas: closed-loop sessions, 24 per
//!    replica, against fakes whose pace is the limit.
//!
//! `cargo run -p palaver-tests --example balance_bench` (everything in this
//! process, on loopback; the fakes sleep rather than compute).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use palaver_testkit::fake_vllm::FakeVllmConfig;
use palaver_tests::cluster::{cluster_with, session, timed_turn, turn};
use session_svc::balance::Policy;
use tokio::time::Instant;

const TTFT_SESSIONS: usize = 32;
const TTFT_TURNS: usize = 8;
/// Words in each user message: the history grows by this and the reply.
const MESSAGE_WORDS: usize = 60;
/// Pause between a reply and the session's next message in run (b).
const THINK_MS: u64 = 500;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    println!("## time to first token, 2 replicas, {TTFT_SESSIONS} sessions x {TTFT_TURNS} turns");
    println!("(a) closed loop: each session's next message as soon as its reply is in");
    for policy in [Policy::Affinity, Policy::RoundRobin] {
        ttft(policy, Duration::ZERO).await;
    }
    println!("(b) {THINK_MS} ms between a reply and the session's next message (a person typing)");
    for policy in [Policy::Affinity, Policy::RoundRobin] {
        ttft(policy, Duration::from_millis(THINK_MS)).await;
    }
    println!("\n## throughput (turns/s), closed loop, 24 sessions per replica");
    let mut one = None;
    for n in 1..=3 {
        let rate = throughput(n).await;
        let base = *one.get_or_insert(rate);
        println!(
            "replicas={n} turns_per_s={rate:.1} vs_one={:.2}",
            rate / base
        );
    }
}

async fn ttft(policy: Policy, think: Duration) {
    let fake = FakeVllmConfig {
        ttft: Duration::from_millis(20),
        tpot: Duration::from_millis(4),
        tokens: 48,
        prefill_per_token: Duration::from_micros(200),
        ..FakeVllmConfig::default()
    };
    let c = cluster_with(2, 2, fake, policy).await;
    let filler = vec!["word"; MESSAGE_WORDS - 3].join(" ");
    let runs = (0..TTFT_SESSIONS).map(|i| {
        let (client, filler) = (c.client.clone(), filler.clone());
        async move {
            let mut ttfts = Vec::new();
            for t in 0..TTFT_TURNS {
                let msg = format!("{} turn {t} {filler}", session(i));
                let (first, _) = timed_turn(client.clone(), &session(i), msg)
                    .await
                    .expect("turn answered");
                ttfts.push((t, first));
                tokio::time::sleep(think).await;
            }
            ttfts
        }
    });
    let all: Vec<(usize, Duration)> = join_all(runs).await.into_iter().flatten().collect();
    let mean = |f: &dyn Fn(usize) -> bool| {
        let v: Vec<f64> = all
            .iter()
            .filter(|(t, _)| f(*t))
            .map(|(_, d)| d.as_secs_f64() * 1000.0)
            .collect();
        v.iter().sum::<f64>() / v.len() as f64
    };
    let mut sorted: Vec<f64> = all.iter().map(|(_, d)| d.as_secs_f64() * 1000.0).collect();
    sorted.sort_by(f64::total_cmp);
    let p = |q: f64| sorted[((sorted.len() as f64 * q).ceil() as usize).saturating_sub(1)];
    let split: Vec<usize> = c.replicas.iter().map(|r| r.fake.sessions().len()).collect();
    println!(
        "policy={policy:?} sessions_seen_per_replica={split:?} mean_ttft_ms={:.1} p50={:.1} p99={:.1} first_turn_mean={:.1} later_turns_mean={:.1} last_turn_mean={:.1}",
        mean(&|_| true),
        p(0.5),
        p(0.99),
        mean(&|t| t == 0),
        mean(&|t| t > 0),
        mean(&|t| t == TTFT_TURNS - 1),
    );
}

async fn throughput(n: usize) -> f64 {
    let fake = FakeVllmConfig {
        ttft: Duration::from_millis(50),
        tpot: Duration::from_millis(10),
        tokens: 16,
        ..FakeVllmConfig::default()
    };
    let c = cluster_with(n, n, fake, Policy::Affinity).await;
    let stop = Arc::new(AtomicBool::new(false));
    let counting = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let load: Vec<_> = (0..24 * n)
        .map(|i| {
            let (client, stop, counting, done) = (
                c.client.clone(),
                stop.clone(),
                counting.clone(),
                done.clone(),
            );
            tokio::spawn(async move {
                let mut t = 0;
                while !stop.load(Ordering::SeqCst) {
                    turn(client.clone(), session(i), t, false)
                        .await
                        .expect("turn answered");
                    if counting.load(Ordering::SeqCst) {
                        done.fetch_add(1, Ordering::SeqCst);
                    }
                    t += 1;
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    counting.store(true, Ordering::SeqCst);
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs(8)).await;
    let rate = done.load(Ordering::SeqCst) as f64 / start.elapsed().as_secs_f64();
    stop.store(true, Ordering::SeqCst);
    for t in load {
        let _ = t.await;
    }
    let peaks: Vec<usize> = c.replicas.iter().map(|r| r.fake.max_in_flight()).collect();
    println!("replicas={n} fake_max_in_flight={peaks:?}");
    rate
}
