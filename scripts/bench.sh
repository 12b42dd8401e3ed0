#!/usr/bin/env bash
# palaver's standard benchmark points, on this machine, from scratch.
#
# Starts its own redis-server and mosquitto on free ports, the fake vLLM
# (`palaver fake-vllm`), the three services as separate release binaries,
# and drives them with `palaver bench` over MQTT; then repeats the key points
# against `palaver up` (embedded broker, one process). Raw results go to
# target/bench/, and scripts/bench_report.py turns them into BENCHMARKS.md
# and docs/bench.svg. Everything it starts is stopped on exit.
#
#   scripts/bench.sh            # build (release), run everything, rewrite the report
#   BENCH_QUICK=1 scripts/bench.sh   # shorter windows, for trying the script out
#   BENCH_NO_BUILD=1 ...        # use the release binaries as they are
#   BENCH_FOOTPRINT=0 ...       # skip the instruction counts (callgrind, about a minute)
#   BENCH_GUEST_HALT_POLL_NS=200000 ...  # also rerun P1 and P1' with the
#       guest's idle vCPUs polling this long before they halt (a diagnostic of
#       the machine, not a verdict; needs root; the old value is put back)
#
# Takes five to eight minutes on a 2-core machine (plus the build), as busy as
# the host is; the report says how long its own runs took.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
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
  echo "scripts/bench.sh: $1 not found. $2" >&2
  exit 1
}
command -v redis-server >/dev/null || need redis-server "Install it: apt-get install -y redis-server"
MOSQUITTO=$(command -v mosquitto || true)
[ -n "$MOSQUITTO" ] || { [ -x /usr/sbin/mosquitto ] && MOSQUITTO=/usr/sbin/mosquitto; } ||
  need mosquitto "Install it: apt-get install -y mosquitto"
command -v python3 >/dev/null || need python3 "Install it: apt-get install -y python3"
command -v curl >/dev/null || need curl "Install it: apt-get install -y curl"

BUILT=false
if [ "${BENCH_NO_BUILD:-0}" != 1 ]; then
  echo "== building release binaries"
  cargo build --release --locked -p palaver -p palaver-lab -p session-svc -p inference-svc -p gateway
  BUILT=true
fi
for b in palaver palaver-lab session-svc inference-svc gateway; do
  [ -x "$BIN/$b" ] || need "$BIN/$b" "Build it: cargo build --release -p $b"
done

WORK=$(mktemp -d "${TMPDIR:-/tmp}/palaver-bench.XXXXXX")
PIDS=()
HALT_POLL=/sys/module/haltpoll/parameters/guest_halt_poll_ns
OLD_HALT_POLL=""
cleanup() {
  [ -z "$OLD_HALT_POLL" ] || echo "$OLD_HALT_POLL" >"$HALT_POLL" || true
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

rm -rf "$OUT"
mkdir -p "$OUT"
: >"$OUT/commands.txt"

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
  echo "$*" >>"$OUT/commands.txt"
  "$@" >"$LAST_LOG" 2>&1 &
  LAST_PID=$!
  PIDS+=("$LAST_PID")
}

