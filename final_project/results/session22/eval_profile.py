"""Kernel launches and times of one timed eval pass per mode (issue 19's fp32 eval row), under torch.profiler.

    python final_project/results/session22/eval_profile.py OUT.json [--device_type cuda] [--no_share_context]

Runs scripts/eval.py's evaluation (truthfulqa_mc2 on the shipped file, fp32, both modes, 3 interleaved passes)
and profiles each mode's last pass (after warm-up): per mode, the kernels (or CPU ops) by count and time, the
host wall time of the pass, and the number of model forwards.
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
device = "cuda" if torch.cuda.is_available() else "cpu"
seen = defaultdict(int)
report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "modes": {}}
original = modes.run_mode


def profiled(model, task, questions, encoded, mode, *args, **kwargs):
    seen[mode] += 1
    if seen[mode] < 3:
        return original(model, task, questions, encoded, mode, *args, **kwargs)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        start = time.perf_counter()
        result = original(model, task, questions, encoded, mode, *args, **kwargs)
        wall = time.perf_counter() - start
    rows = []
    for e in prof.key_averages():
        dev_us = getattr(e, "device_time_total", 0) or getattr(e, "cuda_time_total", 0)
        rows.append({"name": e.key[:120], "count": e.count, "self_cpu_us": e.self_cpu_time_total,
                     "device_us": dev_us, "is_kernel": getattr(e, "device_type", None) is not None
                     and str(e.device_type).endswith("CUDA")})
    kernels = sorted((r for r in rows if r["is_kernel"]), key=lambda r: -r["device_us"])
    ops = sorted((r for r in rows if not r["is_kernel"]), key=lambda r: -r["self_cpu_us"])
    report["modes"][mode] = {
        "wall_s": wall, "elapsed_s": result.metrics["elapsed_s"], "num_batches": result.metrics["num_batches"],
        "kernel_launches": sum(r["count"] for r in kernels), "kernel_us": sum(r["device_us"] for r in kernels),
        "kernels": kernels[:40], "cpu_ops": ops[:40],
    }
    m = report["modes"][mode]
    print(f"{mode}: wall {wall * 1e3:.1f} ms, elapsed {m['elapsed_s'] * 1e3:.1f} ms, {m['num_batches']} batches, "
          f"{m['kernel_launches']} kernels, {m['kernel_us'] / 1e3:.2f} ms of kernels", flush=True)
    for r in kernels[:15]:
        print(f"   {r['count']:6d} {r['device_us']:10.1f} us  {r['name']}")
    for r in ops[:15]:
        print(f"   cpu {r['count']:6d} {r['self_cpu_us']:10.1f} us  {r['name']}")
    return result


modes.run_mode = profiled
bench_cli.eval_main(["--task", "truthfulqa_mc2", "--data", "fms/resources/eval/truthfulqa_mc.json", "--mode", "both",
                     "--dtype", "fp32", "--device_type", device, "--no_progress", "--timing_repeats", "3",
                     "--output", out + ".eval.json", *extra])
json.dump(report, open(out, "w"), indent=1)
print("wrote", out)
