#!/usr/bin/env bash
# What tracing costs palaver: P1' (one session, instant backend) and P3
# (64 sessions, instant backend) with tracing off and on, in alternating
# order over BENCH_ROUNDS rounds (default 3) so that drift in the machine's
# load hits both alike. "On" exports every turn's spans (the default
# parent-based always-on sampler) over OTLP/gRPC to `palaver-lab otlp-sink`,
# which only counts them. Raw results in target/bench-tracing/, a summary
# table on stdout and in target/bench-tracing/summary.md.
#
#   lab/bench-tracing.sh                 # build (release), run, summarise
#   BENCH_NO_BUILD=1 lab/bench-tracing.sh
set -euo pipefail
ME=lab/bench-tracing.sh
# shellcheck source=scripts/bench-lib.sh
source "$(dirname "$0")/../scripts/bench-lib.sh"
OUT=$ROOT/target/bench-tracing
COMMANDS=$OUT/commands.txt
ROUNDS=${BENCH_ROUNDS:-3}

build_release palaver palaver-lab session-svc inference-svc gateway
rm -rf "$OUT"
mkdir -p "$OUT"
: >"$COMMANDS"
start_redis
start_mosquitto

# run MODE ROUND: one stack, P1' then P3, tracing as MODE says.
run() {
  local mode=$1 round=$2 sink_pid="" sink_log=""
  if [ "$mode" = on ]; then
    start sink "$BIN/palaver-lab" otlp-sink
    sink_pid=$LAST_PID
    sink_log=$LAST_LOG
    OTEL_EXPORTER_OTLP_ENDPOINT=$(log_value "$LAST_LOG" "otlp-sink ready" url)
    export OTEL_EXPORTER_OTLP_ENDPOINT
  fi
  start_stack 0
  bench "p1i-$mode-$round" "$MQTT_PORT" --sessions 1 --warmup "$WARMUP" --duration "$DURATION"
  bench "p3-$mode-$round" "$MQTT_PORT" --sessions 64 --warmup "$WARMUP" --duration "$DURATION"
  stop_stack
  if [ -n "$sink_pid" ]; then
    unset OTEL_EXPORTER_OTLP_ENDPOINT
    stop "$sink_pid"
    grep -F '"spans"' "$sink_log" >"$OUT/sink-$round.json"
    echo "   otlp-sink received $(cat "$OUT/sink-$round.json")"
  fi
}

for round in $(seq 1 "$ROUNDS"); do
  if [ $((round % 2)) = 1 ]; then order="off on"; else order="on off"; fi
  for mode in $order; do
    echo "== round $round, tracing $mode"
    run "$mode" "$round"
  done
done

python3 - "$OUT" "$ROUNDS" <<'PY' | tee "$OUT/summary.md"
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
def load(label):
    return json.load(open(f"{out}/{label}.json"))
rows = []
for point, key, unit in (("p1i", "p50", "ms"), ("p1i", "p99", "ms"), ("p3", "rps", "replies/s"), ("p3", "p50", "ms")):
    vals = {}
    for mode in ("off", "on"):
        v = []
        for r in range(1, rounds + 1):
            d = load(f"{point}-{mode}-{r}")
            v.append(d["replies_per_sec"] if key == "rps" else d["latency_ms"][key])
        vals[mode] = v
    off, on = statistics.median(vals["off"]), statistics.median(vals["on"])
    name = {"p1i": "P1' (1 session, instant backend)", "p3": "P3 (64 sessions, instant backend)"}[point]
    what = "throughput" if key == "rps" else f"latency {key}"
    rows.append(f"| {name} | {what} | {off:.3f} {unit} | {on:.3f} {unit} | {100 * (on - off) / off:+.1f} % | "
                f"{' / '.join(f'{x:.3f}' for x in vals['off'])} | {' / '.join(f'{x:.3f}' for x in vals['on'])} |")
spans = [json.load(open(f"{out}/sink-{r}.json"))["spans"] for r in range(1, rounds + 1)]
print("| point | what | tracing off (median) | tracing on (median) | change | off, each round | on, each round |")
print("|---|---|---|---|---|---|---|")
print("\n".join(rows))
print(f"\nSpans received by the sink per round (tracing on): {spans}")
PY
