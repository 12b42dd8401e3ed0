//! `palaver-lab idle-memory`: what reading memory costs on this machine right
//! after the process sat idle, the other half of what a turn pays after the
//! backend's pause (`palaver-lab floor` is the first: the hops).
//!
//! It walks a chain of cache lines in random order, each load waiting for
//! the one before (the next line's index is in the line), so the hardware
//! can neither prefetch nor overlap the misses: a line's time is what one
//! miss costs wherever the line was found. The working set, 256 KiB by
//! default, fits a core's L2 cache, so back to back every line is a hit;
//! after a sleep the walk shows how much of that survived the idle time.
//! On a host whose caches other tenants wash out while a VM idles, the
//! whole working set comes back from memory.
//!
//! Code behaves the same way: a service woken by a reply after 100 ms runs
//! its reply path's machine code from wherever it was evicted to
//! (`scripts/bench.sh` measures how much code that is per turn, with
//! `scripts/callgrind_footprint.py`).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Bytes of a cache line on the machines palaver runs on (x86-64, arm64).
const LINE: usize = 64;
/// `u32` slots per line: the chain's index sits in a line's first slot.
const SLOTS: usize = LINE / std::mem::size_of::<u32>();

/// Flags of `palaver-lab idle-memory`.
#[derive(Debug, Clone, clap::Args)]
pub struct IdleMemoryArgs {
    /// Cache lines in the walk (64 bytes each). The default, 4096 lines
    /// (256 KiB), fits a core's L2 cache, so that warm walks are hits.
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u32).range(2..=(1 << 24)))]
    pub lines: u32,

    /// Idle times to sleep before a walk, in milliseconds, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "0,1,3,10,100")]
    pub idle_ms: Vec<f64>,

    /// Walks per idle time; the median is reported.
    #[arg(long, default_value_t = 40, value_parser = clap::value_parser!(u32).range(1..))]
    pub rounds: u32,

    /// Print the result as one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Runs the walks and prints the result; exit 2 for bad flags.
pub async fn run(args: IdleMemoryArgs) -> ExitCode {
    if let Some(bad) = args
        .idle_ms
        .iter()
        .find(|ms| !(ms.is_finite() && **ms >= 0.0 && **ms <= 10_000.0))
    {
        eprintln!("palaver idle-memory: --idle-ms {bad} is not between 0 and 10000 ms");
        return ExitCode::from(2);
    }
    let as_json = args.json;
    // Sleeps and walks block: off the runtime's worker.
    let report = match tokio::task::spawn_blocking(move || measure(&args)).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("palaver idle-memory: the measuring thread failed: {e}");
            return ExitCode::from(2);
        }
    };
    if as_json {
        println!("{}", report.to_json());
    } else {
        println!("{}", report.table());
    }
    ExitCode::SUCCESS
}

/// A random cycle through `lines` cache lines: line `i`'s first slot holds
/// the index of the slot to read next. Following it from slot 0 visits every
/// line once and comes back to 0.
fn chain(lines: usize, mut seed: u64) -> Vec<u32> {
    // Sattolo's shuffle makes one cycle through all lines; xorshift is
    // random enough to defeat the prefetchers and needs no dependency.
    let mut order: Vec<usize> = (0..lines).collect();
    for i in (1..lines).rev() {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let j = (seed % i as u64) as usize;
        order.swap(i, j);
    }
    let mut memory = vec![0u32; lines * SLOTS];
    for (line, next) in order.iter().enumerate() {
        memory[line * SLOTS] = (next * SLOTS) as u32;
    }
    memory
}

/// Follows the chain once; returns where it ended (slot 0 for a whole cycle).
fn walk(memory: &[u32], lines: usize) -> u32 {
    let mut at = 0u32;
    for _ in 0..lines {
        at = memory[at as usize];
    }
    at
}

fn measure(args: &IdleMemoryArgs) -> IdleMemoryReport {
    let lines = args.lines as usize;
    let memory = chain(lines, 0x9E37_79B9_7F4A_7C15);
    walk(&memory, lines); // first touch: page faults out of the way
    let mut medians = Vec::new();
    for &idle_ms in &args.idle_ms {
        let mut per_line: Vec<f64> = (0..args.rounds)
            .map(|_| {
                if idle_ms > 0.0 {
                    std::thread::sleep(Duration::from_secs_f64(idle_ms / 1000.0));
                }
                let start = Instant::now();
                std::hint::black_box(walk(std::hint::black_box(&memory), lines));
                start.elapsed().as_nanos() as f64 / lines as f64
            })
            .collect();
        per_line.sort_by(f64::total_cmp);
        medians.push((idle_ms, per_line[per_line.len() / 2]));
    }
    IdleMemoryReport {
        lines,
        rounds: args.rounds,
        medians,
    }
}

struct IdleMemoryReport {
    lines: usize,
    rounds: u32,
    /// (idle ms, median ns per line), in the order asked for.
    medians: Vec<(f64, f64)>,
}

impl IdleMemoryReport {
    fn to_json(&self) -> Value {
        let walks: Vec<Value> = self
            .medians
            .iter()
            .map(|(ms, ns)| json!({"idle_ms": ms, "ns_per_line": (ns * 10.0).round() / 10.0}))
            .collect();
        json!({
            "lines": self.lines,
            "bytes": self.lines * LINE,
            "rounds": self.rounds,
            "median_by_idle": walks,
        })
    }

    fn table(&self) -> String {
        let mut out = format!(
            "palaver idle-memory: {} cache lines ({} KiB) read in a random chain, \
             median of {} walks\n\n  idle before   ns per line   µs for all\n",
            self.lines,
            self.lines * LINE / 1024,
            self.rounds,
        );
        for (ms, ns) in &self.medians {
            out.push_str(&format!(
                "  {:>8} ms   {:>11.1}   {:>10.0}\n",
                ms,
                ns,
                ns * self.lines as f64 / 1000.0
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chain_visits_every_line_once_and_returns() {
        for lines in [2, 3, 17, 4096] {
            let memory = chain(lines, 42);
            let mut seen = vec![false; lines];
            let mut at = 0usize;
            for _ in 0..lines {
                assert_eq!(at % SLOTS, 0, "an index points into a line's start");
                assert!(!seen[at / SLOTS], "line {} visited twice", at / SLOTS);
                seen[at / SLOTS] = true;
                at = memory[at] as usize;
            }
            assert_eq!(at, 0, "the walk comes back to the first line");
            assert!(seen.iter().all(|s| *s));
            assert_eq!(walk(&memory, lines), 0);
        }
    }
}
