"""Where a full prefill step's GPU time goes: the engine as `fms serve` builds it (Llama-3.2-1B shape, random weights),
one step of 28 prompts x 292 tokens (8,176 tokens, the serving workload's full step) warmed twice, then timed with
CUDA events three times and profiled once (torch.profiler, kernels by device time).

    python prefill_profile.py OUT.json
"""
import json
import random
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 2)[0] + "/session25")
from prefill_probe import build_served_engine  # noqa: E402


def main(out):
    from torch.profiler import ProfilerActivity, profile

    from fms.serving import SamplingParams

    engine, cuda, variant = build_served_engine()
    vocab = engine.model.config.vocab_size
    rng = random.Random(0)
    report = {"device": torch.cuda.get_device_name(0), "variant": variant, "prompts": 28, "tokens_each": 292,
              "steps": []}

    def one_step():
        ids = [engine.add_request([rng.randrange(4, vocab) for _ in range(292)],
                                  SamplingParams(max_tokens=2, ignore_eos=True)) for _ in range(28)]
        torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); t0 = time.perf_counter()
        engine.step()
        t1 = time.perf_counter(); e.record(); torch.cuda.synchronize()
        row = {"step_wall_ms": 1e3 * (t1 - t0), "gpu_ms": s.elapsed_time(e)}
        for rid in ids:
            engine.abort(rid)
            engine.pop_output(rid)
        return row

    for i in range(5):
        row = one_step()
        row["warm"] = i < 2
        report["steps"].append(row)
        print(json.dumps(row), flush=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        one_step()
    kernels = [{"name": k.key[:160], "count": k.count, "device_us": k.self_device_time_total}
               for k in prof.key_averages() if k.self_device_time_total > 0]
    kernels.sort(key=lambda k: -k["device_us"])
    report["kernels"] = kernels[:40]
    report["kernel_total_us"] = sum(k["device_us"] for k in kernels)
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30))
    with open(out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
