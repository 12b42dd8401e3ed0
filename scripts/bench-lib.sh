# shellcheck shell=bash
# What scripts/bench.sh (palaver's standard points) and lab/bench-vm.sh (the
# machine's diagnostics) share: the settings, starting and stopping every
# process, and the stack of three services over mosquitto. Sourced, not run;
# the sourcing script sets ME (its name in error messages) before, and
# COMMANDS (the file its commands are listed in) before starting anything.
# The settings and the pids set here are read by the scripts that source it.
# shellcheck disable=SC2034

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
OUT=$ROOT/target/bench
BIN=$ROOT/target/release
PROJECTS=$ROOT/scripts/bench-projects.toml

if [ "${BENCH_QUICK:-0}" = 1 ]; then
  WARMUP=1; DURATION=4; LONG=6; SWEEP_DURATION=3
else
  # P2's throughput is counted in batches of 8 replies every 100 ms; a 20 s
  # window keeps the one-batch rounding under 0.5 %. P1 gets it too, so that
  # its p99 rests on some 200 replies rather than 100.
  WARMUP=2; DURATION=10; LONG=20; SWEEP_DURATION=6
fi
# Backend pauses (ms) between P1' (0) and P1 (100) for the idle curve.
IDLE_PAUSES="3 10 30"

need() {
  echo "$ME: $1 not found. $2" >&2
  exit 1
}
command -v redis-server >/dev/null || need redis-server "Install it: apt-get install -y redis-server"
MOSQUITTO=$(command -v mosquitto || true)
[ -n "$MOSQUITTO" ] || { [ -x /usr/sbin/mosquitto ] && MOSQUITTO=/usr/sbin/mosquitto; } ||
  need mosquitto "Install it: apt-get install -y mosquitto"
command -v python3 >/dev/null || need python3 "Install it: apt-get install -y python3"
command -v curl >/dev/null || need curl "Install it: apt-get install -y curl"

# build_release PACKAGE...: the release build of these packages (each has a
# binary of its name), unless BENCH_NO_BUILD=1; then checks every binary is
# there. BUILT says whether it built.
build_release() {
  local b args=()
  BUILT=false
  if [ "${BENCH_NO_BUILD:-0}" != 1 ]; then
    echo "== building release binaries"
    for b in "$@"; do args+=(-p "$b"); done
    cargo build --release --locked "${args[@]}"
    BUILT=true
  fi
  for b in "$@"; do
    [ -x "$BIN/$b" ] || need "$BIN/$b" "Build it: cargo build --release -p $b"
  done
}

