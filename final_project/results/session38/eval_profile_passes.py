"""Host time per operator of the fp32 eval row's passes, several passes of each mode under torch.profiler.

    python final_project/results/session38/eval_profile_passes.py OUT.json [--device_type cuda] [--no_share_context]

Session 37's profile (results/session37/c2/eval_profile_shared.json, one pass of each mode) had every operator the
two modes share about 11% slower on the host in the paged pass (aten::mul 12.3 against 10.5 us a call, aten::mm 48.1
against 43.5, cudaLaunchKernel 8.6 against 7.6), not paged-only work. This profiles passes 3 to 6 of each mode (the
modes alternate: default 3, paged 3, default 4, ...), so that a per-operator gap that follows the mode and one that
follows the pass (noise, the order) can be told apart. Per pass: wall time, the shared operators' summed host time,
and the per-call host time of the busiest ones.
"""
import json
import sys
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from fms.entrypoints import bench_cli
from fms.eval import modes

out = sys.argv[1]
extra = sys.argv[2:]
device = "cuda" if "--device_type" in extra and extra[extra.index("--device_type") + 1] == "cuda" else "cpu"
extra = [a for i, a in enumerate(extra) if a != "--device_type" and (i == 0 or extra[i - 1] != "--device_type")]
seen = defaultdict(int)
passes = []
original = modes.run_mode
PROFILED = range(3, 7)
WATCH = ("aten::mul", "aten::mm", "aten::add", "aten::copy_", "aten::empty", "cudaLaunchKernel", "cudaMemcpyAsync")


def profiled(model, task, questions, encoded, mode, *args, **kwargs):
    seen[mode] += 1
    if seen[mode] not in PROFILED:
        return original(model, task, questions, encoded, mode, *args, **kwargs)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        start = time.perf_counter()
        result = original(model, task, questions, encoded, mode, *args, **kwargs)
        wall = time.perf_counter() - start
    host = {e.key: (e.count, e.self_cpu_time_total) for e in prof.key_averages()
            if getattr(e, "device_type", None) is None or not str(e.device_type).endswith("CUDA")}
    passes.append({"mode": mode, "pass": seen[mode], "wall_s": wall, "elapsed_s": result.metrics["elapsed_s"],
                   "host_ops": host})
    print(f"{mode} pass {seen[mode]}: wall {wall * 1e3:.1f} ms", flush=True)
    return result


modes.run_mode = profiled
bench_cli.eval_main(["--task", "truthfulqa_mc2", "--data", "fms/resources/eval/truthfulqa_mc.json", "--mode", "both",
                     "--dtype", "fp32", "--device_type", device, "--no_progress", "--timing_repeats",
                     str(max(PROFILED)), "--output", out + ".eval.json", *extra])
shared = set.intersection(*(set(p["host_ops"]) for p in passes))
report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "passes": []}
for p in passes:
    ops = p["host_ops"]
    row = {"mode": p["mode"], "pass": p["pass"], "wall_ms": 1e3 * p["wall_s"], "elapsed_ms": 1e3 * p["elapsed_s"],
           "shared_ops_host_ms": sum(ops[n][1] for n in shared) / 1e3,
           "us_per_call": {n: ops[n][1] / ops[n][0] for n in WATCH if n in ops and ops[n][0]}}
    report["passes"].append(row)
    print(f"{row['mode']:8s} pass {row['pass']}: wall {row['wall_ms']:.1f} ms, shared ops {row['shared_ops_host_ms']:.1f} ms "
          "host; us/call " + ", ".join(f"{n.split('::')[-1]} {v:.2f}" for n, v in row["us_per_call"].items()))
json.dump(report, open(out, "w"), indent=1)
print("wrote", out)
