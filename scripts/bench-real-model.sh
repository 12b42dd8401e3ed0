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
# Raw results go to target/bench-real-model/; the section between the
# `real-model` markers in BENCHMARKS.md is rewritten (scripts/bench_report.py
# keeps it when it rewrites the rest). Everything it starts is stopped on exit.
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

"$BIN" up --mqtt-port 0 --session-port 0 --inference-port 0 --metrics-port 0 --projects "$PROJECTS" \
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
METRICS=$(grep -o 'metrics=[^ ]*' "$OUT/up.out" | sed 's/^metrics=//')
[ -n "$MQTT_PORT" ] && [ -n "$LLAMA_URL" ] && [ -n "$METRICS" ] || { echo "no ports in palaver up's banner" >&2; exit 1; }

# inference-svc's own count of the model server's time: the sum and count of
# palaver_inference_generation_seconds (admission to last chunk), so that
# palaver's cost is also e2e minus that, on the same requests, whatever pace
# the model keeps on a busy machine.
generation() {
  python3 - "http://$METRICS/metrics" <<'PY'
import sys, urllib.request
values = {}
for line in urllib.request.urlopen(sys.argv[1], timeout=10).read().decode().splitlines():
    for name in ("palaver_inference_generation_seconds_sum", "palaver_inference_generation_seconds_count"):
        if line.startswith(name + " ") or line.startswith(name + "{"):
            values[name] = values.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
print(values.get("palaver_inference_generation_seconds_sum", 0.0),
      values.get("palaver_inference_generation_seconds_count", 0.0))
PY
}

