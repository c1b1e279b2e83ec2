"""Session 37's serving + batch-1 pairs: python3 pairs.py FOLDER PAIR [PAIR ...], each PAIR "A,B" (run names, A the
baseline). Prints each run's mean of its three serving passes and its batch-1 rate, then B against A per pair."""
import json
import os
import sys


def rates(folder, run):
    d = json.load(open(os.path.join(folder, f"serving_1b_{run}", "serving.json")))
    passes = [r["output_tokens_per_s"] for r in d["results"] if "batch-1" not in r["system"]]
    one = next(r["output_tokens_per_s"] for r in d["results"] if "batch-1" in r["system"])
    return d["metadata"]["git_commit"], sum(passes) / len(passes), one


folder = sys.argv[1]
print("| pair | baseline (commit): serving mean, batch-1 | other (commit): serving mean, batch-1 | serving | batch-1 |")
print("|---|---|---|---|---|")
for pair in sys.argv[2:]:
    a, b = pair.split(",")
    ca, sa, oa = rates(folder, a)
    cb, sb, ob = rates(folder, b)
    print(f"| {a} / {b} | {ca}: {sa:,.0f}, {oa:.1f} | {cb}: {sb:,.0f}, {ob:.1f} | {100 * (sb / sa - 1):+.1f}% | "
          f"{100 * (ob / oa - 1):+.1f}% |")
