#!/usr/bin/env bash
# Time to the first streamed piece over MQTT against the fake vLLM's time to
# first token, and pieces per turn (BENCHMARKS.md, "Streamed replies").
#
# Starts redis-server, mosquitto (TCP_NODELAY, as scripts/bench.sh), the fake
# vLLM and the three release binaries, then runs `palaver bench --stream` for
# one session and for 8, and one session without --stream for comparison.
# Needs a release build: cargo build --release.
# BENCH_TTFT_MS, BENCH_TPOT_MS, BENCH_TOKENS, BENCH_DURATION tune the runs.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${BIN:-$ROOT/target/release}
PROJECTS=$ROOT/scripts/bench-projects.toml
TTFT=${BENCH_TTFT_MS:-100}
TPOT=${BENCH_TPOT_MS:-10}
TOKENS=${BENCH_TOKENS:-64}
DURATION=${BENCH_DURATION:-20}
OUT=${BENCH_OUT:-$ROOT/target/bench-stream}
WORK=$(mktemp -d)
mkdir -p "$OUT"
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
start() {
  local name=$1
  shift
  "$@" >"$WORK/$name.log" 2>&1 &
  PIDS+=("$!")
}
# log_addr LOG TEXT: the addr=... of the first line of LOG holding TEXT.
log_addr() {
  for _ in $(seq 1 200); do
    local line
    line=$(grep -m1 -F -- "$2" "$1" 2>/dev/null || true)
    if [ -n "$line" ]; then
      tr ' ' '\n' <<<"$line" | sed -n 's/^\(addr\|url\)=//p' | head -1
      return 0
    fi
    sleep 0.1
  done
  echo "no '$2' in $1:" >&2
  cat "$1" >&2
  exit 1
}

MQTT_PORT=$(free_port)
REDIS_PORT=$(free_port)
cat >"$WORK/mosquitto.conf" <<EOF
listener $MQTT_PORT 127.0.0.1
allow_anonymous true
persistence false
max_queued_messages 100000
max_inflight_messages 0
set_tcp_nodelay true
EOF
MOSQUITTO=$(command -v mosquitto || echo /usr/sbin/mosquitto)
start mosquitto "$MOSQUITTO" -c "$WORK/mosquitto.conf"
start redis redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$WORK"
start fake "$BIN/palaver" fake-vllm --listen 127.0.0.1:0 --ttft "$TTFT" --tpot "$TPOT" --tokens "$TOKENS"
FAKE_URL=$(log_addr "$WORK/fake.log" "fake-vllm ready")
start inference "$BIN/inference-svc" --listen 127.0.0.1:0 --vllm-url "$FAKE_URL"
INF=$(log_addr "$WORK/inference.log" "inference-svc listening")
start session "$BIN/session-svc" --listen 127.0.0.1:0 --redis-url "redis://127.0.0.1:$REDIS_PORT/" \
  --inference-url "http://$INF" --projects-file "$PROJECTS"
SES=$(log_addr "$WORK/session.log" "session-svc listening")
start gateway "$BIN/gateway" --mqtt-url "mqtt://127.0.0.1:$MQTT_PORT" --session-url "http://$SES" \
  --projects-file "$PROJECTS"
log_addr "$WORK/gateway.log" "subscribed" >/dev/null || true
"$BIN/palaver" send --port "$MQTT_PORT" --project bench --timeout-secs 60 "ready?" >/dev/null

run() {
  local label=$1
  shift
  echo "== $label: palaver bench $*"
  "$BIN/palaver" bench --port "$MQTT_PORT" --project bench --label "$label" --json \
    --warmup 3 --duration "$DURATION" "$@" >"$OUT/$label.json"
}
run stream-1 --sessions 1 --stream
run plain-1 --sessions 1
run stream-8 --sessions 8 --stream

python3 - "$OUT" "$TTFT" "$TPOT" "$TOKENS" <<'PY'
import json, sys
out, ttft, tpot, tokens = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
whole = ttft + (tokens - 1) * tpot
print(f"fake: ttft {ttft:g} ms, tpot {tpot:g} ms, {tokens} tokens (whole reply {whole:g} ms)")
for label in ["stream-1", "plain-1", "stream-8"]:
    r = json.load(open(f"{out}/{label}.json"))
    l = r["latency_ms"]
    line = f"{label}: {r['replies']} replies, {r['errors_total']} errors; reply p50 {l['p50']:.3f} p99 {l['p99']:.3f} ms (minus the whole reply: p50 {l['p50'] - whole:.3f})"
    f = r.get("first_piece_ms")
    if f:
        p = r["pieces_per_turn"]
        line += f"; first piece p50 {f['p50']:.3f} p90 {f['p90']:.3f} p99 {f['p99']:.3f} ms (minus ttft: p50 {f['p50'] - ttft:.3f}, p99 {f['p99'] - ttft:.3f}); pieces per turn mean {p['mean']:.1f} min {p['min']} max {p['max']}"
    print(line)
PY