stop() {
  kill "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}

# with_busy_vcpus CMD...: runs CMD with one spinner per CPU at SCHED_IDLE,
# the policy any task that wakes preempts at once. They keep this VM's
# vCPUs from halting when palaver sits idle, and give way to palaver
# whenever it runs: the diagnostic of whether what idleness costs is the
# VM's own halting or the host's. Skipped without chrt and taskset
# (util-linux).
with_busy_vcpus() {
  if ! command -v chrt >/dev/null || ! command -v taskset >/dev/null; then
    echo "== skipped, no chrt or taskset: $*"
    return 0
  fi
  local cpu pid spinners=()
  for cpu in $(seq 0 $(($(nproc) - 1))); do
    taskset -c "$cpu" chrt --idle 0 bash -c 'while :; do :; done' &
    spinners+=("$!")
    PIDS+=("$!")
  done
  echo "taskset -c CPU chrt --idle 0 bash -c 'while :; do :; done'   # one per CPU" >>"$OUT/commands.txt"
  "$@"
  for pid in "${spinners[@]}"; do stop "$pid"; done
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
  echo "scripts/bench.sh: $what did not listen on port $port; the logs so far:" >&2
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
  echo "scripts/bench.sh: no '$text' line in $log:" >&2
  cat "$log" >&2
  exit 1
}

# log_port LOG TEXT: the port of the addr=HOST:PORT on LOG's line TEXT.
log_port() {
  local addr
  addr=$(log_value "$1" "$2" addr) || exit 1
  echo "${addr##*:}"
}

# cpu_ticks: "name ticks" (user + system, in clock ticks) of every process
# of the stack, and the tick rate, to see where the CPU goes during P3.
cpu_ticks() {
  echo "clk_tck $(getconf CLK_TCK)"
  echo "uptime $(cut -d' ' -f1 /proc/uptime)"
  local name pid
  for name in gateway:$GW_PID session-svc:$SES_PID inference-svc:$INF_PID fake-vllm:$FAKE_PID \
    mosquitto:$MOSQUITTO_PID redis:$REDIS_PID; do
    pid=${name#*:}
    echo "${name%%:*} $(awk '{print $14 + $15}' "/proc/$pid/stat")"
  done
}

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
hwm_kib() { awk '/^VmHWM:/ {print $2}' "/proc/$1/status"; }

# bench LABEL MQTT_PORT ARGS...: one `palaver bench` run, JSON to $OUT/LABEL.json.
bench() {
  local label=$1 port=$2
  shift 2
  local cmd=("$BIN/palaver" bench --port "$port" --project bench --label "$label" --json "$@")
  echo "${cmd[*]}" >>"$OUT/commands.txt"
  echo "== $label: palaver bench $*"
  # The services' metrics around every run (RUN_METRICS: "name:port ..."):
  # session-svc's lock times by load, and each service's own clock on its
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
    echo "scripts/bench.sh: the stack on MQTT port $port does not answer; the logs so far:" >&2
    show_logs
    exit 1
  fi
}

# The fake's own latency, straight over HTTP (no palaver): what "backend
# 100 ms" and "instant backend" really are.
calibrate_fake() {
  local url=$1 label=$2
  python3 - "$url" "$OUT/fake-$label.json" <<'EOF'
import http.client, json, statistics, sys, time, urllib.parse
url, out = sys.argv[1], sys.argv[2]
u = urllib.parse.urlparse(url)
conn = http.client.HTTPConnection(u.hostname, u.port)
body = json.dumps({"model": "fake-model", "stream": True, "max_tokens": 512,
                   "stream_options": {"include_usage": True},
                   "messages": [{"role": "user", "content": "calibration"}]})
samples = []
for i in range(40):
    t = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body, {"content-type": "application/json"})
    r = conn.getresponse()
    r.read()
    if i >= 5:
        samples.append((time.perf_counter() - t) * 1000)
samples.sort()
json.dump({"median_ms": statistics.median(samples), "p90_ms": samples[int(len(samples) * 0.9)],
           "n": len(samples)}, open(out, "w"))
print(f"   fake vLLM alone: median {statistics.median(samples):.3f} ms over {len(samples)} streamed requests")
EOF
}

echo "== machine"
python3 - "$OUT/machine.json" "$MOSQUITTO" <<'EOF'
import json, os, platform, subprocess, sys
def run(*cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        return ""
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
mem_kib = next(int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemTotal"))
virt = ", ".join(v for v in (run("systemd-detect-virt", "--vm"), run("systemd-detect-virt", "--container"))
                if v and v != "none")
m = {
    "nproc": os.cpu_count(),
    "cpu": cpu,
    "memory_gib": round(mem_kib / 1024 / 1024, 1),
    "kernel": platform.release(),
    "virtualization": virt,
    "rustc": run("rustc", "--version"),
    "redis": run("redis-server", "--version"),
    "mosquitto": run(sys.argv[2], "-h").splitlines()[0] if run(sys.argv[2], "-h") else "",
    "python": platform.python_version(),
    "commit": run("git", "rev-parse", "--short", "HEAD"),
    # This script's own outputs do not count: after a run they are always
    # modified, and they are not what is measured.
    "dirty": bool(run("git", "status", "--porcelain", "--untracked-files=no", "--",
                      ".", ":!BENCHMARKS.md", ":!docs/bench.svg")),
    "date": run("date", "-u", "+%Y-%m-%d %H:%M UTC"),
}
json.dump(m, open(sys.argv[1], "w"), indent=1)
print("  ", m["nproc"], "cores,", m["cpu"], ",", m["memory_gib"], "GiB, kernel", m["kernel"])
EOF

# --- Redis and mosquitto, shared by every run ----------------------------
REDIS_PORT=$(free_port)
start redis redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$WORK"
REDIS_PID=$LAST_PID
wait_port "$REDIS_PORT" redis
REDIS_URL="redis://127.0.0.1:$REDIS_PORT/"

# What one hop between two processes costs on this machine: a Redis PING
# round trip back to back, and after the processes sat idle for a while
# (a turn is fourteen such hops, and P1's reply path starts after
# 100 ms of idleness).
echo "== loopback round trips"
python3 - "$REDIS_PORT" "$OUT/loopback.json" <<'EOF'
import json, socket, statistics, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
def ping():
    t = time.perf_counter()
    s.sendall(b"PING\r\n")
    s.recv(64)
    return (time.perf_counter() - t) * 1e6
result = {}
for gap_ms in (0, 1, 10, 100):
    samples = []
    for _ in range(60):
        if gap_ms:
            time.sleep(gap_ms / 1000)
        samples.append(ping())
    result[str(gap_ms)] = statistics.median(samples[10:])
json.dump({"redis_ping_median_us_after_idle_ms": result}, open(sys.argv[2], "w"))
print("   Redis PING median:", ", ".join(f"{v:.0f} µs after {k} ms idle" for k, v in result.items()))
EOF

# What reading memory costs after the process sat idle: a chain of cache
# lines walked back to back and after sleeps (what a service's reply path
# finds in the caches once the backend's pause is over).
# idle_memory NAME: the walk, to $OUT/NAME.json.
idle_memory() {
  echo "== $1"
  echo "$BIN/palaver-lab idle-memory --json" >>"$OUT/commands.txt"
  "$BIN/palaver-lab" idle-memory --json >"$OUT/$1.json"
  python3 - "$OUT/$1.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"   {r['lines']} cache lines, ns per line:",
      ", ".join(f"{w['ns_per_line']:.0f} after {w['idle_ms']:g} ms idle" for w in r["median_by_idle"]))
EOF
}
idle_memory idle-memory
with_busy_vcpus idle_memory idle-memory-busy

# The same fourteen hops a turn crosses, with no work at any of them:
# `palaver-lab floor` sends a frame through six relay processes (tokio, like the
# services) and back, the backend's relay pausing as the fake does. What
# one session could cost here at best, to hold P1' and P1 against.
echo "== floor: a turn's hops with no work"
floor() {
  local label=$1
  shift
  local cmd=("$BIN/palaver-lab" floor --label "$label" --json "$@")
  echo "${cmd[*]}" >>"$OUT/commands.txt"
  "${cmd[@]}" >"$OUT/$label.json"
  python3 - "$OUT/$label.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
l = r["latency_ms"]
print(f"   backend {r['backend_ms']:g} ms: {r['round_trips']} round trips, p50 {l['p50']:.3f} p99 {l['p99']:.3f} ms")
PY
}
floor floor-instant --backend-ms 0 --warmup "$WARMUP" --duration "$DURATION"
floor floor-100ms --backend-ms 100 --warmup "$WARMUP" --duration "$LONG"

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

# callgrind_ctl ARGS...: callgrind_control, failing the run when it could not
# reach the process. It exits 0 even then; a zeroing that silently did not
# happen would count the warm-up as turns.
callgrind_ctl() {
  local said
  said=$(callgrind_control "$@" 2>&1)
  if grep -q '^Error' <<<"$said"; then
    echo "scripts/bench.sh: callgrind_control $*: $said" >&2
    exit 1
  fi
}

# start_stack TTFT_MS: fake vLLM with that time to first token (nothing per
# further token, 16 words a reply), then inference-svc, session-svc and the
# gateway as separate processes. Sets FAKE_PID INF_PID SES_PID GW_PID and
# the metrics ports.
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

# --- separate services, mosquitto, instant backend -------------------------
echo "== services + mosquitto, instant backend"
start_stack 0
calibrate_fake "$FAKE_URL" instant
bench p1i "$MQTT_PORT" --sessions 1 --warmup "$WARMUP" --duration "$DURATION"
for n in 8 16 32; do
  bench sweep-instant-$n "$MQTT_PORT" --sessions "$n" --warmup "$WARMUP" --duration "$SWEEP_DURATION"
done
cpu_ticks >"$OUT/p3-cpu-before.txt"
bench p3 "$MQTT_PORT" --sessions 64 --warmup "$WARMUP" --duration "$DURATION"
cpu_ticks >"$OUT/p3-cpu-after.txt"
scrape "$INF_METRICS" p3-inference
scrape "$GW_METRICS" p3-gateway
python3 - "$OUT/p5.json" "$GW_PID" "$SES_PID" "$INF_PID" "$FAKE_PID" <<'EOF'
import json, sys
def status(pid, key):
    return next(int(l.split()[1]) for l in open(f"/proc/{pid}/status") if l.startswith(key + ":"))
names = ["gateway", "session-svc", "inference-svc", "fake-vllm"]
json.dump({n: {"rss_kib": status(p, "VmRSS"), "hwm_kib": status(p, "VmHWM")}
           for n, p in zip(names, sys.argv[2:])}, open(sys.argv[1], "w"), indent=1)
EOF
stop_stack

# --- separate services, mosquitto, backend 100 ms --------------------------
echo "== services + mosquitto, backend 100 ms"
start_stack 100
calibrate_fake "$FAKE_URL" 100ms
bench p1 "$MQTT_PORT" --sessions 1 --warmup "$WARMUP" --duration "$LONG"
with_busy_vcpus bench busy-p1 "$MQTT_PORT" --sessions 1 --warmup "$WARMUP" --duration "$LONG"
for n in 8 16 32; do
  bench sweep-100ms-$n "$MQTT_PORT" --sessions "$n" --warmup "$WARMUP" --duration "$SWEEP_DURATION"
done
bench p2 "$MQTT_PORT" --sessions 64 --warmup "$WARMUP" --duration "$LONG"
stop_stack

# --- one session against the backend's pause -------------------------------
# P1' and P1 are the ends of a curve: how much a session pays above the
# backend's pause as the pause, the time every process sits idle, grows.
# The floor over the same pauses tells what the hops alone pay.
echo "== one session against the backend's pause, palaver and the floor"
for pause in $IDLE_PAUSES; do
  start_stack "$pause"
  bench idle-$pause "$MQTT_PORT" --sessions 1 --warmup 1 --duration "$SWEEP_DURATION"
  stop_stack
  floor floor-idle-$pause --backend-ms "$pause" --warmup 1 --duration "$SWEEP_DURATION"
done

# --- code per turn: the services under callgrind ----------------------------
# Instruction counts do not depend on the machine's noise: how much each
# service runs per turn, and how much machine code that takes (what a turn
# needs back in the caches after the backend's pause). One session, instant
# backend, history at the project's 20 messages as in P1'.
if [ "${BENCH_FOOTPRINT:-1}" = 0 ]; then
  echo "== code per turn: skipped (BENCH_FOOTPRINT=0)"
elif ! command -v valgrind >/dev/null || ! command -v callgrind_control >/dev/null; then
  echo "== code per turn: skipped, valgrind not found (apt-get install -y valgrind)"
else
  echo "== code per turn: the three services under callgrind, one session, instant backend"
  dumps=$WORK/callgrind
  mkdir -p "$dumps"
  # For this stack only, `service` starts each service under callgrind.
  FOOTPRINT_DIR=$dumps start_stack 0
  # No metrics scrapes around these runs: they would count as turn work.
  RUN_METRICS=""
  # Warm-up: the history grows to its trimmed length, every path has run.
  bench footprint-warmup "$MQTT_PORT" --sessions 1 --warmup 0 --duration 6
  for pid in $INF_PID $SES_PID $GW_PID; do callgrind_ctl -z "$pid"; done
  bench footprint-turns "$MQTT_PORT" --sessions 1 --warmup 0 --duration 8
  # A dump is written after callgrind_control returns: wait for each one
  # (NAME.PID.1, valgrind running as the service's own process).
  for pid in $INF_PID $SES_PID $GW_PID; do
    callgrind_ctl -d "$pid"
    for _ in $(seq 1 100); do
      compgen -G "$dumps/*.$pid.1" >/dev/null && continue 2
      sleep 0.1
    done
    echo "scripts/bench.sh: callgrind wrote no dump of process $pid" >&2
    exit 1
  done
  stop_stack
  turns=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["replies"])' "$OUT/footprint-turns.json")
  python3 scripts/callgrind_footprint.py "$dumps" "$turns" "$OUT/footprint.json"
fi

# --- diagnostic: the one-session points without idle halting --------------
# This VM halts an idle vCPU at once (guest_halt_poll_ns=0), and waking one
# costs far more than a hop itself (see the loopback round trips). Letting
# idle vCPUs poll checks how much of the one-session latency that is; the
# verdicts stay on the machine as it was.
if [ -n "${BENCH_GUEST_HALT_POLL_NS:-}" ]; then
  if [ -w "$HALT_POLL" ]; then
    OLD_HALT_POLL=$(cat "$HALT_POLL")
    echo "== diagnostic: guest_halt_poll_ns $OLD_HALT_POLL -> $BENCH_GUEST_HALT_POLL_NS"
    echo "$BENCH_GUEST_HALT_POLL_NS" >"$HALT_POLL"
    echo "{\"guest_halt_poll_ns\": $BENCH_GUEST_HALT_POLL_NS, \"was\": $OLD_HALT_POLL}" >"$OUT/poll.json"
    start_stack 0
    bench poll-p1i "$MQTT_PORT" --sessions 1 --warmup "$WARMUP" --duration "$DURATION"
    stop_stack
    start_stack 100
    bench poll-p1 "$MQTT_PORT" --sessions 1 --warmup "$WARMUP" --duration "$LONG"
    stop_stack
    echo "$OLD_HALT_POLL" >"$HALT_POLL"
    OLD_HALT_POLL=""
  else
    echo "== diagnostic skipped: cannot write $HALT_POLL" >&2
  fi
fi

# --- palaver up: embedded broker, everything in one process ----------------
# up_stack TTFT_MS: `palaver up` on free ports with Redis and the fake.
up_stack() {
  local ttft=$1
  start fake "$BIN/palaver" fake-vllm --listen 127.0.0.1:0 --ttft "$ttft" --tpot 0 --tokens 16
  FAKE_PID=$LAST_PID
  FAKE_URL=$(log_value "$LAST_LOG" "fake-vllm ready" url)
  start up "$BIN/palaver" up --mqtt-port 0 --session-port 0 --inference-port 0 --metrics-port 0 \
    --redis-url "$REDIS_URL" --vllm-url "$FAKE_URL" --projects "$PROJECTS"
  UP_PID=$LAST_PID
  UP_MQTT=$(log_value "$LAST_LOG" "palaver ready" mqtt)
  UP_MQTT_PORT=${UP_MQTT##*:}
  UP_METRICS=$(log_value "$LAST_LOG" "palaver ready" metrics)
  UP_METRICS_PORT=${UP_METRICS##*:}
  answer_check "$UP_MQTT_PORT"
  # One endpoint serves all three services' metrics; "session" is what
  # the report reads P4 from.
  RUN_METRICS="session:$UP_METRICS_PORT"
}

echo "== palaver up (embedded broker), instant backend"
up_stack 0
bench up-p1i "$UP_MQTT_PORT" --sessions 1 --warmup "$WARMUP" --duration "$DURATION"
bench up-p3 "$UP_MQTT_PORT" --sessions 64 --warmup "$WARMUP" --duration "$DURATION"
echo "{\"palaver-up\": {\"rss_kib\": $(rss_kib "$UP_PID"), \"hwm_kib\": $(hwm_kib "$UP_PID")}}" >"$OUT/up-p5.json"
stop "$UP_PID"
stop "$FAKE_PID"

echo "== palaver up (embedded broker), backend 100 ms"
up_stack 100
bench up-p1 "$UP_MQTT_PORT" --sessions 1 --warmup "$WARMUP" --duration "$DURATION"
bench up-p2 "$UP_MQTT_PORT" --sessions 64 --warmup "$WARMUP" --duration "$LONG"
stop "$UP_PID"
stop "$FAKE_PID"

echo "== report"
# How long the runs took (bash's SECONDS: since the script started, the
# build step included when it ran), for the report to say.
echo "{\"seconds\": $SECONDS, \"built\": $BUILT}" >"$OUT/elapsed.json"
python3 scripts/bench_report.py "$OUT" --markdown BENCHMARKS.md --svg docs/bench.svg
echo "wrote BENCHMARKS.md and docs/bench.svg (raw results in ${OUT#"$ROOT"/})"
