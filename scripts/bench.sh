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
#
# The diagnostics of the machine itself (the floor of a turn's hops, memory
# and loopback after idleness, vCPUs kept busy or polling) are opt-in:
# lab/bench-vm.sh, run after this script, adds them to the same results and
# rewrites the report. This script starts target/bench/ afresh.
#
# Takes a few minutes on a 2-core machine (plus the build), as busy as
# the host is; the report says how long its own runs took.
set -euo pipefail
ME=scripts/bench.sh
# shellcheck source=scripts/bench-lib.sh
source "$(dirname "$0")/bench-lib.sh"
COMMANDS=$OUT/commands.txt

build_release palaver session-svc inference-svc gateway
rm -rf "$OUT"
mkdir -p "$OUT"
: >"$COMMANDS"

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

# What the figures were measured on and with, and at which commit: the
# report's header and its "Machine" section read them.
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

start_redis
start_mosquitto

# callgrind_ctl ARGS...: callgrind_control, failing the run when it could not
# reach the process. It exits 0 even then; a zeroing that silently did not
# happen would count the warm-up as turns.
callgrind_ctl() {
  local said
  said=$(callgrind_control "$@" 2>&1)
  if grep -q '^Error' <<<"$said"; then
    echo "$ME: callgrind_control $*: $said" >&2
    exit 1
  fi
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
for n in 8 16 32; do
  bench sweep-100ms-$n "$MQTT_PORT" --sessions "$n" --warmup "$WARMUP" --duration "$SWEEP_DURATION"
done
bench p2 "$MQTT_PORT" --sessions 64 --warmup "$WARMUP" --duration "$LONG"
stop_stack

# --- one session against the backend's pause -------------------------------
# P1' and P1 are the ends of a curve: how much a session pays above the
# backend's pause as the pause, the time every process sits idle, grows (a
# real model's pauses lie along it).
echo "== one session against the backend's pause"
for pause in $IDLE_PAUSES; do
  start_stack "$pause"
  bench "idle-$pause" "$MQTT_PORT" --sessions 1 --warmup 1 --duration "$SWEEP_DURATION"
  stop_stack
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
    echo "$ME: callgrind wrote no dump of process $pid" >&2
    exit 1
  done
  stop_stack
  turns=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["replies"])' "$OUT/footprint-turns.json")
  python3 scripts/callgrind_footprint.py "$dumps" "$turns" "$OUT/footprint.json"
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
