"""Where an LLMEngine run spends its time: torch.profiler over a short serving workload.

    python scripts/profile_serving.py --num_requests 32 --output_len 64       # CUDA: llama 3.2-1b bf16

Prints the kernels (self device time) and host operators (self CPU time) that cost the most, the
engine's own phase timers, and the device time of one decode step per batch size from CUDA-graph
replays. Writes profile.json (tables + command + device) to --results_dir.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fms.models import get_model  # noqa: E402
from fms.serving import LLMEngine, SamplingParams  # noqa: E402
from fms.utils import benchmarking as bench  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results_dir", type=Path, default=Path("results/profile_serving"))
    p.add_argument("--architecture", default="llama")
    p.add_argument("--variant", default=None, help="default: 3.2-1b on CUDA, micro on CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--num_requests", type=int, default=32)
    p.add_argument("--prompt_range", default="64,512")
    p.add_argument("--output_len", type=int, default=64)
    p.add_argument("--max_num_seqs", type=int, default=None)
    p.add_argument("--max_decode_steps", type=int, default=None, help="default: the engine's")
    p.add_argument("--num_pages", type=int, default=None)
    p.add_argument("--step_batch_sizes", default="1,8,32,128", help="decode-step device time per batch size")
    p.add_argument("--top", type=int, default=20)
    return p.parse_args(argv)


def _table(prof, key: str, top: int) -> list[dict]:
    rows = []
    for e in prof.key_averages():
        rows.append({"name": e.key[:90], "count": e.count,
                     "self_device_ms": getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) / 1e3,
                     "self_cpu_ms": e.self_cpu_time_total / 1e3})
    rows.sort(key=lambda r: -r[key])
    return rows[:top]


def step_times(engine, batch_sizes, device) -> list[dict]:
    """Median device ms of one decode step per batch size: replays of the runner's graphs on idle rows."""
    dec = engine.runner.decoder
    out = []
    for b in batch_sizes:
        size = next((s for s in dec.batch_sizes if s >= b), None) if dec.use_graphs else None
        if size is None:
            continue
        graph = dec.idle_graph(size)
        times = []
        for _ in range(20):
            dec.step_index.zero_()  # each replay writes out_tokens[step_index]
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        out.append({"batch_size": size, "graph_step_ms": sorted(times)[len(times) // 2],
                    "note": "idle rows: every row reads one scratch token, so this is the weight-bound floor"})
    return out


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    is_cuda = device.type == "cuda"
    variant = args.variant or ("3.2-1b" if is_cuda else "micro")
    model = get_model(args.architecture, variant, device_type=device.type, data_type=None)
    lo, _, hi = args.prompt_range.partition(",")
    workload = bench.MixedWorkload(args.num_requests, (int(lo), int(hi or lo)), (args.output_len, args.output_len))
    prompts, _ = workload.prompts(model.config.vocab_size)
    max_num_seqs = args.max_num_seqs or (128 if is_cuda else 8)
    num_pages = args.num_pages or (None if is_cuda else 256)
    steps = {} if args.max_decode_steps is None else {"max_decode_steps": args.max_decode_steps}
    engine = LLMEngine(model, max_num_seqs=max_num_seqs, num_pages=num_pages, **steps)
    params = SamplingParams(max_new_tokens=args.output_len, ignore_eos=True)
    engine.generate(prompts[:8], SamplingParams(max_new_tokens=4, ignore_eos=True), use_tqdm=False)  # warm-up
    if engine.prefix_cache is not None:
        engine.prefix_cache.clear()
    engine.reset_stats()
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if is_cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        engine.generate(prompts, params, use_tqdm=False)
        bench.synchronize(device)
    stats = engine.stats()
    kernels = _table(prof, "self_device_ms", args.top) if is_cuda else []
    host = _table(prof, "self_cpu_ms", args.top)
    steps = step_times(engine, [int(b) for b in args.step_batch_sizes.split(",")], device) if is_cuda else []
    step_kernels = []
    dec = engine.runner.decoder
    if is_cuda and dec.use_graphs:  # the kernels inside one batch-1 decode-step graph
        graph = dec.idle_graph(1)
        with torch.profiler.profile(activities=activities) as step_prof:
            for _ in range(10):
                dec.step_index.zero_()
                graph.replay()
            torch.cuda.synchronize()
        step_kernels = _table(step_prof, "self_device_ms", args.top)
        for r in step_kernels:
            r["per_step_us"] = r["self_device_ms"] * 100  # 10 replays
        print(f"{'batch-1 decode step kernel':<92}{'count':>7}{'us/step':>10}")
        for r in step_kernels:
            print(f"{r['name']:<92}{r['count']:>7}{r['per_step_us']:>10.1f}")
    print(f"{'kernel (self device ms)':<92}{'count':>7}{'ms':>10}")
    for r in kernels:
        print(f"{r['name']:<92}{r['count']:>7}{r['self_device_ms']:>10.2f}")
    print(f"\n{'host op (self CPU ms)':<92}{'count':>7}{'ms':>10}")
    for r in host:
        print(f"{r['name']:<92}{r['count']:>7}{r['self_cpu_ms']:>10.2f}")
    print("\nengine phases (s):", {k: round(v, 3) for k, v in stats["time_s"].items()})
    for s in steps:
        print(f"decode step, batch {s['batch_size']}: {s['graph_step_ms']:.3f} ms (graph replay)")
    results = {"metadata": bench.run_metadata("python " + " ".join(shlex.quote(a) for a in sys.argv), device),
               "variant": variant, "num_requests": args.num_requests, "output_len": args.output_len,
               "kernels": kernels, "host_ops": host, "batch1_step_kernels": step_kernels, "engine_stats": stats, "decode_step_ms": steps}
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / "profile.json").write_text(json.dumps(bench._jsonable(results), indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
