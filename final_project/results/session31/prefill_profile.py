"""Where a full prefill step's GPU time goes: the engine as `fms serve` builds it (Llama-3.2-1B shape, random weights),
one step of 28 prompts x 292 tokens (8,176 tokens, the serving workload's full step; with --mixed 27 prompts and 28
requests decoding, as the workload's later prefill steps) warmed twice, then timed with CUDA events three times and
profiled once (torch.profiler, kernels by device time). With --trace, the profiled
step's chrome trace is also written (gzip) and read back for where the GPU waited: every gap between kernels of at
least 20 us, and for the largest, the host op that launched the kernel ending it (from the launch's correlation id)
and how long after the gap began that launch happened (a launch at the gap's end: the GPU was waiting on the host).

    python prefill_profile.py OUT.json [--trace TRACE.json.gz] [--mixed]
"""
import json
import random
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 2)[0] + "/session25")
from prefill_probe import build_served_engine  # noqa: E402


def gpu_gaps(events: list[dict], min_us: float = 20.0, top: int = 15) -> dict:
    """Idle time of the GPU in a chrome trace (torch.profiler's export): kernel/memcpy/memset events sorted by start,
    the gaps of at least min_us between one's end and the next's start, and for the `top` largest, the launching
    runtime call (matched by correlation id) and the innermost host op enclosing that call."""
    gpu = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
                 key=lambda e: e["ts"])
    runtime = {e["args"]["correlation"]: e for e in events
               if e.get("ph") == "X" and e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {})}
    ops = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("cpu_op", "user_annotation", "python_function")]

    def enclosing(call):
        inside = [o for o in ops if o.get("tid") == call.get("tid") and o["ts"] <= call["ts"]
                  and call["ts"] + call.get("dur", 0) <= o["ts"] + o["dur"]]
        return min(inside, key=lambda o: o["dur"])["name"] if inside else None

    gaps, busy = [], 0.0
    for before, after in zip(gpu, gpu[1:]):
        end = before["ts"] + before["dur"]
        gap = after["ts"] - max(end, before["ts"])
        if gap >= min_us:
            gaps.append((gap, end, after))
    for e in gpu:
        busy += e["dur"]
    rows = []
    for gap, end, after in sorted(gaps, key=lambda g: -g[0])[:top]:
        call = runtime.get(after.get("args", {}).get("correlation"))
        rows.append({"gap_us": gap, "next_kernel": after["name"][:120],
                     "launched_us_after_gap_start": None if call is None else call["ts"] - end,
                     "launch_call": None if call is None else call["name"],
                     "host_op": None if call is None else enclosing(call)})
    span = (gpu[-1]["ts"] + gpu[-1]["dur"] - gpu[0]["ts"]) if gpu else 0.0
    return {"gpu_events": len(gpu), "span_us": span, "busy_us": busy, "gaps_over_min_us": len(gaps),
            "gap_total_us": sum(g[0] for g in gaps), "min_us": min_us, "largest": rows}


def timed_ms(fn, cuda: bool) -> tuple[float, float | None]:
    """fn() from an idle device: (host ms until it returns, CUDA-event ms from its start to the device's end of it)."""
    events = [torch.cuda.Event(enable_timing=True) for _ in range(2)] if cuda else []
    if cuda:
        torch.cuda.synchronize()
        events[0].record()
    t0 = time.perf_counter()
    fn()
    wall = time.perf_counter() - t0
    if not cuda:
        return 1e3 * wall, None
    events[1].record()
    torch.cuda.synchronize()
    return 1e3 * wall, events[0].elapsed_time(events[1])


def main(out, trace=None, mixed=False):
    from torch.profiler import ProfilerActivity, profile

    from fms.serving import SamplingParams

    engine, cuda, variant = build_served_engine()
    vocab = engine.model.config.vocab_size
    rng = random.Random(0)
    prompts = 27 if mixed else 28  # with 28 decode rows, 27 prompts keep the step inside its 8,192-token budget
    # on the CPU (llama micro, uncompiled) the script only checks itself
    report = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "variant": variant, "prompts": prompts, "tokens_each": 292,
              "decode_rows": 28 if mixed else 0, "steps": []}

    def one_step():
        running = []
        if mixed:  # 28 requests already prefilled, so that the timed step also decodes them (a mixed step)
            running = [engine.add_request([rng.randrange(4, vocab) for _ in range(64)],
                                          SamplingParams(max_tokens=64, ignore_eos=True)) for _ in range(28)]
            engine.step()
        ids = [engine.add_request([rng.randrange(4, vocab) for _ in range(292)],
                                  SamplingParams(max_tokens=2, ignore_eos=True)) for _ in range(prompts)]
        wall_ms, gpu_ms = timed_ms(engine.step, cuda)
        row = {"step_wall_ms": wall_ms, "gpu_ms": gpu_ms}
        for rid in running + ids:
            engine.abort(rid)
            engine.pop_output(rid)
        return row

    for i in range(5):
        row = one_step()
        row["warm"] = i < 2
        report["steps"].append(row)
        print(json.dumps(row), flush=True)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        one_step()
    kernels = [{"name": k.key[:160], "count": k.count, "device_us": k.self_device_time_total}
               for k in prof.key_averages() if k.self_device_time_total > 0]
    kernels.sort(key=lambda k: -k["device_us"])
    report["kernels"] = kernels[:40]
    report["kernel_total_us"] = sum(k["device_us"] for k in kernels)
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30))
    if trace:
        import gzip
        import os
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            raw = os.path.join(tmp, "trace.json")
            prof.export_chrome_trace(raw)
            with open(raw, "rb") as f:
                body = f.read()
        with gzip.open(trace, "wb") as f:
            f.write(body)
        report["gpu_gaps"] = gpu_gaps(json.loads(body)["traceEvents"])
        print(json.dumps(report["gpu_gaps"], indent=1))
    with open(out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("output")
    parser.add_argument("--trace", default=None, help="also write the profiled step's chrome trace here (gzip)")
    parser.add_argument("--mixed", action="store_true", help="each step also decodes 28 requests prefilled before it")
    args = parser.parse_args()
    main(args.output, args.trace, args.mixed)
