#!/usr/bin/env bash
# Diagnostics of the machine palaver's benchmarks run on, not of palaver:
# what a loopback hop and a cache line cost after idleness, the floor a
# turn's fourteen process hops set with no work at them (`palaver-lab
# floor`, over the same backend pauses as scripts/bench.sh's idle curve),
# and P1 rerun with every vCPU kept busy. They explain the one-session
# points on a virtual machine; they are not verdicts. Opt-in and apart from
# scripts/bench.sh: it pins spinners to CPUs, and with
# BENCH_GUEST_HALT_POLL_NS it writes a root-only sysfs setting.
#
# Writes its raw results into target/bench/ beside scripts/bench.sh's, then
# rewrites BENCHMARKS.md and docs/bench.svg with both when the standard
# points are there. So, for the full report:
#
#   scripts/bench.sh && lab/bench-vm.sh
#   BENCH_QUICK=1, BENCH_NO_BUILD=1     # as for scripts/bench.sh
#   BENCH_GUEST_HALT_POLL_NS=200000 lab/bench-vm.sh   # also rerun P1 and P1'
#       with the guest's idle vCPUs polling this long before they halt
#       (needs root; the old value is put back)
#
# scripts/bench.sh starts target/bench/ afresh: run it first.
set -euo pipefail
ME=lab/bench-vm.sh
# shellcheck source=scripts/bench-lib.sh
source "$(dirname "$0")/../scripts/bench-lib.sh"
COMMANDS=$OUT/commands-vm.txt

HALT_POLL=/sys/module/haltpoll/parameters/guest_halt_poll_ns
OLD_HALT_POLL=""
on_exit() {
  [ -z "$OLD_HALT_POLL" ] || echo "$OLD_HALT_POLL" >"$HALT_POLL" || true
}

build_release palaver palaver-lab session-svc inference-svc gateway
mkdir -p "$OUT"
# This script's results of an earlier run, which this one may not write again.
rm -f "$OUT"/{loopback,idle-memory,idle-memory-busy,poll}.json "$OUT"/floor-*.json \
  "$OUT"/poll-p1* "$OUT"/busy-p1*
: >"$COMMANDS"

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
  echo "taskset -c CPU chrt --idle 0 bash -c 'while :; do :; done'   # one per CPU" >>"$COMMANDS"
  "$@"
  for pid in "${spinners[@]}"; do stop "$pid"; done
}

start_redis

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
  echo "$BIN/palaver-lab idle-memory --json" >>"$COMMANDS"
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
# `palaver-lab floor` sends a frame through six relay processes (tokio, like
# the services) and back, the backend's relay pausing as the fake does. What
# one session could cost here at best, to hold P1', P1 and the idle curve
# against.
echo "== floor: a turn's hops with no work"
floor() {
  local label=$1
  shift
  local cmd=("$BIN/palaver-lab" floor --label "$label" --json "$@")
  echo "${cmd[*]}" >>"$COMMANDS"
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
for pause in $IDLE_PAUSES; do
  floor "floor-idle-$pause" --backend-ms "$pause" --warmup 1 --duration "$SWEEP_DURATION"
done

start_mosquitto

# P1 with the vCPUs kept busy: how much of P1's price above P1' is this
# VM's halting.
echo "== P1 with every vCPU kept busy"
start_stack 100
with_busy_vcpus bench busy-p1 "$MQTT_PORT" --sessions 1 --warmup "$WARMUP" --duration "$LONG"
stop_stack

# --- the one-session points without idle halting ----------------------------
# This VM halts an idle vCPU at once (guest_halt_poll_ns=0), and waking one
# costs far more than a hop itself (see the loopback round trips). Letting
# idle vCPUs poll checks how much of the one-session latency that is; the
# verdicts stay on the machine as it was.
if [ -n "${BENCH_GUEST_HALT_POLL_NS:-}" ]; then
  if [ -w "$HALT_POLL" ]; then
    OLD_HALT_POLL=$(cat "$HALT_POLL")
    echo "== guest_halt_poll_ns $OLD_HALT_POLL -> $BENCH_GUEST_HALT_POLL_NS"
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
    echo "== guest_halt_poll_ns skipped: cannot write $HALT_POLL" >&2
  fi
fi

if [ -e "$OUT/p1.json" ]; then
  echo "== report"
  python3 scripts/bench_report.py "$OUT" --markdown BENCHMARKS.md --svg docs/bench.svg
  echo "wrote BENCHMARKS.md and docs/bench.svg (raw results in ${OUT#"$ROOT"/})"
else
  echo "raw results in ${OUT#"$ROOT"/}; no standard points there, so no report: run scripts/bench.sh first"
fi
