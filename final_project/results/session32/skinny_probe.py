"""Decode projections at 8-128 rows: cuBLAS (F.linear, what the engine runs above two rows) against
fms.triton.splitk's split-K kernel swept over its blocks, and optionally inductor's max-autotune choice (what
`fms bench gemv --rows` does not time).

Usage: python skinny_probe.py OUT.json [--rows 32,128] [--autotune] [--budget_s 300]

Session 20's profile (H100, batch 128): the decode GEMMs read their weights at 37-77% of bandwidth (o 37%, qkv 46%,
down 54% with cuBLAS's split-K and a separate reduce, gate_up 69%, LM head 77%). This probe asks whether a kernel
that splits K across programs (so a 2048-wide output still fills the GPU) reads them faster. Timing as
fms.bench.gemv: 16 distinct weights (one per layer; more bytes than the L2 holds) in one CUDA graph, replayed.
Results go to OUT.json after every shape, so a call cut short keeps what it finished.
"""

import argparse
import ast
import json
import sys
import time

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, ".")
from fms.bench.gemv import graph_time_us  # noqa: E402
from fms.triton.splitk import candidate_configs, splitk_linear  # noqa: E402

SHAPES = {"qkv": (3072, 2048), "o": (2048, 2048), "gate_up": (16384, 2048), "down": (2048, 8192),
          "lm_head": (128256, 2048)}


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
                got = splitk_linear(x, weights[0], None, False, cfg).float()
                err = (got - ref).abs().max().item() / ref.abs().max().item()
                if err > 2e-2:
                    raise RuntimeError(f"wrong result: relative error {err:.3g}")
                return graph_time_us(lambda j: splitk_linear(x, weights[j % copies], None, False, cfg), 16, args.replays)

            for cfg in configs:
                try:
                    timings[str(cfg)] = time_cfg(cfg)
                except Exception as e:  # noqa: BLE001 - a config may not compile (shared memory, registers)
                    timings[str(cfg)] = f"failed: {type(e).__name__}: {str(e)[:120]}"
            ok = sorted((t, c) for c, t in timings.items() if isinstance(t, float))
            # the best three again with more warps or stages
            for _, c in ok[:3]:
                bn, bk, s, _w, _st = ast.literal_eval(c)
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
