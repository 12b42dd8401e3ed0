#!/usr/bin/env bash
# The real-model point of BENCHMARKS.md: 8 sessions, closed loop, a fixed
# max_tokens, against llama.cpp's llama-server running Gemma 3 270M on this
# machine's CPU. palaver (`palaver up --model-file`, driven over MQTT by
# `palaver bench`) and the same load sent straight to the same llama-server's
# HTTP API (`palaver bench --direct-url`) take turns in one run, in short
# windows and in the order direct-palaver, palaver-direct, ... so that drift
# in a shared machine's load hits both alike; the table gives palaver's
# throughput as a share of the direct one and the latency palaver adds at p50
# and p99, per pair and as the median of the pairs.
#
#   scripts/bench-real-model.sh          # build (release), run, print the table
#   BENCH_NO_BUILD=1 ...                 # use target/release/palaver (or $BENCH_BIN) as it is
#   BENCH_DURATION=10 BENCH_ROUNDS=6 ... # window per run (s), direct/palaver pairs
#
# Raw results go to target/bench-real-model/. Everything it starts is stopped
# on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=$ROOT/target/bench-real-model
PROJECTS=$ROOT/scripts/bench-real-model-projects.toml
DURATION=${BENCH_DURATION:-10}
WARMUP=${BENCH_WARMUP:-2}
ROUNDS=${BENCH_ROUNDS:-6}
SESSIONS=8

real_model_env=$(bash scripts/real-model)
eval "$real_model_env"
if [ "${BENCH_NO_BUILD:-0}" != 1 ]; then
  cargo build --release --locked -p palaver
fi
BIN=${BENCH_BIN:-$ROOT/target/release/palaver}
mkdir -p "$OUT"
rm -f "$OUT"/*.json

"$BIN" up --mqtt-port 0 --session-port 0 --inference-port 0 --projects "$PROJECTS" \
  --model-file "$PALAVER_MODEL_FILE" >"$OUT/up.out" 2>"$OUT/up.err" &
UP=$!
trap 'kill -INT $UP 2>/dev/null || true; wait $UP 2>/dev/null || true' EXIT
for _ in $(seq 1 900); do
  grep -q '^palaver ready ' "$OUT/up.out" 2>/dev/null && break
  if ! kill -0 "$UP" 2>/dev/null; then
    echo "palaver up did not start:" >&2
    cat "$OUT/up.err" >&2
    exit 1
  fi
  sleep 0.2
done
MQTT_PORT=$(grep -o 'mqtt=[^ ]*' "$OUT/up.out" | sed 's/.*://')
LLAMA_URL=$(grep -o 'llama-server at http://[^ ]*' "$OUT/up.out" | sed 's/^llama-server at //')
[ -n "$MQTT_PORT" ] && [ -n "$LLAMA_URL" ] || { echo "no ports in palaver up's banner" >&2; exit 1; }

common=(--project bench --sessions "$SESSIONS" --duration "$DURATION" --warmup "$WARMUP" --timeout 60 --json)
direct() {
  "$BIN" bench "${common[@]}" --direct-url "$LLAMA_URL" --projects "$PROJECTS" \
    --label "direct-$1" >"$OUT/direct-$1.json"
}
through_palaver() {
  "$BIN" bench "${common[@]}" --port "$MQTT_PORT" --label "palaver-$1" >"$OUT/palaver-$1.json"
}
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
for r in $(seq 1 "$ROUNDS"); do
  echo "pair $r/$ROUNDS: direct to $LLAMA_URL and through palaver (MQTT port $MQTT_PORT)" >&2
  if [ $((r % 2)) = 1 ]; then direct "$r"; through_palaver "$r"; else through_palaver "$r"; direct "$r"; fi
done
load_after=$(cut -d' ' -f1-3 /proc/loadavg)

cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')
python3 - "$OUT" "$ROUNDS" "$(nproc)" "$cpu" "$(git rev-parse --short HEAD)" "$DURATION" "$load_before" "$load_after" <<'PY'
import json, statistics, sys
out, rounds, cores, cpu, commit, duration, load0, load1 = sys.argv[1:9]
rounds = int(rounds)
load = lambda name: json.load(open(f"{out}/{name}.json"))
rows, tot = [], {"direct": 0, "palaver": 0}
errors = 0
for r in range(1, rounds + 1):
    d, p = load(f"direct-{r}"), load(f"palaver-{r}")
    errors += d["errors_total"] + p["errors_total"]
    tot["direct"] += d["replies"]
    tot["palaver"] += p["replies"]
    if not d["replies"] or not p["replies"]:
        sys.exit(f"round {r}: no reply counted (direct {d['replies']}, palaver {p['replies']}): "
                 "a window shorter than one reply? see target/bench-real-model/")
    dl, pl = d["latency_ms"], p["latency_ms"]
    rows.append((r, d["replies_per_sec"], p["replies_per_sec"], dl["p50"], pl["p50"], dl["p99"], pl["p99"]))
print(f"machine: {cores} cores, {cpu}; commit {commit}; load average {load0} before, {load1} after")
print(f"8 sessions, closed loop, max_tokens 16, greedy; {rounds} pairs of {duration} s windows")
print("| pair | direct req/s | palaver req/s | ratio | direct p50 ms | palaver p50 ms | added p50 ms | direct p99 ms | palaver p99 ms | added p99 ms |")
print("|---|---|---|---|---|---|---|---|---|---|")
for r, dr, pr, d50, p50, d99, p99 in rows:
    print(f"| {r} | {dr:.2f} | {pr:.2f} | {pr/dr:.1%} | {d50:.1f} | {p50:.1f} | {p50-d50:+.1f} | {d99:.1f} | {p99:.1f} | {p99-d99:+.1f} |")
med = statistics.median
ratio = med(row[2] / row[1] for row in rows)
add50 = med(row[4] - row[3] for row in rows)
add99 = med(row[6] - row[5] for row in rows)
print(f"| median | {med(r[1] for r in rows):.2f} | {med(r[2] for r in rows):.2f} | {ratio:.1%} | {med(r[3] for r in rows):.1f} | {med(r[4] for r in rows):.1f} | {add50:+.1f} | {med(r[5] for r in rows):.1f} | {med(r[6] for r in rows):.1f} | {add99:+.1f} |")
print(f"all replies: direct {tot['direct']}, palaver {tot['palaver']} ({tot['palaver']/tot['direct']:.1%}); errors: {errors}")
PY
