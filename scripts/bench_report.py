#!/usr/bin/env python3
"""Turns the raw results of scripts/bench.sh into BENCHMARKS.md and an SVG chart.

Standard library only. Every number written comes from the files in the
results directory; the only constants are the targets and the old server's
figures, both quoted from the issue that set them. The machine's
diagnostics (lab/bench-vm.sh) are optional: without their files, what
needs them is left out and the report says how to add them.

    python3 scripts/bench_report.py target/bench --markdown BENCHMARKS.md --svg docs/bench.svg
"""

import argparse
import functools
import json
import math
import os
import re
import sys

# Targets and the old Python server's figures (same machine, same fake), as
# the issue states them; not measured here.
OLD = {
    "P1": "p50 5.0 ms, p99 7.7 ms",
    "P1'": "p50 47.9 ms",
    "P2": "74.5/s (93 %), p99 1.28 s",
    "P3": "267 replies/s",
    "P4": "(claimed ~12 ms)",
    "P5": "—",
}
# The targets, from the same issue. Each row of the table writes its target
# from these and checks against the same numbers.
P1_P50_MS, P1_P99_MS, P1I_P50_MS = 1.0, 3.0, 1.0
SLOTS, BACKEND_S = 8, 0.100
P2_CEILING = SLOTS / BACKEND_S  # 80 replies/s
P2_SHARE = 0.99  # of P2_CEILING
P3_RPS = 3000
P4_HOLD_P99_MS = 1.0  # a bucket bound of the lock histogram, so its share is exact
P5_RSS_MIB = 64
SWEEP = [1, 8, 16, 32, 64]
MIB = 1024