WORK=$(mktemp -d "${TMPDIR:-/tmp}/palaver-bench.XXXXXX")
PIDS=()
# on_exit: what the sourcing script puts back on exit besides stopping its
# processes; it redefines this when it changes the machine.
on_exit() { :; }
cleanup() {
  on_exit
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# start NAME CMD...: runs CMD in the background, logging to a fresh
# $WORK/NAME-<n>.log (LAST_LOG); its pid is LAST_PID.
STARTED=0
start() {
  local name=$1
  shift
  STARTED=$((STARTED + 1))
  LAST_LOG=$WORK/$name-$STARTED.log
  : >"$LAST_LOG"
  echo "$*" >>"$COMMANDS"
  "$@" >"$LAST_LOG" 2>&1 &
  LAST_PID=$!
  PIDS+=("$LAST_PID")
}

stop() {
  kill "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}

# show_logs: the start and the end of every log so far, on stderr. The start
# matters: a service that exits prints its error first, then a backtrace.
show_logs() {
  local log
  for log in "$WORK"/*.log; do
    echo "==> $log <==" >&2
    if [ "$(wc -l <"$log")" -le 24 ]; then
      cat "$log" >&2
    else
      head -n 12 "$log" >&2
      echo "[...]" >&2
      tail -n 12 "$log" >&2
    fi
  done
}

wait_port() {
  local port=$1 what=$2
  for _ in $(seq 1 100); do
    if python3 -c "import socket,sys; socket.create_connection(('127.0.0.1',$port),0.2)" 2>/dev/null; then
      return 0
    fi
    sleep 0.1
  done
  echo "$ME: $what did not listen on port $port; the logs so far:" >&2
  show_logs
  exit 1
}

# log_value LOG TEXT KEY: waits for the first line of LOG that contains
# TEXT (a ready line, or a service's "... listening addr=..." log line) and
# prints its KEY=value.
log_value() {
  local log=$1 text=$2 key=$3
  for _ in $(seq 1 200); do
    local line
    line=$(grep -m1 -F -- "$text" "$log" 2>/dev/null || true)
    if [ -n "$line" ]; then
      tr ' ' '\n' <<<"$line" | sed -n "s/^$key=//p"
      return 0
    fi
    sleep 0.1
  done
  echo "$ME: no '$text' line in $log:" >&2
  cat "$log" >&2
  exit 1
}

# log_port LOG TEXT: the port of the addr=HOST:PORT on LOG's line TEXT.
log_port() {
  local addr
  addr=$(log_value "$1" "$2" addr) || exit 1
  echo "${addr##*:}"
}

# bench LABEL MQTT_PORT ARGS...: one `palaver bench` run, JSON to $OUT/LABEL.json.
bench() {
  local label=$1 port=$2
  shift 2
  local cmd=("$BIN/palaver" bench --port "$port" --project bench --label "$label" --json "$@")
  echo "${cmd[*]}" >>"$COMMANDS"
  echo "== $label: palaver bench $*"
  # The services' metrics around every run (RUN_METRICS: "name:port ..."):
  # session-svc's swap times by load, and each service's own clock on its
  # part of a turn, for the one-session breakdown.
  scrape_all "$label" before
  # Bounded: the run's own windows plus connecting and closing.
  timeout 300 "${cmd[@]}" >"$OUT/$label.json"
  scrape_all "$label" after
  python3 - "$OUT/$label.json" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
l = d["latency_ms"]
fmt = lambda v: "-" if v is None else f"{v:.3f}"
print(f"   {d['replies_per_sec']:.1f} replies/s, errors {d['errors_total']}, "
      f"latency ms p50 {fmt(l['p50'])} p90 {fmt(l['p90'])} p99 {fmt(l['p99'])} max {fmt(l['max'])}")
EOF
}

scrape() { curl -sf "http://127.0.0.1:$1/metrics" >"$OUT/$2.metrics"; }
# scrape_all LABEL WHEN: every endpoint in RUN_METRICS to $OUT/LABEL-NAME-WHEN.metrics.
scrape_all() {
  local m
  for m in ${RUN_METRICS:-}; do scrape "${m#*:}" "$1-${m%%:*}-$2"; done
}

# A sanity check that the stack answers before anything is measured (a
# first turn under callgrind takes seconds).
answer_check() {
  local port=$1
  if ! "$BIN/palaver" send --port "$port" --project bench --timeout-secs 60 "ready?" >/dev/null; then
    echo "$ME: the stack on MQTT port $port does not answer; the logs so far:" >&2
    show_logs
    exit 1
  fi
}

# start_redis: redis-server on a free port, shared by every run. Sets
# REDIS_PORT REDIS_PID REDIS_URL.
start_redis() {
  REDIS_PORT=$(free_port)
  start redis redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$WORK"
  REDIS_PID=$LAST_PID
  wait_port "$REDIS_PORT" redis
  REDIS_URL="redis://127.0.0.1:$REDIS_PORT/"
}

# start_mosquitto: mosquitto on a free port, shared by every run. Sets
# MQTT_PORT MOSQUITTO_PID.
start_mosquitto() {
  MQTT_PORT=$(free_port)
  # The test suite's settings, plus TCP_NODELAY: mosquitto leaves Nagle on by
  # default, and a reply written right after a PUBACK then waits for the
  # client's delayed ACK (~40 ms). Every latency-minded deployment sets it.
  cat >"$WORK/mosquitto.conf" <<EOF
listener $MQTT_PORT 127.0.0.1
allow_anonymous true
persistence false
max_queued_messages 100000
max_inflight_messages 0
set_tcp_nodelay true
EOF
  cp "$WORK/mosquitto.conf" "$OUT/mosquitto.conf"
  start mosquitto "$MOSQUITTO" -c "$WORK/mosquitto.conf"
  MOSQUITTO_PID=$LAST_PID
  wait_port "$MQTT_PORT" mosquitto
}

# service NAME CMD...: `start` for one of the three services; under
# callgrind, its dumps in $FOOTPRINT_DIR, when that is set.
service() {
  local name=$1
  shift
  if [ -n "${FOOTPRINT_DIR:-}" ]; then
    start "$name" valgrind --tool=callgrind --dump-instr=yes --compress-strings=no --compress-pos=no \
      --callgrind-out-file="$FOOTPRINT_DIR/$name.%p" "$@"
  else
    start "$name" "$@"
  fi
}

# start_stack TTFT_MS: fake vLLM with that time to first token (nothing per
# further token, 16 words a reply), then inference-svc, session-svc and the
# gateway as separate processes, over start_redis's Redis and
# start_mosquitto's broker. Sets FAKE_PID INF_PID SES_PID GW_PID and the
# metrics ports.
start_stack() {
  local ttft=$1
  start fake "$BIN/palaver" fake-vllm --listen 127.0.0.1:0 --ttft "$ttft" --tpot 0 --tokens 16
  FAKE_PID=$LAST_PID
  FAKE_URL=$(log_value "$LAST_LOG" "fake-vllm ready" url)
  # Every listener on port 0, its port read from the log line that names
  # it: ports picked in advance and bound later could collide.
  service inference "$BIN/inference-svc" --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 \
    --vllm-url "$FAKE_URL"
  INF_PID=$LAST_PID
  local inf_port
  inf_port=$(log_port "$LAST_LOG" "inference-svc listening")
  INF_METRICS=$(log_port "$LAST_LOG" "metrics at /metrics")
  service session "$BIN/session-svc" --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 \
    --redis-url "$REDIS_URL" --inference-url "http://127.0.0.1:$inf_port" --projects-file "$PROJECTS"
  SES_PID=$LAST_PID
  local ses_port
  ses_port=$(log_port "$LAST_LOG" "session-svc listening")
  SES_METRICS=$(log_port "$LAST_LOG" "metrics at /metrics")
  service gateway "$BIN/gateway" --mqtt-url "mqtt://127.0.0.1:$MQTT_PORT" --session-url "http://127.0.0.1:$ses_port" \
    --projects-file "$PROJECTS" --metrics-listen 127.0.0.1:0
  GW_PID=$LAST_PID
  GW_METRICS=$(log_port "$LAST_LOG" "metrics at /metrics")
  # Subscribed only after its metrics listener is up: a message published
  # before that has no subscriber and is dropped (seen under callgrind).
  log_value "$LAST_LOG" "subscribed project=bench" project >/dev/null
  answer_check "$MQTT_PORT"
  RUN_METRICS="session:$SES_METRICS gateway:$GW_METRICS inference:$INF_METRICS"
}

stop_stack() {
  for pid in $GW_PID $SES_PID $INF_PID $FAKE_PID; do stop "$pid"; done
}
