"""GPU time of the decode step's projections at few-to-many rows, per BLAS path: which one reads the weight fastest.

Usage: python gemm_probe.py OUT.json [--rows 8,32,64,128,256] [--models 1b,8b]

For each projection shape of Llama-3.2-1B / Llama-3.1-8B (bf16, y = x @ W.T) and each row count, the kernel time of
  cublas      F.linear as the engine calls it (torch's default BLAS path)
  cublaslt    the same after torch.backends.cuda.preferred_blas_library("cublaslt")
Each is timed as a CUDA graph of 20 calls over distinct weight copies (more bytes than the L2 holds, so every call
reads its weight from HBM), median of 7 replays. The bandwidth is (weight + input + output bytes) / time, and the
fraction is of the device's copy bandwidth measured here (a 1 GiB device-to-device copy).
"""

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

SHAPES = {  # name: (out_features N, in_features K)
    "1b": {"qkv": (3072, 2048), "o": (2048, 2048), "gate_up": (16384, 2048), "down": (2048, 8192),
           "lm_head": (128256, 2048)},
    "8b": {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)},
}
CALLS = 20


def copy_bandwidth():
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    times = []
    for _ in range(6):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); b.copy_(a); e.record(); torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return 2 * a.numel() / statistics.median(times[1:])


def time_graph(fn, weights, x):
    outs = [fn(x, w) for w in weights]  # warm outside the graph
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i, w in enumerate(weights):
            outs[i] = fn(x, w)
    times = []
    for _ in range(8):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); graph.replay(); e.record(); torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1e3 / len(weights))
    return statistics.median(times[1:])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("output")
    p.add_argument("--rows", default="8,32,64,128,256")
    p.add_argument("--models", default="1b,8b")
    args = p.parse_args()
    torch.manual_seed(0)
    bw = copy_bandwidth()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "copy_bandwidth_bytes_per_s": bw, "calls_per_graph": CALLS, "command": " ".join(sys.argv), "rows": []}
    print(f"{result['device']}: copy {bw / 1e12:.2f} TB/s", flush=True)
    for model in args.models.split(","):
        for name, (n, k) in SHAPES[model].items():
            copies = max(2, min(CALLS, -(-400_000_000 // (n * k * 2))))
            weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
            weights = (weights * CALLS)[:CALLS] if copies < CALLS else weights
            for m in [int(r) for r in args.rows.split(",")]:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                nbytes = 2 * (n * k + m * k + m * n)
                row = {"model": model, "proj": name, "N": n, "K": k, "M": m, "bytes": nbytes}
                paths = [("cublas", "cublas", F.linear), ("cublaslt", "cublaslt", F.linear)]
                ref = F.linear(x, weights[0]).float()
                for label, blas, fn in paths:
                    torch.backends.cuda.preferred_blas_library(blas)
                    t0 = time.perf_counter()
                    try:
                        sec = time_graph(fn, weights, x)
                        err = (fn(x, weights[0]).float() - ref).abs().max().item()
                    except Exception as exc:  # a path that cannot run here is recorded, not fatal
                        row[label] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
                        continue
                    row[label] = {"us": sec * 1e6, "gb_per_s": nbytes / sec / 1e9, "frac_copy_bw": nbytes / sec / bw,
                                  "max_abs_diff_vs_cublas": err, "setup_s": time.perf_counter() - t0}
                torch.backends.cuda.preferred_blas_library("cublas")
                result["rows"].append(row)
                line = " ".join(f"{lbl} {row[lbl]['us']:.1f}us {row[lbl]['frac_copy_bw']:.0%}"
                                for lbl in ("cublas", "cublaslt") if lbl in row and "us" in row[lbl])
                print(f"{model} {name:8s} M={m:4d} {line}", flush=True)
                with open(args.output, "w") as f:
                    json.dump(result, f, indent=1)
            del weights
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
