"""Decode projections at 8-128 rows: cuBLAS (F.linear, what the engine runs above two rows) against a split-K
Triton tl.dot kernel swept over its blocks, and optionally inductor's max-autotune choice.

Usage: python skinny_probe.py OUT.json [--rows 32,128] [--autotune] [--budget_s 300]

Session 20's profile (H100, batch 128): the decode GEMMs read their weights at 37-77% of bandwidth (o 37%, qkv 46%,
down 54% with cuBLAS's split-K and a separate reduce, gate_up 69%, LM head 77%). This probe asks whether a kernel
that splits K across programs (so a 2048-wide output still fills the GPU) reads them faster. Timing as
fms.bench.gemv: 16 distinct weights (one per layer; more bytes than the L2 holds) in one CUDA graph, replayed.
Results go to OUT.json after every shape, so a call cut short keeps what it finished.
"""

import argparse
import itertools
import json
import sys
import time

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, ".")
from fms.bench.gemv import graph_time_us  # noqa: E402

SHAPES = {"qkv": (3072, 2048), "o": (2048, 2048), "gate_up": (16384, 2048), "down": (2048, 8192),
          "lm_head": (128256, 2048)}


@triton.jit
def _partial_kernel(x_ptr, w_ptr, out_ptr, part_ptr, M, N, K, stride_x, stride_w,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    k_len = K // SPLIT_K
    k0 = pid_s * k_len
    x_ptrs = x_ptr + rm[:, None] * stride_x + (k0 + rk)[None, :]
    w_ptrs = w_ptr + rn[:, None].to(tl.int64) * stride_w + (k0 + rk)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(0, k_len, BLOCK_K):
        x = tl.load(x_ptrs, mask=rm[:, None] < M, other=0.0)
        w = tl.load(w_ptrs, mask=rn[:, None] < N, other=0.0, eviction_policy="evict_first")
        acc = tl.dot(x, tl.trans(w), acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    ok = (rm[:, None] < M) & (rn[None, :] < N)
    if SPLIT_K == 1:
        tl.store(out_ptr + rm[:, None] * N + rn[None, :], acc.to(out_ptr.dtype.element_ty), mask=ok)
    else:
        tl.store(part_ptr + pid_s * M * N + rm[:, None] * N + rn[None, :], acc, mask=ok)


@triton.jit
def _reduce_kernel(part_ptr, out_ptr, MN, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(SPLIT_K):  # a fixed order: the same sum on every run
        acc += tl.load(part_ptr + s * MN + i, mask=ok, other=0.0)
    tl.store(out_ptr + i, acc.to(out_ptr.dtype.element_ty), mask=ok)


def skinny_linear(x, w, cfg):
    block_n, block_k, split_k, warps, stages = cfg
    m, k = x.shape
    n = w.shape[0]
    if k % (split_k * block_k):
        raise ValueError(f"K={k} is not a multiple of split_k * block_k = {split_k * block_k}")
    block_m = max(16, triton.next_power_of_2(m))
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    part = torch.empty(split_k, m, n, device=x.device, dtype=torch.float32) if split_k > 1 else out
    _partial_kernel[(triton.cdiv(n, block_n), split_k)](x, w, out, part, m, n, k, x.stride(0), w.stride(0),
                                                         BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                                                         SPLIT_K=split_k, num_warps=warps, num_stages=stages)
    if split_k > 1:
        _reduce_kernel[(triton.cdiv(m * n, 1024),)](part, out, m * n, SPLIT_K=split_k, BLOCK=1024)
    return out


def candidate_configs(m, n, k, sms):
    block_m = max(16, triton.next_power_of_2(m))
    out = []
    for bn, bk, s in itertools.product((32, 64, 128), (64, 128, 256), (1, 2, 4, 8, 16)):
        if k % (s * bk) or 3 * (block_m + bn) * bk * 2 > 200_000:
            continue
        programs = -(-n // bn) * s
        if not sms // 2 <= programs <= 16 * sms:
            continue
        out.append((bn, bk, s, 4, 3))
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("output")
    p.add_argument("--rows", default="32,128")
    p.add_argument("--shapes", default="qkv,o,gate_up,down,lm_head")
    p.add_argument("--autotune", action="store_true", help="also time inductor's max-autotune F.linear at each shape")
    p.add_argument("--budget_s", type=float, default=300.0)
    p.add_argument("--replays", type=int, default=30)
    args = p.parse_args()
    start = time.time()
    torch.manual_seed(0)
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "command": " ".join(["python", *sys.argv]), "sms": sms, "rows": []}
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        copies = 1 if name == "lm_head" else 16
        weights = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) / k ** 0.5 for _ in range(copies)]
        for m in [int(r) for r in args.rows.split(",")]:
            if time.time() - start > args.budget_s:
                print("budget spent", flush=True)
                break
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            ref = F.linear(x, weights[0]).float()
            row = {"proj": name, "N": n, "K": k, "M": m, "weight_bytes": n * k * 2}
            row["cublas_us"] = graph_time_us(lambda j: F.linear(x, weights[j % copies]), 16, args.replays)
            timings = {}
            configs = candidate_configs(m, n, k, sms)

            def time_cfg(cfg):
                got = skinny_linear(x, weights[0], cfg).float()
                err = (got - ref).abs().max().item() / ref.abs().max().item()
                if err > 2e-2:
                    raise RuntimeError(f"wrong result: relative error {err:.3g}")
                return graph_time_us(lambda j: skinny_linear(x, weights[j % copies], cfg), 16, args.replays)

            for cfg in configs:
                try:
                    timings[str(cfg)] = time_cfg(cfg)
                except Exception as e:  # noqa: BLE001 - a config may not compile (shared memory, registers)
                    timings[str(cfg)] = f"failed: {type(e).__name__}: {str(e)[:120]}"
            ok = sorted((t, c) for c, t in timings.items() if isinstance(t, float))
            # the best three again with more warps or stages
            for _, c in ok[:3]:
                bn, bk, s, _w, _st = eval(c)
                for w, st in ((8, 3), (4, 4), (8, 4), (4, 2)):
                    cfg = (bn, bk, s, w, st)
                    if str(cfg) in timings:
                        continue
                    try:
                        timings[str(cfg)] = time_cfg(cfg)
                    except Exception as e:  # noqa: BLE001
                        timings[str(cfg)] = f"failed: {type(e).__name__}: {str(e)[:120]}"
            ok = sorted((t, c) for c, t in timings.items() if isinstance(t, float))
            row["triton_best"] = ok[0][1] if ok else None
            row["triton_us"] = ok[0][0] if ok else None
            row["triton_timings"] = timings
            if args.autotune and m == max(int(r) for r in args.rows.split(",")):
                try:
                    torch._dynamo.reset()
                    fn = torch.compile(F.linear, mode="max-autotune-no-cudagraphs", dynamic=False)
                    t0 = time.time()
                    fn(x, weights[0])
                    row["autotune_compile_s"] = time.time() - t0
                    row["autotune_us"] = graph_time_us(lambda j: fn(x, weights[j % copies]), 16, args.replays)
                except Exception as e:  # noqa: BLE001
                    row["autotune_us"] = f"failed: {type(e).__name__}: {str(e)[:200]}"
            result["rows"].append(row)
            print(f"{name} M={m}: cublas {row['cublas_us']:.2f} us, triton {row['triton_us']} us {row['triton_best']}"
                  f"{'' if 'autotune_us' not in row else ', autotune ' + str(row['autotune_us'])}", flush=True)
            with open(args.output, "w") as f:
                json.dump(result, f, indent=1)
    print(f"done in {time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
