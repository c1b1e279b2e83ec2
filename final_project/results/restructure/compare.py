"""Issue 16's restructuring check: the new tree against the commit before it, round by round.

Reads every serving_{before,after}_r<N>.json beside this file (written by run.sh) and prints, per
round, the output tok/s of the three timed serving passes and their mean, batch-1 decode tok/s,
and the change after vs before. The target (within 3% of the old tree) counts as met only if every
clean round with both trees meets it, in both serving mean and batch-1.

    python final_project/results/restructure/compare.py [--markdown]

The JSON's metadata.git_commit is the commit of the device's checkout, not of the tree that ran, so
the tree is taken from the file name (before = git archive 4e66ff6) and device_r<N>.txt ("after tree").
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGET = 0.03

# Rounds whose numbers are not a clean comparison, and why (see final_project/README.md).
NOT_CLEAN = {
    2: "after ran a working copy holding another engineer's uncommitted slow prompt validation",
}
# Rounds 1-2 predate the "after tree" line in device_r<N>.txt: they ran the device's working copy.
AFTER_TREE = {1: "working copy at f51bc45", 2: "working copy"}


def load_round(path: Path) -> dict:
    data = json.loads(path.read_text())
    serving = [r for r in data["results"] if "max_decode_steps" in r["system"]]
    passes = [r["output_tokens_per_s"] for r in serving]
    # seconds per pass: wall duration and the engine's own step phases, averaged over the passes
    phases = {"duration": [r["duration_s"] for r in serving]}
    for key in ("schedule", "execute", "update", "decode_launch"):
        phases[key] = [r["engine_stats"]["time_s"][key] for r in serving]
    batch1 = [r["output_tokens_per_s"] for r in data["results"] if r["system"].endswith("batch-1")]
    return {
        "timestamp": data["metadata"]["timestamp"],
        "passes": passes,
        "mean": sum(passes) / len(passes),
        "seconds": {k: sum(v) / len(v) for k, v in phases.items()},
        "batch1": batch1[0] if batch1 else None,
    }


def after_tree(rnd: int) -> str:
    dev = HERE / f"device_r{rnd}.txt"
    if dev.exists():
        m = re.search(r"after tree: (\w+)", dev.read_text())
        if m:
            return m.group(1)[:7]
    return AFTER_TREE.get(rnd, "?")


def main(markdown: bool = False) -> int:
    rounds: dict[int, dict[str, dict]] = {}
    for path in sorted(HERE.glob("serving_*_r*.json")):
        m = re.fullmatch(r"serving_(before|after)_r(\d+)\.json", path.name)
        if m:
            rounds.setdefault(int(m.group(2)), {})[m.group(1)] = load_round(path)

    if markdown:
        print("| round | after tree | first | before: passes (mean) | after: passes (mean) | serving Δ | "
              "batch-1 before / after | batch-1 Δ | counted |")
        print("|---|---|---|---|---|---|---|---|---|")
    fails, counted, firsts = [], [], {}
    for rnd in sorted(rounds):
        trees = rounds[rnd]
        b, a = trees.get("before"), trees.get("after")
        cells = []
        for t in (b, a):
            cells.append(" / ".join(f"{p:,.0f}" for p in t["passes"]) + f" ({t['mean']:,.0f})" if t else "no JSON")
        d_serv = (a["mean"] / b["mean"] - 1) if a and b else None
        d_b1 = (a["batch1"] / b["batch1"] - 1) if a and b and a["batch1"] and b["batch1"] else None
        if a is None or b is None:
            status = "no: one tree has no JSON"
        elif rnd in NOT_CLEAN:
            status = "no: " + NOT_CLEAN[rnd]
        else:
            status = "yes"
            counted.append(rnd)
            if d_serv < -TARGET or (d_b1 is not None and d_b1 < -TARGET):
                fails.append(rnd)
        # which process ran first in the device call (the first one also fills the compile caches)
        first = min((t["timestamp"], n) for n, t in trees.items())[1] if a and b else "–"
        firsts[rnd] = first
        b1 = f"{b['batch1']:,.1f}" if b and b["batch1"] else "–"
        a1 = f"{a['batch1']:,.1f}" if a and a["batch1"] else "–"
        ds = f"{d_serv:+.1%}" if d_serv is not None else "–"
        db = f"{d_b1:+.1%}" if d_b1 is not None else "–"
        if markdown:
            row = [str(rnd), after_tree(rnd), first, cells[0], cells[1], ds, f"{b1} / {a1}", db, status]
            print("| " + " | ".join(row) + " |")
        else:
            print(f"round {rnd} (after tree {after_tree(rnd)}): before {cells[0]}; after {cells[1]}; "
                  f"first {first}; serving {ds}; batch-1 {b1} -> {a1} ({db}); counted: {status}")
    print("\nSeconds per serving pass (mean of the passes): wall duration; engine schedule / execute / update;"
          " decode launch (inside execute)")
    for rnd in counted:
        for name in ("before", "after"):
            sec = rounds[rnd][name]["seconds"]
            print(f"round {rnd} {name:6}: {sec['duration']:.3f}; "
                  f"{sec['schedule']:.3f} / {sec['execute']:.3f} / {sec['update']:.3f}; {sec['decode_launch']:.3f}")
    # the order effect: each tree's mean serving rate by whether its process ran first in the call, and the
    # mean scheduler seconds per pass likewise (the first process compiled from empty caches)
    print("\nBy run order (clean rounds): mean output tok/s, scheduler s per pass")
    for name in ("before", "after"):
        for place in ("first", "second"):
            rs = [r for r in counted if (firsts[r] == name) == (place == "first")]
            if rs:
                rate = sum(rounds[r][name]["mean"] for r in rs) / len(rs)
                sched = sum(rounds[r][name]["seconds"]["schedule"] for r in rs) / len(rs)
                print(f"{name:6} ran {place:6}: rounds {', '.join(map(str, rs))}: {rate:,.0f} tok/s, {sched:.3f} s")
    if counted:
        mean = sum(rounds[r]["after"]["mean"] / rounds[r]["before"]["mean"] - 1 for r in counted) / len(counted)
        print(f"mean serving change over the clean rounds: {mean:+.1%}")
    if not counted:
        verdict = "not shown (no clean round)"
    elif fails:
        verdict = f"not met: round(s) {', '.join(map(str, fails))} fall more than {TARGET:.0%} below"
    else:
        verdict = f"met in every clean round ({', '.join(map(str, counted))})"
    print(f"\nVerdict (within {TARGET:.0%} in every clean round): {verdict}")
    # The same rule over the latest rounds, once the new tree has run both first and second: the failing rounds
    # may belong to older trees (each round ran the main of its day).
    latest = []
    for r in reversed(counted):
        latest.insert(0, r)
        if {firsts[x] for x in latest} == {"before", "after"}:
            break
    if len(latest) > 1 and {firsts[x] for x in latest} == {"before", "after"}:
        bad = [r for r in latest if r in fails]
        trees = ", ".join(f"{r}: {after_tree(r)}" for r in latest)
        state = f"not met: round(s) {', '.join(map(str, bad))}" if bad else "met"
        print(f"Latest rounds, one with each tree first ({trees}): {state}")
    return 0


if __name__ == "__main__":
    sys.exit(main(markdown="--markdown" in sys.argv[1:]))
