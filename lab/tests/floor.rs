//! `palaver-lab floor` as a benchmark script runs it: a subprocess that starts
//! its own relay processes and prints one JSON object.

use std::time::Duration;

use serde_json::Value;
use tokio::process::Command;

const LAB: &str = env!("CARGO_BIN_EXE_palaver-lab");

async fn floor(args: &[&str]) -> std::process::Output {
    let run = Command::new(LAB)
        .arg("floor")
        .args(args)
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("palaver-lab floor did not finish within 60 s")
        .expect("palaver-lab floor did not start")
}

#[tokio::test]
async fn times_fourteen_hops_around_the_backend_pause() {
    let out = floor(&[
        "--backend-ms",
        "20",
        "--warmup",
        "0.2",
        "--duration",
        "1",
        "--json",
    ])
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(report["hops"], 14);
    assert_eq!(report["processes"], 7);
    assert_eq!(report["backend_ms"], 20.0);
    // One frame in flight, 20 ms a round: some fifty in a second; fewer
    // than ten would mean frames were lost or the loop stalled.
    let rounds = report["round_trips"].as_u64().unwrap();
    assert!((10..=50).contains(&rounds), "{rounds} round trips in 1 s");
    // Every round trip waited out the pause, and the hops add little to it
    // (generous: a loaded 2-core CI machine).
    let min = report["latency_ms"]["min"].as_f64().unwrap();
    let p50 = report["latency_ms"]["p50"].as_f64().unwrap();
    assert!(
        min >= 20.0,
        "a round trip of {min} ms skipped the 20 ms pause"
    );
    assert!(
        p50 < 20.0 + 10.0,
        "median round trip {p50} ms for a 20 ms pause"
    );
}

#[tokio::test]
async fn refuses_a_window_of_nothing() {
    let out = floor(&["--duration", "0"]).await;
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--duration"), "{err}");
}
