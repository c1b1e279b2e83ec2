"""Why does a small prefill step cost as much as a full one? Issue 18's server runs start with a 185-505 token step
that took 36-65 ms while a full 8,192-token step takes ~40 ms (session 25's step traces). This builds the engine
as the benchmark does (fms serve's flags, random weights) and times single prefill steps of 1, 4 and 28 prompts
(host wall time, the engine's phase timers, and CUDA time between events around the step), then profiles one
small step with torch.profiler (top host ops by self CPU time).

    python final_project/results/session25/prefill_probe.py OUT.json
"""
import json
import random
import sys
import time

import torch


def build_served_engine():
    """(engine, cuda, variant): the engine as `fms serve` builds it, Llama-3.2-1B shape with random weights on CUDA,
    llama `micro` uncompiled on the CPU (a check of the script only). Session 27's prefill_ab.py uses it too."""
    from fms.entrypoints.cli import serve_parser
    from fms.entrypoints.engine_args import build_engine
    from fms.entrypoints.server_vs_offline import _placeholder_tokenizer

    cuda = torch.cuda.is_available()
    variant = "3.2-1b" if cuda else "micro"
    flags = ["--architecture", "llama", "--variant", variant, "--seed", "0",
             "--tokenizer", _placeholder_tokenizer("llama", variant)]
    if not cuda:
        flags += ["--device", "cpu", "--no-compile"]
    engine, _ = build_engine(serve_parser().parse_args(flags))
    return engine, cuda, variant


def main(out: str) -> None:
    from fms.serving import SamplingParams

    engine, cuda, variant = build_served_engine()
    vocab = engine.model.config.vocab_size
    rng = random.Random(0)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    report = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "variant": variant, "steps": []}

    def one_step(lengths, label):
        ids = [engine.add_request([rng.randrange(4, vocab) for _ in range(n)], SamplingParams(max_tokens=2,
                                                                                               ignore_eos=True))
               for n in lengths]
        sync()
        before = dict(engine.time_s)
        start_event = torch.cuda.Event(enable_timing=True) if cuda else None
        end_event = torch.cuda.Event(enable_timing=True) if cuda else None
        if cuda:
            start_event.record()
        t0 = time.perf_counter()
        engine.step()
        t1 = time.perf_counter()
        if cuda:
            end_event.record()
        sync()
        t2 = time.perf_counter()
        row = {"label": label, "num_prompts": len(lengths), "tokens": sum(lengths), "step_wall_ms": 1e3 * (t1 - t0),
               "to_idle_ms": 1e3 * (t2 - t0),
               "gpu_ms": start_event.elapsed_time(end_event) if cuda else None,
               "phases_ms": {k: 1e3 * (engine.time_s[k] - before[k]) for k in before}}
        for rid in ids:
            engine.abort(rid)
            engine.pop_output(rid)
        report["steps"].append(row)
        print(json.dumps(row), flush=True)

    shapes = {"small_1": [185], "small_4": [120, 130, 140, 150], "full_28": [292] * 28}
    for repeat in range(3):
        for label, lengths in shapes.items():
            time.sleep(0.3 if repeat == 2 else 0.0)  # the last round after an idle pause, as the server's first step
            one_step(lengths, label)
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        one_step([185], "profiled_small_1")
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    print(table)
    report["profile_small_1_top_self_cpu"] = table
    if cuda:
        report["profile_small_1_cuda_table"] = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15)
        print(report["profile_small_1_cuda_table"])
    with open(out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
