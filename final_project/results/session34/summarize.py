"""Tables of session 34's device runs: python3 summarize.py [FOLDER ...] (default c1 c2 c3, those present).

1B serving rows: the three output tok/s runs of the sweep, batch-1 tok/s and TPOT, engine start-up and its batch-1
capture (compile included). Granite-4.0-H-1B rows: cold get_model + engine, dynamo graphs / recompiles, the batch-1
capture."""
import glob
import json
import os
import sys


def serving(path):
    d = json.load(open(path))
    runs = [r for r in d["results"] if "batch-1" not in r["system"]]
    one = next(r for r in d["results"] if "batch-1" in r["system"])
    start = d["startup"]
    cap1 = start.get("graph_capture_s", {}).get("1/greedy")
    return (f"| {os.path.basename(os.path.dirname(path))} | {d['metadata']['git_commit']} | "
            + " / ".join(f"{r['output_tokens_per_s']:,.0f}" for r in runs)
            + f" | {one['output_tokens_per_s']:.1f} ({one['tpot_p50_ms']:.2f} ms) | {start['engine_s']:.1f} | "
            + ("-" if cap1 is None else f"{cap1:.2f}") + " |")


def startup(path):
    d = json.load(open(path))
    run = d["models"][0]["runs"]["cold"]
    target = d["models"][0]["targets"][0]
    cap1 = run.get("graph_capture_s", {}).get("1/greedy")
    return (f"| {os.path.basename(path)[:-5]} | {d['metadata']['git_commit']} | {target['measured_s']:.1f} | "
            f"{run['dynamo']['graphs_traced']} / {len(run['dynamo']['recompiles'])} | "
            + ("-" if cap1 is None else f"{cap1:.2f}") + " |")


for folder in sys.argv[1:] or [f for f in ("c1", "c2", "c3") if os.path.isdir(f)]:
    print(f"## {folder}")
    for path in sorted(glob.glob(f"{folder}/serving_1b_*/serving.json")):
        print(serving(path))
    for path in sorted(glob.glob(f"{folder}/startup_gh_*.json")):
        print(startup(path))
