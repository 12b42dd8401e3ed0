#!/usr/bin/env python3
"""Instructions and machine code per turn, from callgrind dumps.

    scripts/callgrind_footprint.py DUMP_DIR TURNS OUT.json

DUMP_DIR holds one dump per service, named `<service>.<pid>.<n>` (written
by scripts/bench.sh with `valgrind --tool=callgrind --dump-instr=yes
--compress-strings=no --compress-pos=no`, zeroed before the measured turns
and dumped after them). For each service this prints and saves:

- instructions per turn (callgrind's Ir over the dump, divided by TURNS);
- the code run per turn: the 64-byte lines of machine code that hold an
  instruction executed at least TURNS times in the dump, i.e. about once a
  turn or more. That is the code a turn needs back in the caches when the
  service wakes after the backend's pause; code run in only some turns
  (errors, timers) mostly falls below the bar.
- the crates the instructions are spent in (by the source file of the
  code, inlined code counted where it was written).

Counts, not times: the same binary and inputs give the same numbers,
whatever else the machine is doing.
"""
import collections
import json
import os
import re
import sys

LINE = 64
CRATE = re.compile(r"/registry/src/[^/]+/([A-Za-z0-9_\-]+?)-\d+\.\d+")


def crate_of(source, obj):
    """Where a cost line's code was written: a crate, std, palaver, or a library."""
    if obj and ".so" in os.path.basename(obj):
        return os.path.basename(obj)  # libc, the dynamic loader: shared objects, not built here
    m = CRATE.search(source or "")
    if m:
        return m.group(1)
    if source and source.startswith("/rustc/"):
        return "std"
    if source and ("/out/palaver." in source):
        return "palaver-proto (generated)"
    m = re.search(r"/([a-z0-9\-]+)/src/", source or "")
    if m:
        return m.group(1)
    return "other"


def parse(path):
    """(Ir by crate, executions by instruction address) of one uncompressed dump."""
    by_crate = collections.Counter()
    runs = collections.Counter()
    obj = source = None
    after_calls = False
    with open(path, errors="replace") as f:
        for line in f:
            head = line[:1]
            if not head or head in "#\n":
                continue
            if head.isalpha():
                key, _, value = line.partition("=")
                value = value.strip()
                if key == "ob":
                    obj = value
                elif key in ("fl", "fi", "fe"):
                    source = value
                elif key == "calls":
                    after_calls = True  # the next cost line is the callee's, inclusive
                continue
            if after_calls:
                after_calls = False
                continue
            fields = line.split()
            if len(fields) < 3 or not fields[0].startswith("0x"):
                continue
            addr, ir = int(fields[0], 16), int(fields[2])
            by_crate[crate_of(source, obj)] += ir
            # Ir at one address is how often that instruction ran.
            runs[(obj, addr)] += ir
    return by_crate, runs


def footprint(path, turns):
    by_crate, runs = parse(path)
    total = sum(by_crate.values())
    lines_per_turn = {(o, a // LINE) for (o, a), n in runs.items() if n >= turns}
    return {
        "instructions_per_turn": round(total / turns),
        "code_lines_per_turn": len(lines_per_turn),
        "code_kib_per_turn": round(len(lines_per_turn) * LINE / 1024),
        "crates": [
            {"crate": c, "share": round(n / total, 4)} for c, n in by_crate.most_common(8)
        ] if total else [],
    }


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    folder, turns, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    if turns <= 0:
        sys.exit("callgrind_footprint.py: no turns were measured")
    result = {"turns": turns, "services": {}}
    for name in sorted(os.listdir(folder)):
        m = re.fullmatch(r"([a-z\-]+)\.\d+\.\d+", name)
        if not m:
            continue
        service = m.group(1)
        result["services"][service] = footprint(os.path.join(folder, name), turns)
    if not result["services"]:
        sys.exit(f"callgrind_footprint.py: no dumps in {folder}")
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    for service, r in result["services"].items():
        top = ", ".join(f"{c['crate']} {c['share'] * 100:.0f} %" for c in r["crates"][:4])
        print(f"   {service}: {r['instructions_per_turn']:,} instructions a turn, "
              f"{r['code_kib_per_turn']} KiB of code run a turn ({r['code_lines_per_turn']:,} lines); {top}")


if __name__ == "__main__":
    main()
