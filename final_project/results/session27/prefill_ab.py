"""One prefill step's wall time by size, repeated: the A/B for a compiled prefill that traces F.linear instead of the
op fms::gemv (session 27). Builds the engine as `fms serve` does (Llama-3.2-1B shape on CUDA, random weights; llama
`micro` uncompiled on the CPU, a check of the script only) and runs ROUNDS rounds of single prefill steps of
1 prompt (185 tokens), 4 prompts (540), 8 prompts (2,000) and 28 prompts (8,176), the sizes interleaved; each step
is timed from engine.step() until the GPU is idle, with CUDA events around it. Medians per size, and one small
step under torch.profiler (top host ops by self CPU time, and the count of fms::gemv calls).

    python final_project/results/session27/prefill_ab.py OUT.json [ROUNDS]
"""
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "session25"))
from prefill_probe import build_served_engine  # noqa: E402


def main(out: str, rounds: int) -> None:
    from fms.serving import SamplingParams

    start = time.perf_counter()
    engine, cuda, variant = build_served_engine()
    report = {"command": " ".join(["python", *sys.argv]), "device": torch.cuda.get_device_name(0) if cuda else "cpu",
              "variant": variant, "engine_build_s": time.perf_counter() - start, "rounds": rounds, "steps": []}
    vocab = engine.model.config.vocab_size
    rng = random.Random(0)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def one_step(lengths, label):
        ids = [engine.add_request([rng.randrange(4, vocab) for _ in range(n)],
                                  SamplingParams(max_tokens=2, ignore_eos=True)) for n in lengths]
        sync()
        events = [torch.cuda.Event(enable_timing=True) for _ in range(2)] if cuda else None
        if cuda:
            events[0].record()
        t0 = time.perf_counter()
        engine.step()
        t1 = time.perf_counter()
        if cuda:
            events[1].record()
        sync()
        t2 = time.perf_counter()
        row = {"label": label, "num_prompts": len(lengths), "tokens": sum(lengths), "host_ms": 1e3 * (t1 - t0),
               "to_idle_ms": 1e3 * (t2 - t0), "gpu_span_ms": events[0].elapsed_time(events[1]) if cuda else None}
        for rid in ids:
            engine.abort(rid)
            engine.pop_output(rid)
        report["steps"].append(row)
        return row

    shapes = {"p1_185": [185], "p4_540": [120, 130, 140, 150], "p8_2000": [250] * 8, "p28_8176": [292] * 28}
    for label, lengths in shapes.items():  # warm-up: every size once, untimed
        one_step(lengths, "warmup_" + label)
    for _ in range(rounds):
        for label, lengths in shapes.items():
            one_step(lengths, label)
    report["median_to_idle_ms"] = {label: statistics.median(r["to_idle_ms"] for r in report["steps"]
                                                            if r["label"] == label) for label in shapes}
    report["median_host_ms"] = {label: statistics.median(r["host_ms"] for r in report["steps"]
                                                         if r["label"] == label) for label in shapes}
    print(json.dumps({k: report[k] for k in ("engine_build_s", "median_to_idle_ms", "median_host_ms")}), flush=True)
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        one_step(shapes["p1_185"], "profiled_p1_185")
    averages = prof.key_averages()
    report["profiled_gemv_op_calls"] = sum(e.count for e in averages if e.key == "fms::gemv")
    report["profiled_mm_calls"] = sum(e.count for e in averages if e.key == "aten::mm")
    report["profile_top_self_cpu"] = averages.table(sort_by="self_cpu_time_total", row_limit=25)
    print(report["profile_top_self_cpu"])
    print("fms::gemv calls", report["profiled_gemv_op_calls"], "aten::mm calls", report["profiled_mm_calls"])
    with open(out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 10)