common=(--project bench --sessions "$SESSIONS" --duration "$DURATION" --warmup "$WARMUP" --timeout 60 --json)
direct() {
  "$BIN" bench "${common[@]}" --direct-url "$LLAMA_URL" --projects "$PROJECTS" \
    --label "direct-$1" >"$OUT/direct-$1.json"
}
through_palaver() {
  generation >"$OUT/generation-$1.before"
  "$BIN" bench "${common[@]}" --port "$MQTT_PORT" --label "palaver-$1" >"$OUT/palaver-$1.json"
  generation >"$OUT/generation-$1.after"
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
dropped, own = [], []
for r in range(1, rounds + 1):
    d, p = load(f"direct-{r}"), load(f"palaver-{r}")
    if not d["replies"] or not p["replies"]:
        # A window without one reply says only that the machine was taken.
        dropped.append(r)
        continue
    errors += d["errors_total"] + p["errors_total"]
    (s0, c0), (s1, c1) = (map(float, open(f"{out}/generation-{r}.{w}").read().split()) for w in ("before", "after"))
    gen_ms = (s1 - s0) / (c1 - c0) * 1000 if c1 > c0 else None
    own.append(p["latency_ms"]["mean"] - gen_ms if gen_ms else None)
    tot["direct"] += d["replies"]
    tot["palaver"] += p["replies"]
    dl, pl = d["latency_ms"], p["latency_ms"]
    rows.append((r, d["replies_per_sec"], p["replies_per_sec"], dl["p50"], pl["p50"], dl["p99"], pl["p99"]))
if not rows:
    sys.exit("no pair had replies on both sides: the machine is too busy to measure")
med = statistics.median
owns = [v for v in own if v is not None] or [float("nan")]
ratios = [row[2] / row[1] for row in rows]
add50s = [row[4] - row[3] for row in rows]
add99s = [row[6] - row[5] for row in rows]
ratio, add50, add99 = med(ratios), med(add50s), med(add99s)
all_ratio = tot["palaver"] / tot["direct"]
# A verdict only where the pairs agree on it: on a shared 2-core machine the
# model's own pace swings more between windows than palaver's cost.
def verdict(values, ok):
    if all(ok(v) for v in values):
        return "**met** (every pair)"
    if not any(ok(v) for v in values):
        return "**not met** (every pair)"
    return f"median {'met' if ok(med(values)) else 'not met'}; **unresolved**: the pairs disagree"
lines = [
    "<!-- real-model: written by scripts/bench-real-model.sh; scripts/bench_report.py keeps it -->",
    "## Real model: palaver in front of llama-server (Gemma 3 270M on the CPU)",
    "",
    f"Written by `scripts/bench-real-model.sh` on commit `{commit}`: {rounds} pairs of {duration} s windows "
    f"(after a warm-up each), in the order direct-palaver, palaver-direct, ... so that drift in the machine's "
    f"load hits both alike. Machine: {cores} cores, {cpu}; load average {load0} before the run, {load1} after.",
    "",
    "8 sessions, closed loop, 64-byte messages, `max_tokens` 16, greedy decoding, and no history kept "
    "(`scripts/bench-real-model-projects.toml`), so every request is the same prompt and both paths ask the model "
    "for exactly the same 16 tokens. *direct* is `palaver bench --direct-url`: the same requests sent straight to "
    "llama-server's `/v1/chat/completions`, streamed, as inference-svc sends them. *palaver* is `palaver up "
    "--model-file` (embedded broker, one process) driven over MQTT by `palaver bench`. llama-server runs with "
    "8 slots and an 8192-token context on the same 2 cores as palaver and the load generator.",
    "",
    "| point | what | target | result (median of the pairs) | verdict |",
    "|---|---|---|---|---|",
    f"| R1 | palaver's replies/s as a share of direct | ≥ 98 % | {ratio:.1%} (pairs {min(ratios):.1%} to {max(ratios):.1%}; all replies {all_ratio:.1%}) | {verdict(ratios, lambda v: v >= 0.98)} |",
    f"| R2 | latency palaver adds, p50 | ≤ 5 ms | {add50:+.1f} ms (pairs {min(add50s):+.1f} to {max(add50s):+.1f} ms) | {verdict(add50s, lambda v: v <= 5.0)} |",
    f"| R2' | latency palaver adds, p99 | — | {add99:+.1f} ms (pairs {min(add99s):+.1f} to {max(add99s):+.1f} ms) | |",
    f"| R2'' | palaver's own time per turn, mean: e2e minus the model server's time on the same turns (inference-svc's generation histogram) | ≤ 5 ms | {med(owns):+.1f} ms (windows {min(owns):+.1f} to {max(owns):+.1f} ms) | {verdict(owns, lambda v: v <= 5.0)} |",
    "",
    "| pair | direct replies/s | palaver replies/s | ratio | direct p50 ms | palaver p50 ms | added p50 ms | direct p99 ms | palaver p99 ms | added p99 ms |",
    "|---|---|---|---|---|---|---|---|---|---|",
]
for r, dr, pr, d50, p50, d99, p99 in rows:
    lines.append(f"| {r} | {dr:.2f} | {pr:.2f} | {pr/dr:.1%} | {d50:.1f} | {p50:.1f} | {p50-d50:+.1f} | {d99:.1f} | {p99:.1f} | {p99-d99:+.1f} |")
# Only the load before the run tells of other work: during it llama-server's
# 8 slots keep every core busy themselves, so the load after is always high.
busy = dropped or float(load0.split()[0]) > 1.0
lines += [
    "",
    ("**This run measured the machine, not palaver**: other work kept it busy (a load average above "
     "1 before the run, or windows without a reply), and llama.cpp's threads "
     "slow down far more than in proportion when they must wait for a core. Rerun on a quiet machine. "
     if busy else "") +
    (f"Pairs left out, a window without a single reply (the machine taken by other work): {dropped}. " if dropped else "") +
    f"Errors: {errors}. A reply takes over a second here (8 sequences share 2 cores), and the spread between "
    "pairs is the resolution of this measurement: tens of milliseconds, not the 5 ms of the target. On a GPU the "
    "model would not share its cores with palaver; here palaver's own CPU time (broker, three services) is taken "
    "from the model's, which the throughput ratio includes.",
    "<!-- /real-model -->",
]
section = "\n".join(lines) + "\n"
print(section)
bench_md = "BENCHMARKS.md"
text = open(bench_md).read()
start, end = "<!-- real-model:", "<!-- /real-model -->"
if start in text and end in text:
    i, j = text.index(start), text.index(end) + len(end) + 1
    text = text[:i] + section + text[j:]
else:
    k = text.index("## Machine")
    text = text[:k] + section + "\n" + text[k:]
open(bench_md, "w").write(text)
print(f"updated {bench_md}", file=sys.stderr)
PY
