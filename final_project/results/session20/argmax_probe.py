"""The greedy sampler's argmax over a 128k vocabulary, compiled as in the decode graph: fms.runtime.sampler.argmax_rows
splits each row into `parts` column blocks (64 by default); time other splits at batch 2 and 128 (CUDA graph replay of the
compiled function, inputs rotated past L2). Session 20, H100/H200.

    python final_project/results/session20/argmax_probe.py OUT_JSON
"""

import json
import sys

import torch
from triton.testing import do_bench

from fms.runtime.sampler import argmax_rows


def main(out_path):
    vocab, rows = 128256, []
    for dtype in (torch.bfloat16, torch.float32):
        for batch in (2, 128):
            sets = [torch.randn(batch, vocab, device="cuda", dtype=dtype) for _ in range(8 if batch == 128 else 64)]
            expected = [s.argmax(-1) for s in sets]
            for parts in (1, 4, 8, 16, 32, 64, 167, 501):
                if vocab % parts:
                    continue
                torch._dynamo.reset()
                fn = torch.compile(lambda x, p=parts: argmax_rows(x, p), dynamic=True)
                ok = all(torch.equal(fn(s), e) for s, e in zip(sets, expected))
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    for s in sets:
                        fn(s)
                us = 1e3 * do_bench(graph.replay, warmup=20, rep=200, return_mode="median") / len(sets)
                row = dict(dtype=str(dtype), batch=batch, parts=parts, us=us, correct=ok,
                           gbps=batch * vocab * sets[0].element_size() / us / 1e3)
                rows.append(row)
                print(row, flush=True)
    json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), open(out_path, "w"),
              indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
