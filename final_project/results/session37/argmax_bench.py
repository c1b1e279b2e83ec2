"""The decode step's greedy argmax on the GPU: torch's column-split version (fms.runtime.sampler.argmax_rows, compiled
as the engine's step compiles it) against the Triton kernel (fms.triton.argmax), per batch size, inside CUDA graphs.

    python final_project/results/session37/argmax_bench.py OUT.json [--vocab 128256] [--batches 1,2,32,128,256]

Each variant is captured as a CUDA graph of 50 calls and replayed 20 times; the time per call is the median replay
over 50. Bytes read: B x V x 2 (bf16 logits). Also checks the two give the same indices.
"""
import argparse
import json
import sys

import torch

from fms.runtime import sampler
from fms.triton.argmax import argmax_rows_triton, num_parts
from fms.triton.support import sm_count


def per_call_us(fn, x, calls=50, replays=20):
    for _ in range(3):
        fn(x)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn(x)
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000 / calls)
    return sorted(times)[len(times) // 2]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--batches", default="1,2,32,128,256")
    args = p.parse_args()
    assert not sampler.argmax_kernel.KERNEL_ON, "run with FMS_ARGMAX_KERNEL unset: the torch side must be torch's"
    torch_split = torch.compile(sampler.argmax_rows, dynamic=False)
    rows = []
    for b in map(int, args.batches.split(",")):
        x = torch.randn(b, args.vocab, device="cuda", dtype=torch.bfloat16)
        x[:, 7] = x.max() + 1  # a tie across the row: the first wins
        x[:, args.vocab - 3] = x[:, 7]
        got = argmax_rows_triton(x)
        same = bool(torch.equal(got, torch_split(x)) and torch.equal(got, x.argmax(-1)))
        bytes_read = b * args.vocab * 2
        row = {"batch": b, "vocab": args.vocab, "parts": num_parts(b, args.vocab, sm_count(x.device)), "same": same}
        for name, fn in (("torch_split_compiled", torch_split), ("triton", argmax_rows_triton)):
            us = per_call_us(fn, x)
            row[name + "_us"] = us
            row[name + "_tb_s"] = bytes_read / us / 1e6
        rows.append(row)
        print(f"batch {b:4d}: torch {row['torch_split_compiled_us']:7.2f} us ({row['torch_split_compiled_tb_s']:.2f} "
              f"TB/s), triton {row['triton_us']:7.2f} us ({row['triton_tb_s']:.2f} TB/s), parts {row['parts']}, "
              f"same {same}")
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "command": " ".join(sys.argv),
           "rows": rows}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
