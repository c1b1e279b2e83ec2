"""GPU time of the greedy sampler's argmax over (B, 128256) logits, compiled as the engine compiles it (dynamic batch),
per column split: fms.runtime.sampler.argmax_rows(x, parts). Each is a CUDA graph of 20 calls over distinct logits
(more bytes than L2 holds at B >= 32), median of 7 replays; checked equal to x.argmax(-1).

    python argmax_probe.py OUT.json
"""
import json
import statistics
import sys

import torch

from fms.runtime.sampler import argmax_rows

V, CALLS = 128256, 20


def main(out):
    torch._dynamo.config.recompile_limit = 64
    result = {"device": torch.cuda.get_device_name(), "vocab": V, "calls_per_graph": CALLS, "rows": []}
    for parts in (1, 8, 16, 32, 64):
        fn = torch.compile(lambda x, p=parts: argmax_rows(x, p), dynamic=True)
        for b in (2, 8, 32, 128):
            xs = [torch.randn(b, V, device="cuda", dtype=torch.bfloat16) for _ in range(CALLS)]
            outs = [fn(x) for x in xs]
            assert all(torch.equal(o, x.argmax(-1)) for o, x in zip(outs, xs))
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for i, x in enumerate(xs):
                    outs[i] = fn(x)
            times = []
            for _ in range(8):
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record(); g.replay(); e.record(); torch.cuda.synchronize()
                times.append(s.elapsed_time(e) * 1e3 / CALLS)
            us = statistics.median(times[1:])
            row = {"parts": parts, "batch": b, "us": us, "gb_per_s": 2 * b * V / us / 1e3}
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
            with open(out, "w") as f:
                json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