def load(out, name):
    path = os.path.join(out, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def took(elapsed):
    """How long the script ran, as the end of a sentence ('' when unknown)."""
    if not elapsed:
        return ""
    minutes, seconds = divmod(int(elapsed["seconds"]), 60)
    build = ", the release build step included" if elapsed.get("built") else ""
    return f"; these runs took {minutes} min {seconds} s{build}"


@functools.lru_cache(maxsize=None)
def scrape(path):
    """Every sample of one Prometheus text scrape, by series (`name` or
    `name{labels}`); None when the file is missing. Read once, however many
    series the report takes from it."""
    if not os.path.exists(path):
        return None
    samples = {}
    with open(path) as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            series, _, value = line.rstrip("\n").rpartition(" ")
            samples[series] = float(value)
    return samples


def histogram(path, name):
    """Cumulative buckets [(le, count)] of a Prometheus histogram in a scrape."""
    samples = scrape(path)
    if samples is None:
        return None
    prefix = f'{name}_bucket{{le="'
    buckets = [(float(series[len(prefix):-2]), v) for series, v in samples.items()
               if series.startswith(prefix) and series.endswith('"}')
               and '"' not in series[len(prefix):-2]]
    return buckets or None


def diff(after, before):
    if before is None:
        return after
    return [(le, a - b) for (le, a), (_, b) in zip(after, before)]


def quantile(buckets, q):
    """(upper bound of the bucket holding quantile q, linear estimate inside it)."""
    total = buckets[-1][1]
    if total <= 0:
        return None, None
    target = q * total
    prev_le, prev_c = 0.0, 0.0
    for le, c in buckets:
        if c >= target:
            if math.isinf(le):
                return le, prev_le
            share = (target - prev_c) / (c - prev_c) if c > prev_c else 1.0
            return le, prev_le + (le - prev_le) * share
        prev_le, prev_c = le, c
    return buckets[-1][0], buckets[-1][0]


def share_at_most(buckets, bound):
    total = buckets[-1][1]
    for le, c in buckets:
        if abs(le - bound) < 1e-12:
            return c / total if total else None
    return None


def ms(v, digits=2):
    return "—" if v is None else f"{v:.{digits}f} ms"


def lat(run, key):
    return None if run is None else run["latency_ms"].get(key)


def idle_pauses(runs):
    """The backend pauses (ms) scripts/bench.sh ran one session at, from the runs' names."""
    return sorted(int(n[len("idle-"):]) for n in runs if n.startswith("idle-"))


def idle_curve(runs, floors):
    """One session's cost above the backend's pause as the pause grows; beside it the floor's,
    when lab/bench-vm.sh measured it at every pause."""
    points = [(0, runs.get("p1i"), floors.get("instant"))]
    points += [(p, runs.get(f"idle-{p}"), floors.get(f"idle-{p}")) for p in idle_pauses(runs)]
    points.append((int(BACKEND_S * 1000), runs.get("p1"), floors.get("100ms")))
    points = [(p, r, f) for p, r, f in points if r]
    if len(points) < 3:
        return []
    with_floor = all(f for _, _, f in points)
    out = ["The pause at the backend is the time every process on the reply path sits idle. Over a "
           "range of pauses, what one session pays above the pause (median; the end points are P1' and "
           "P1, the middle ones shorter runs):", ""]
    if with_floor:
        out += ["| backend pause | palaver: e2e − pause | floor: e2e − pause | palaver above the floor |",
                "|---:|---:|---:|---:|"]
    else:
        out += ["| backend pause | palaver: e2e − pause |", "|---:|---:|"]
    for p, r, f in points:
        a = lat(r, "p50") - p
        if with_floor:
            b = f["latency_ms"]["p50"] - p
            out.append(f"| {p} ms | {ms(a)} | {ms(b)} | {ms(a - b)} |")
        else:
            out.append(f"| {p} ms | {ms(a)} |")
    return out


def mean_s(out, label, service, series):
    """Mean of a Prometheus histogram series (`name` or `name{labels}`) over one run, in seconds.

    From the `_sum` and `_count` scraped right before and after the run (its
    warm-up included), so one run's turns alone."""
    name, _, labels = series.partition("{")
    labels = "{" + labels if labels else ""
    vals = {}
    for when in ("before", "after"):
        samples = scrape(os.path.join(out, f"{label}-{service}-{when}.metrics"))
        for kind in ("sum", "count"):
            v = None if samples is None else samples.get(f"{name}_{kind}{labels}")
            if v is None:
                return None
            vals[(when, kind)] = v
    n = vals[("after", "count")] - vals[("before", "count")]
    return None if n <= 0 else (vals[("after", "sum")] - vals[("before", "sum")]) / n


# One turn cut into stretches by the services' own clocks. Each entry: what
# the stretch is, and how to get its mean (ms) from the means `m` of the
# bench's end-to-end latency (e2e) and of the services' histograms; the
# stretches add up to e2e.
STRETCHES = [
    ("MQTT: client → mosquitto → gateway and back, the gateway's MQTT work",
     lambda m: m["e2e"] - m["turn"]),
    ("gRPC gateway ⇄ session-svc, session-svc's work outside its phases",
     lambda m: m["turn"] - m["prepare"] - m["generate"] - m["store"]),
    ("phase 1 in session-svc (its Redis round trip included)", lambda m: m["prepare"]),
    ("gRPC session-svc ⇄ inference-svc, inference-svc's work outside the backend call",
     lambda m: m["generate"] - m["generation"]),
    ("HTTP inference-svc ⇄ backend, beyond the backend's nominal pause", lambda m: m["generation"]),
    ("phase 3 in session-svc (its Redis round trip included)", lambda m: m["store"]),
]
TURN_SERIES = {
    "turn": ("gateway", "palaver_gateway_turn_seconds"),
    "prepare": ("session", 'palaver_session_turn_phase_seconds{phase="prepare"}'),
    "generate": ("session", 'palaver_session_turn_phase_seconds{phase="generate"}'),
    "store": ("session", 'palaver_session_turn_phase_seconds{phase="store"}'),
    "generation": ("inference", "palaver_inference_generation_seconds"),
}
# The series that include the backend's pause.
PAUSED = ("e2e", "turn", "generate", "generation")


def turn_means(out, runs, label, pause_ms):
    """Means (ms) of e2e and of every TURN_SERIES over run `label`, the pause taken off."""
    run = runs.get(label)
    if run is None or run["latency_ms"].get("mean") is None:
        return None
    m = {"e2e": run["latency_ms"]["mean"]}
    for key, (service, series) in TURN_SERIES.items():
        v = mean_s(out, label, service, series)
        if v is None:
            return None
        m[key] = v * 1000
    for key in PAUSED:
        m[key] -= pause_ms
    return m


def stretches(out, runs):
    """Where P1's extra time goes, stretch by stretch, by the services' own clocks."""
    warm = turn_means(out, runs, "p1i", 0)
    cold = turn_means(out, runs, "p1", BACKEND_S * 1000)
    if not (warm and cold):
        return []
    out_ = ["The services time their own part of every turn (`palaver_gateway_turn_seconds`, "
            "`palaver_session_turn_phase_seconds`, `palaver_inference_generation_seconds`), which "
            "cuts a turn into stretches that add up to its end-to-end time. Means over the P1' and P1 "
            "runs, the backend's nominal pause taken off. The services' means cover the whole run, "
            "warm-up included (their histograms are scraped before and after it); the end-to-end mean, "
            "the load generator's, covers the measured window only, so the MQTT stretch (end to end "
            "minus the gateway's turn) also carries the difference between the two windows. A "
            "stretch's difference is what 100 ms of idleness costs it:", "",
            "| stretch | P1' mean | P1 mean − 100 ms | idle costs it |",
            "|---|---:|---:|---:|"]
    for what, f in STRETCHES:
        a, b = f(warm), f(cold)
        out_.append(f"| {what} | {ms(a)} | {ms(b)} | {ms(b - a)} |")
    out_.append(f"| end to end | {ms(warm['e2e'])} | {ms(cold['e2e'])} | "
                f"{ms(cold['e2e'] - warm['e2e'])} |")
    return out_


SERVICE_NAMES = {"gateway": "gateway", "session": "session-svc", "inference": "inference-svc"}


def cold_budget(out_dir, runs, floors):
    """What idleness does to memory here, how much code a turn runs, and what the P1 target leaves."""
    mem, fp = load(out_dir, "idle-memory.json"), load(out_dir, "footprint.json")
    if not (mem or fp):
        return []
    out = ["#### What a turn runs, and what idleness does to it", ""]
    per = {f"{w['idle_ms']:g}": w["ns_per_line"] for w in mem["median_by_idle"]} if mem else {}
    busy_mem = load(out_dir, "idle-memory-busy.json")
    busy = {f"{w['idle_ms']:g}": w["ns_per_line"] for w in busy_mem["median_by_idle"]} if busy_mem else {}
    if mem:
        out.append(f"`palaver-lab idle-memory` walks {mem['lines']} cache lines ({mem['bytes'] // 1024} KiB, within "
                   "one core's L2 cache) in a random chain, each load waiting for the one before, back to back "
                   "and after sleeping: the price of one cache miss wherever the line is found after that much "
                   f"idleness (median of {mem['rounds']} walks)."
                   + (" The last column is the same walk with every vCPU kept busy: a spinner on each CPU at "
                      "`SCHED_IDLE`, which any task that wakes preempts at once, so that this VM's vCPUs never "
                      "halt while the walker sleeps." if busy else ""))
        out.append("")
        head = ["idle before the walk", "ns per cache line", "µs for all of them"]
        head += ["ns per line, vCPUs kept busy"] if busy else []
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---:|" * len(head))
        for k, v in per.items():
            cells = [f"{k} ms", f"{v:.1f}", f"{v * mem['lines'] / 1000:.0f}"]
            cells += [f"{busy[k]:.1f}" if k in busy else "—"] if busy else []
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
        r1, rb = runs.get("p1"), runs.get("busy-p1")
        if busy and "100" in per and "100" in busy:
            text = (f"After 100 ms idle a line costs {busy['100']:.0f} ns with the vCPUs kept busy, against "
                    f"{per['100']:.0f} ns when they halt: ")
            if busy["100"] < 0.5 * per["100"]:
                text += "keeping them busy keeps the caches, so here they are lost to this VM's own halting."
            else:
                text += ("the caches are lost either way, to the host and whatever else it runs, not to this "
                         "VM's halting.")
            if r1 and rb:
                halted, kept = lat(r1, "p50") - BACKEND_S * 1000, lat(rb, "p50") - BACKEND_S * 1000
                text += (f" P1 rerun with the spinners (a diagnostic, not a verdict): p50 {kept:.2f} ms, "
                         f"p99 {lat(rb, 'p99') - BACKEND_S * 1000:.2f} ms, against p50 {halted:.2f} ms as "
                         "measured above: "
                         + (f"keeping the vCPUs from halting takes {halted - kept:.2f} ms off it."
                            if kept < halted else "keeping the vCPUs from halting does not lower it."))
            out.append(text)
            out.append("")
    if fp:
        out.append(f"Instruction counts over {fp['turns']} turns of one session against the instant backend, "
                   "history at its 20 messages as in P1', each service run under `valgrind --tool=callgrind` "
                   "(counts, not times: repeatable to a fraction of a percent whatever else the machine is "
                   "doing). \"Code run a turn\" counts "
                   "the 64-byte lines of machine code holding an instruction that ran at least once per turn "
                   "on average: what a turn needs back in the caches.")
        out.append("")
        out.append("| service | instructions a turn | code run a turn | where the instructions go (source crate) |")
        out.append("|---|---:|---:|---|")
        for key, r in fp["services"].items():
            where = ", ".join(f"{c['crate']} {c['share'] * 100:.0f} %" for c in r["crates"][:5])
            out.append(f"| {SERVICE_NAMES.get(key, key)} | {r['instructions_per_turn']:,} | "
                       f"{r['code_kib_per_turn']} KiB ({r['code_lines_per_turn']:,} lines) | {where} |")
        out.append("")
    fi, f1, r1, ri = floors.get("instant"), floors.get("100ms"), runs.get("p1"), runs.get("p1i")
    if mem and fp and fi and f1 and r1 and ri and "100" in per:
        floor1 = f1["latency_ms"]["p50"] - BACKEND_S * 1000
        left = P1_P50_MS - floor1
        cold = per["100"]
        code = sum(r["code_lines_per_turn"] for r in fp["services"].values())
        kib = sum(r["code_kib_per_turn"] for r in fp["services"].values())
        warm_above = lat(ri, "p50") - fi["latency_ms"]["p50"]
        gap = lat(r1, "p50") - BACKEND_S * 1000 - lat(ri, "p50")
        if left <= 0:
            out.append(f"The floor's own P1 median, {floor1:.2f} ms, is above the {P1_P50_MS:g} ms target: no stack of "
                       "this shape meets it on this machine.")
        else:
            out.append(f"The P1 target leaves {left:.2f} ms above the floor's P1 median ({floor1:.2f} ms) for "
                       f"all the work of the services. After 100 ms idle a cache line costs {cold:.0f} ns here, "
                       f"so that is the price of {left * 1e6 / cold:,.0f} lines brought back, code and data "
                       f"together; the three services run {code:,} lines ({kib:,} KiB) of code a turn. Warm, "
                       f"with every line a hit, their work above the floor already costs {warm_above:.2f} ms "
                       f"(P1' against the floor's P1'). P1 minus P1', {gap:.2f} ms, is the price of about "
                       f"{gap * 1e6 / cold:,.0f} lines at that rate"
                       + (": fewer than the code a turn runs, as the CPU overlaps misses and fetches "
                          "straight-line code ahead." if gap * 1e6 / cold < code else
                          ": more than the code a turn runs; data, the kernel's own lines and the other "
                          "processes' come back too."))
            if warm_above > left:
                out[-1] += (f" So P1 at {P1_P50_MS:g} ms here would need the services' warm work "
                            f"{warm_above / left:.1f} times smaller, before idleness cost anything at all.")
    while out and out[-1] == "":
        out.pop()
    return out


def misses_notes(out_dir, runs, loop, floors):
    """Why the one-session points cost what they cost on this machine, from the data."""
    r1, ri = runs.get("p1"), runs.get("p1i")
    if not (r1 and ri):
        return []
    gap = lat(r1, "p50") - BACKEND_S * 1000 - lat(ri, "p50")
    out = ["### Where one session's time goes", ""]
    hop = ""
    if loop:
        rt = loop["redis_ping_median_us_after_idle_ms"]
        hop = (f" On this machine one hop between processes (a Redis PING, median) costs {rt['0']:.0f} µs "
               f"back to back and {rt['100']:.0f} µs after 100 ms idle.")
    out.append(f"A turn crosses fourteen process hops (the broker twice each way, gateway, session-svc, "
               f"Redis once per held phase, inference-svc, the backend).{hop} P1' pays the warm price on "
               f"every hop; P1's reply path starts after 100 ms of idleness, so every process on it wakes "
               f"cold: P1 minus P1' is {gap:.2f} ms at the median.")
    fi, f1 = floors.get("instant"), floors.get("100ms")
    if fi and f1:
        out.append("")
        out.append("`palaver-lab floor` sends a 128-byte frame along the same fourteen hops through six relay "
                   "processes (tokio programs on the services' runtime) that forward it the moment it "
                   "arrives, the backend's relay pausing with the fake's own pause code: what one session "
                   "costs here when no hop does any work, the floor for any stack of this shape on this "
                   "machine. It is a lower bound: palaver also sends acknowledgements off the critical "
                   "path (MQTT PUBACKs, HTTP/2 window updates).")
        out.append("")
        out.append("| point | palaver: services + mosquitto | floor: the same hops, no work "
                   "| palaver above the floor, at the median |")
        out.append("|---|---|---|---|")
        for name, run, floor, sub in (("P1' e2e", ri, fi, 0.0), ("P1 e2e − 100 ms", r1, f1, BACKEND_S * 1000)):
            cells = []
            for q in ("p50", "p99"):
                a, b = lat(run, q) - sub, floor["latency_ms"][q] - sub
                cells.append((q, a, b))
            out.append(f"| {name} | " + ", ".join(f"{q} {ms(a)}" for q, a, _ in cells)
                       + " | " + ", ".join(f"{q} {ms(b)}" for q, _, b in cells)
                       + f" | {ms(cells[0][1] - cells[0][2])} |")
        out.append("")
        cold_floor = (f1["latency_ms"]["p50"] - BACKEND_S * 1000) - fi["latency_ms"]["p50"]
        line = (f"100 ms of idleness costs the bare hops {cold_floor:.2f} ms at the median and palaver "
                f"{gap:.2f} ms")
        if gap > 2 * cold_floor:
            line += (": waking up is not what makes P1 dear here, the work each process does once awake, "
                     "on cold caches, is")
        out.append(line + ".")
    parts = stretches(out_dir, runs)
    if parts:
        out.append("")
        out.extend(parts)
    curve = idle_curve(runs, floors)
    if curve:
        out.append("")
        out.extend(curve)
    budget = cold_budget(out_dir, runs, floors)
    if budget:
        out.append("")
        out.extend(budget)
    missing = [what for what, there in (
        ("the floor of a turn's hops with no work at them (`palaver-lab floor`)", fi and f1),
        ("a loopback hop after idleness", loop),
        ("a cache line after idleness (`palaver-lab idle-memory`)", load(out_dir, "idle-memory.json")),
    ) if not there]
    if missing:
        out.append("")
        out.append("Not measured in these runs, the machine's side of it: " + "; ".join(missing)
                   + ". Run `lab/bench-vm.sh` after `scripts/bench.sh` to add it.")
    out.append("")
    return out


def verdict(ok):
    if ok is None:
        return "not measured"
    return "**met**" if ok else "**not met**"


def cpu_during(out):
    before, after = (os.path.join(out, f"p3-cpu-{w}.txt") for w in ("before", "after"))
    if not (os.path.exists(before) and os.path.exists(after)):
        return None

    def read(path):
        with open(path) as f:
            return dict(line.split() for line in f if line.strip())

    b, a = read(before), read(after)
    tck = float(a["clk_tck"])
    seconds = float(a["uptime"]) - float(b["uptime"])
    return {
        k: (float(a[k]) - float(b[k])) / tck / seconds * 1000
        for k in a
        if k not in ("clk_tck", "uptime")
    }, seconds


def p4(out, before_name, after_name):
    after = histogram(os.path.join(out, after_name), "palaver_session_hold_seconds")
    if after is None:
        return None
    before = histogram(os.path.join(out, before_name), "palaver_session_hold_seconds")
    b = diff(after, before)
    p50 = quantile(b, 0.50)
    p99 = quantile(b, 0.99)
    return {
        "count": int(b[-1][1]),
        "share_within": share_at_most(b, P4_HOLD_P99_MS / 1000),
        "p50": p50,
        "p99": p99,
    }


def p4_text(r):
    if r is None or not r["count"]:
        return "—"
    le99, est99 = r["p99"]
    share = r["share_within"]
    return (
        f"p99 ≤ {le99 * 1000:.3g} ms (bucket bound; ≈ {est99 * 1000:.2f} ms interpolated); "
        f"{share * 100:.2f} % of {r['count']} holds ≤ {P4_HOLD_P99_MS:g} ms"
    )


def rss_text(p5):
    if not p5:
        return "—", None
    parts, worst = [], 0
    for name, v in p5.items():
        if name == "fake-vllm":
            continue
        parts.append(f"{name} {v['rss_kib'] / MIB:.1f} MiB")
        worst = max(worst, v["rss_kib"])
    return ", ".join(parts), worst / MIB


def svg_chart(runs, path):
    """Two panels: throughput and latency against sessions, per backend."""
    series = {
        "instant backend": ["p1i"] + [f"sweep-instant-{n}" for n in SWEEP[1:-1]] + ["p3"],
        "backend 100 ms": ["p1"] + [f"sweep-100ms-{n}" for n in SWEEP[1:-1]] + ["p2"],
    }
    colors = {"instant backend": "#1f77b4", "backend 100 ms": "#d62728"}
    W, H = 960, 420
    pw, ph = 380, 280
    panels = [(70, 60), (560, 60)]
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
        'font-family="sans-serif" font-size="12">',
        f'<rect width="{W}" height="{H}" fill="white"/>',
        f'<text x="{W / 2}" y="24" text-anchor="middle" font-size="15">'
        "palaver, closed loop over MQTT (mosquitto), by number of sessions</text>",
    ]

    def xpos(x0, n):
        return x0 + math.log2(n) / math.log2(64) * pw

    def points(name, key):
        pts = []
        for n, label in zip(SWEEP, series[name]):
            r = runs.get(label)
            if r is None:
                continue
            v = r["replies_per_sec"] if key == "rps" else r["latency_ms"].get(key)
            if v is not None and v > 0:
                pts.append((n, v))
        return pts

    # Left: throughput, log axis (the 100 ms backend tops out at 80/s, the
    # instant one in the thousands).
    x0, y0 = panels[0]
    all_rps = [v for s in series for _, v in points(s, "rps")] or [1]
    rlo = 10 ** math.floor(math.log10(min(all_rps)))
    rdec = max(1, math.ceil(math.log10(max(all_rps) / rlo)))

    def yrps(v):
        return y0 + ph - ph * (math.log10(v / rlo) / rdec)

    out.append(f'<text x="{x0 + pw / 2}" y="{y0 - 12}" text-anchor="middle" font-size="13">'
               "throughput (replies/s, log scale)</text>")
    for d in range(rdec + 1):
        v = rlo * 10 ** d
        y = yrps(v)
        out.append(f'<line x1="{x0}" y1="{y}" x2="{x0 + pw}" y2="{y}" stroke="#ddd"/>')
        out.append(f'<text x="{x0 - 6}" y="{y + 4}" text-anchor="end">{v:g}</text>')
    for s in series:
        pts = points(s, "rps")
        coords = [(xpos(x0, n), yrps(v)) for n, v in pts]
        if coords:
            out.append('<polyline fill="none" stroke-width="2" stroke="%s" points="%s"/>' % (
                colors[s], " ".join(f"{x:.1f},{y:.1f}" for x, y in coords)))
            for (x, y), (_, v) in zip(coords, pts):
                out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{colors[s]}"/>')
                out.append(f'<text x="{x:.1f}" y="{y - 7:.1f}" text-anchor="middle" font-size="10">{v:.0f}</text>')

    # Right: latency p50 (solid) and p99 (dashed), log axis.
    x1, y1 = panels[1]
    lats = [v for s in series for k in ("p50", "p99") for _, v in points(s, k)] or [1]
    lo = 10 ** math.floor(math.log10(min(lats)))
    hi = 10 ** math.ceil(math.log10(max(lats)))
    decades = max(1, round(math.log10(hi / lo)))

    def ylog(v):
        return y1 + ph - ph * (math.log10(v / lo) / decades)

    out.append(f'<text x="{x1 + pw / 2}" y="{y1 - 12}" text-anchor="middle" font-size="13">'
               "end-to-end latency (ms, log scale): p50 solid, p99 dashed</text>")
    for d in range(decades + 1):
        v = lo * 10 ** d
        y = ylog(v)
        out.append(f'<line x1="{x1}" y1="{y}" x2="{x1 + pw}" y2="{y}" stroke="#ddd"/>')
        out.append(f'<text x="{x1 - 6}" y="{y + 4}" text-anchor="end">{v:g}</text>')
    for s in series:
        for key, dash in (("p50", ""), ("p99", ' stroke-dasharray="5,4"')):
            pts = points(s, key)
            coords = [(xpos(x1, n), ylog(v)) for n, v in pts]
            if coords:
                out.append('<polyline fill="none" stroke-width="2" stroke="%s"%s points="%s"/>' % (
                    colors[s], dash, " ".join(f"{x:.1f},{y:.1f}" for x, y in coords)))
                for x, y in coords:
                    out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{colors[s]}"/>')

    # Axes and legend.
    for x0_, y0_ in panels:
        out.append(f'<rect x="{x0_}" y="{y0_}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>')
        for n in SWEEP:
            x = xpos(x0_, n)
            out.append(f'<line x1="{x}" y1="{y0_ + ph}" x2="{x}" y2="{y0_ + ph + 5}" stroke="#444"/>')
            out.append(f'<text x="{x}" y="{y0_ + ph + 18}" text-anchor="middle">{n}</text>')
        out.append(f'<text x="{x0_ + pw / 2}" y="{y0_ + ph + 36}" text-anchor="middle">'
                   "sessions (log scale)</text>")
    lx = 70
    for s in series:
        out.append(f'<line x1="{lx}" y1="{H - 22}" x2="{lx + 24}" y2="{H - 22}" stroke="{colors[s]}" stroke-width="3"/>')
        out.append(f'<text x="{lx + 30}" y="{H - 18}">{s}</text>')
        lx += 200
    out.append(f'<text x="{lx}" y="{H - 18}" fill="#555">backend 100 ms: at most {SLOTS} generations at once, '
               f"so at most {P2_CEILING:.0f} replies/s</text>")
    out.append("</svg>")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", help="directory written by scripts/bench.sh")
    ap.add_argument("--markdown", default="BENCHMARKS.md")
    ap.add_argument("--svg", default="docs/bench.svg")
    args = ap.parse_args()
    out = args.results

    names = ["p1i", "p1", "p2", "p3", "up-p1i", "up-p1", "up-p2", "up-p3", "poll-p1i", "poll-p1", "busy-p1"]
    names += [f"sweep-instant-{n}" for n in SWEEP[1:-1]] + [f"sweep-100ms-{n}" for n in SWEEP[1:-1]]
    names += [n[:-len(".json")] for n in os.listdir(out) if re.fullmatch(r"idle-\d+\.json", n)]
    runs = {n: load(out, n + ".json") for n in names}
    runs = {k: v for k, v in runs.items() if v is not None}
    if not runs:
        sys.exit(f"no results in {out}")
    machine = load(out, "machine.json") or {}
    fake = {k: load(out, f"fake-{k}.json") for k in ("instant", "100ms")}

    def p1(run):
        if run is None:
            return None, None
        return lat(run, "p50") - BACKEND_S * 1000, lat(run, "p99") - BACKEND_S * 1000

    rows = []
    # P1
    a50, a99 = p1(runs.get("p1"))
    b50, b99 = p1(runs.get("up-p1"))
    ok = None if a50 is None else (a50 <= P1_P50_MS and a99 <= P1_P99_MS)
    rows.append(("P1", f"1 session, backend {BACKEND_S * 1000:g} ms: e2e minus {BACKEND_S * 1000:g} ms",
                 f"p50 ≤ {P1_P50_MS:g} ms, p99 ≤ {P1_P99_MS:g} ms",
                 f"p50 {ms(a50)}, p99 {ms(a99)}", f"p50 {ms(b50)}, p99 {ms(b99)}", OLD["P1"], verdict(ok)))
    # P1'
    r, u = runs.get("p1i"), runs.get("up-p1i")
    ok = None if r is None else lat(r, "p50") <= P1I_P50_MS
    rows.append(("P1'", "1 session, instant backend: e2e", f"p50 ≤ {P1I_P50_MS:g} ms",
                 f"p50 {ms(lat(r, 'p50'))}, p99 {ms(lat(r, 'p99'))}",
                 f"p50 {ms(lat(u, 'p50'))}, p99 {ms(lat(u, 'p99'))}", OLD["P1'"], verdict(ok)))

    # P2
    def p2(run):
        if run is None:
            return "—", None
        rps = run["replies_per_sec"]
        return (f"{rps:.1f}/s ({rps / P2_CEILING * 100:.1f} %), p99 {lat(run, 'p99') / 1000:.3f} s",
                rps / P2_CEILING)

    t2, s2 = p2(runs.get("p2"))
    tu2, _ = p2(runs.get("up-p2"))
    rows.append(("P2", f"64 sessions, backend {BACKEND_S * 1000:g} ms, limit {SLOTS}",
                 f"≥ {P2_SHARE * 100:g} % of {P2_CEILING:g} replies/s", t2, tu2,
                 OLD["P2"], verdict(None if s2 is None else s2 >= P2_SHARE)))
    # P3
    r, u = runs.get("p3"), runs.get("up-p3")
    rows.append(("P3", "64 sessions, instant backend", f"≥ {P3_RPS:,} replies/s",
                 "—" if r is None else f"{r['replies_per_sec']:.0f} replies/s, p99 {ms(lat(r, 'p99'), 1)}",
                 "—" if u is None else f"{u['replies_per_sec']:.0f} replies/s, p99 {ms(lat(u, 'p99'), 1)}",
                 OLD["P3"], verdict(None if r is None else r["replies_per_sec"] >= P3_RPS)))
    # P4
    h = p4(out, "p3-session-before.metrics", "p3-session-after.metrics")
    hu = p4(out, "up-p3-session-before.metrics", "up-p3-session-after.metrics")
    # p99 ≤ the bound exactly when at least 99 % of the holds are within it.
    ok = None if not h or not h["count"] else h["share_within"] >= 0.99
    rows.append(("P4", "swap hold time under P3", f"p99 ≤ {P4_HOLD_P99_MS:g} ms", p4_text(h), p4_text(hu),
                 OLD["P4"], verdict(ok)))
    # P5
    rt, worst = rss_text(load(out, "p5.json"))
    rtu, _ = rss_text(load(out, "up-p5.json"))
    rows.append(("P5", "RSS of each service after P3", f"≤ {P5_RSS_MIB} MiB", rt,
                 rtu + " (one process)" if rtu != "—" else rtu,
                 OLD["P5"], verdict(None if worst is None else worst <= P5_RSS_MIB)))

    svg_chart(runs, args.svg)
    svg_rel = os.path.relpath(args.svg, os.path.dirname(os.path.abspath(args.markdown)) or ".")

    L = []
    L.append("# palaver benchmarks")
    L.append("")
    vm = os.path.exists(os.path.join(out, "commands-vm.txt"))
    L.append("Written by `scripts/bench.sh`" + (" and `lab/bench-vm.sh` (the machine's diagnostics)" if vm else "")
             + " (through `scripts/bench_report.py`) from the runs of "
             f"{machine.get('date', '?')} on commit `{machine.get('commit', '?')}`"
             + (" with uncommitted changes" if machine.get("dirty") else "")
             + ". Run " + ("them" if vm else "the script") + " again to reproduce every number here"
             + took(load(out, "elapsed.json")) + ".")
    L.append("")
    L.append("## Standard points")
    L.append("")
    L.append("| point | what | target | palaver: services + mosquitto | `palaver up` (embedded broker) "
             "| old Python server, same machine, same fake | verdict |")
    L.append("|---|---|---|---|---|---|---|")
    for row in rows:
        L.append("| " + " | ".join(row) + " |")
    L.append("")
    L.append("The verdict is for the production shape (separate services, mosquitto). "
             "The old server's figures are quoted from the issue that set the targets, not measured here. "
             "P4's p99 comes from the histogram `palaver_session_hold_seconds` (half-octave buckets), "
             "read over the P3 run only: the bucket's upper bound is an upper bound on the true p99, and "
             f"{P4_HOLD_P99_MS:g} ms is a bucket bound, so the share of holds within {P4_HOLD_P99_MS:g} ms is exact. "
             "A turn holds its session "
             "only inside Redis, for one compare-and-set script; the histogram records that script's run "
             "time by Redis's own clock (control actions, absent here, record their lock from taken to "
             "released).")
    L.append("")
    floors = {k: load(out, f"floor-{k}.json") for k in ("instant", "100ms")}
    floors.update({f"idle-{p}": load(out, f"floor-idle-{p}.json") for p in idle_pauses(runs)})
    L.extend(misses_notes(out, runs, load(out, "loopback.json"), floors))
    poll = load(out, "poll.json")
    if poll and (runs.get("poll-p1i") or runs.get("poll-p1")):
        pi, pp = runs.get("poll-p1i"), runs.get("poll-p1")
        L.append("### Diagnostic: the same code with idle vCPUs polling")
        L.append("")
        L.append(f"This VM halts an idle vCPU at once (`guest_halt_poll_ns` = {poll['was']}). Rerun by "
                 "`lab/bench-vm.sh` with "
                 f"`BENCH_GUEST_HALT_POLL_NS={poll['guest_halt_poll_ns']}` (idle vCPUs poll "
                 f"{poll['guest_halt_poll_ns'] / 1000:.0f} µs before halting), services + mosquitto, "
                 "nothing else changed. Not a verdict: a check of how much of the one-session latency is the "
                 "VM's idle halting rather than palaver's work.")
        L.append("")
        L.append("| point | as measured above | with idle polling |")
        L.append("|---|---|---|")
        if pi:
            L.append(f"| P1' e2e | p50 {ms(lat(runs.get('p1i'), 'p50'))}, p99 {ms(lat(runs.get('p1i'), 'p99'))} "
                     f"| p50 {ms(lat(pi, 'p50'))}, p99 {ms(lat(pi, 'p99'))} |")
        if pp:
            a50, a99 = p1(runs.get("p1"))
            b50, b99 = p1(pp)
            L.append(f"| P1 e2e − 100 ms | p50 {ms(a50)}, p99 {ms(a99)} | p50 {ms(b50)}, p99 {ms(b99)} |")
        L.append("")
    L.append(f"![throughput and latency against sessions]({svg_rel})")
    L.append("")
    L.append("## Sessions sweep (services + mosquitto)")
    L.append("")
    L.append(f"| sessions | instant: replies/s | p50 | p99 | swap hold p99 (share ≤ {P4_HOLD_P99_MS:g} ms) | "
             "backend 100 ms: replies/s | p50 | p99 | errors |")
    L.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    inst = ["p1i"] + [f"sweep-instant-{n}" for n in SWEEP[1:-1]] + ["p3"]
    slow = ["p1"] + [f"sweep-100ms-{n}" for n in SWEEP[1:-1]] + ["p2"]
    for n, a, b in zip(SWEEP, inst, slow):
        ra, rb = runs.get(a), runs.get(b)
        cells = [str(n)]
        for r, label in ((ra, a), (rb, b)):
            if r is None:
                cells += ["—"] * 3
            else:
                cells += [f"{r['replies_per_sec']:.1f}", ms(lat(r, "p50")), ms(lat(r, "p99"))]
            if label == a:
                hold = p4(out, f"{a}-session-before.metrics", f"{a}-session-after.metrics")
                if hold and hold["count"]:
                    cells.append(f"≤ {hold['p99'][0] * 1000:.3g} ms ({hold['share_within'] * 100:.1f} %)")
                else:
                    cells.append("—")
        errs = sum(r["errors_total"] for r in (ra, rb) if r)
        cells.append(str(errs))
        L.append("| " + " | ".join(cells) + " |")
    L.append("")
    L.append("Lock hold p99 is the bucket bound from session-svc's histogram over that run alone; "
             f"in brackets the exact share of holds within {P4_HOLD_P99_MS:g} ms.")
    L.append("")
    errors = {k: v["errors"] for k, v in runs.items() if v["errors_total"]}
    if errors:
        L.append("Errors by kind: " + "; ".join(f"{k}: {json.dumps(v)}" for k, v in sorted(errors.items())))
    else:
        L.append("No run had an error reply or a missing reply.")
    L.append("")
    cpu = cpu_during(out)
    if cpu:
        use, seconds = cpu
        L.append("## Where the CPU goes during P3")
        L.append("")
        L.append(f"CPU time per second of wall time over the P3 run ({seconds:.0f} s, warm-up included), "
                 f"at {runs['p3']['replies_per_sec']:.0f} replies/s; the load generator takes the rest "
                 f"of the {machine.get('nproc', '?')} cores.")
        L.append("")
        L.append("| process | CPU ms/s | µs per reply |")
        L.append("|---|---:|---:|")
        rps = runs["p3"]["replies_per_sec"]
        for k, v in sorted(use.items(), key=lambda kv: -kv[1]):
            L.append(f"| {k} | {v:.0f} | {v * 1000 / rps:.0f} |")
        L.append("")
    L.append("## Machine")
    L.append("")
    L.append(f"- {machine.get('nproc', '?')} cores (`nproc`), {machine.get('cpu', '?')}, "
             f"{machine.get('memory_gib', '?')} GiB memory, Linux {machine.get('kernel', '?')}"
             + (f", virtualization: {machine['virtualization']}" if machine.get("virtualization") else ""))
    L.append(f"- {machine.get('rustc', '?')}; {machine.get('redis', '?')}; {machine.get('mosquitto', '?')}; "
             f"Python {machine.get('python', '?')}")
    L.append("- Everything runs on this one machine: broker, Redis, fake vLLM, services and load generator "
             "share its cores.")
    loop = load(out, "loopback.json")
    if loop:
        rt = loop["redis_ping_median_us_after_idle_ms"]
        L.append("- One hop between two processes (a Redis PING round trip from Python, median): "
                 + ", ".join(f"{v:.0f} µs after {k} ms idle" for k, v in rt.items())
                 + ". A turn crosses fourteen such hops on its critical path; idle CPUs make each one dearer.")
    L.append("")
    L.append("## How it is measured")
    L.append("")
    L.append("- **Load**: `palaver bench`, a closed-loop MQTT client speaking the wire protocol: each session "
             "publishes to `bench/user_input` (QoS 1) with the reference client's reply topic "
             "`bench/assistant_response/<sid>/<clientId>/<requestId>` and sends its next message when the reply "
             "arrives. One MQTT connection per session, 64-byte messages. Latency is end to end, from handing "
             "the publish to the MQTT client until the reply is read; every sample is kept and percentiles are "
             "exact (nearest rank). Replies/s counts the replies that arrive inside the measured window, after "
             "a warm-up. Sessions keep their history, trimmed to the project's 20 messages.")
    f_i, f_s = fake.get("instant"), fake.get("100ms")
    floor_too = " (the floor's backend pauses the same way)" if floors.get("100ms") else ""
    fake_line = ("- **Backend**: `palaver fake-vllm` (the test suite's fake vLLM as a process), streamed SSE replies "
                 "of 16 words in vLLM's exact chunk shapes, `--tpot 0`; \"instant\" is `--ttft 0`, "
                 "\"backend 100 ms\" is `--ttft 100`.")
    if f_i and f_s:
        fake_line += (f" Measured alone over HTTP (a Python client, no palaver): median "
                      f"{f_i['median_ms']:.2f} ms instant, {f_s['median_ms']:.2f} ms for 100 ms. "
                      "P1 subtracts the nominal 100 ms, so the fake's own overshoot counts against palaver"
                      f"{floor_too}.")
    L.append(fake_line)
    L.append("- **Project**: `scripts/bench-projects.toml` defines project `bench` with `rate_limit = 0`. "
             "The shipped default (20 messages per 60 s per session) would answer almost every benchmark "
             "request with \"Rate limit exceeded\"; the default itself is unchanged.")
    L.append("- **Broker**: mosquitto with the test suite's settings (`max_inflight_messages 0`, "
             "`max_queued_messages 100000`) plus `set_tcp_nodelay true`: mosquitto leaves Nagle's algorithm "
             "on by default, and a reply written right after a PUBACK then waits for the peer's delayed ACK "
             "(about 40 ms). `palaver up` runs rumqttd inside the process, with Nagle turned off by "
             "palaver on rumqttd's listener (rumqttd has no setting for it).")
    L.append("- **The machine's diagnostics**: " + (
        "`lab/bench-vm.sh`, run after `scripts/bench.sh`, measured " if vm else
        "opt-in, not in these runs: `lab/bench-vm.sh`, run after `scripts/bench.sh`, measures ")
        + "a loopback hop and a cache line after idleness, the floor of a turn's hops "
        "(`palaver-lab floor`) and P1 with every vCPU kept busy. They explain the one-session points "
        "on this machine; they are not verdicts.")
    L.append("- **Services**: the release binaries `gateway`, `session-svc`, `inference-svc` (the workspace's "
             "release profile: optimised for size, fat LTO, one codegen unit) with default "
             "settings (8 generations at once), Redis for dialogs, each serving `/metrics`. P4 reads "
             "session-svc's lock histogram before and after P3, the stretches read all three services' turn "
             "histograms before and after P1' and P1; P5 reads `VmRSS` from `/proc/<pid>/status` "
             "right after P3.")
    L.append("")
    commands = [(os.path.join(out, name), head) for name, head in
                (("commands.txt", None), ("commands-vm.txt", "# lab/bench-vm.sh"))]
    commands = [(path, head) for path, head in commands if os.path.exists(path)]
    if commands:
        L.append("## Commands run")
        L.append("")
        L.append("```")
        for path, head in commands:
            if head:
                L.append(head)
            with open(path) as f:
                L.extend(line.rstrip("\n").replace(os.getcwd() + "/", "") for line in f)
        L.append("```")
        L.append("")
    text = "\n".join(L)
    # Sections other tools wrote (between <!-- NAME: ... --> and
    # <!-- /NAME -->: the real model, streaming, several GPUs, the figures
    # behind code choices) come from other runs: keep them, before "## Machine".
    kept = kept_sections(args.markdown)
    if kept:
        text = text.replace("## Machine", kept + "\n## Machine", 1)
    with open(args.markdown, "w") as f:
        f.write(text)


def kept_sections(path):
    """Every marked section in `path` (markers included), in order."""
    try:
        with open(path) as f:
            old = f.read()
    except OSError:
        return ""
    blocks = re.findall(r"(<!-- ([a-z0-9-]+): .*?<!-- /\2 -->)", old, re.S)
    return "".join(block + "\n" for block, _ in blocks)


if __name__ == "__main__":
    main()
