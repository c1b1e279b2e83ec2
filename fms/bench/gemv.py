"""Batch-1 (or --rows 2) GEMV timing on the GPU: cuBLAS (F.linear) against fms.triton.gemv's Triton kernel.

For each weight shape of a model (Llama-3.2-1B by default), 16 distinct weights (one per layer,
so that L2 holds none of them) are multiplied by --rows rows in a CUDA graph of 16 launches, the way
a graphed decode step runs them; the graph is replayed and timed with CUDA events. The Triton
kernel is swept over block sizes; the best configuration per shape is reported beside cuBLAS.
The SwiGLU down projection is also timed fused (silu(gate) * up computed in the GEMV) against a
compiled silu-mul kernel followed by cuBLAS.

    fms bench gemv --results_dir final_project/results/session5       # or python scripts/bench_gemv.py ...
    fms bench gemv --rows 2 --configs tuned   # batch-2 decode, the engine's default config only
    fms bench gemv --rows 1 --write_table fms/resources/gemv/NVIDIA_H200.json   # this GPU's shipped table
    fms bench gemv --rows 2 --model llama:3.1-8b --write_table $FMS_GEMV_TABLE_DIR   # your own, another model

Shapes: Llama-3.2-1B's by default, --model ARCHITECTURE:VARIANT for a registered model's (its hidden, intermediate,
fused q/k/v rows and vocabulary), or --hidden/--intermediate/--qkv/--vocab.

--configs tuned times what the engine runs (this GPU's table where it lists the shape, else BLOCKS).
--write_table merges the fastest choice per shape (a kernel config, or cuBLAS) into a GEMV table
(fms/resources/gemv/README.md), which fms.triton.gemv reads on that GPU.
"""

import argparse
import itertools
import json
import os
import sys

import torch
import torch.nn.functional as F

from fms.bench.results import run_metadata
from fms.triton.gemv import BLOCKS, CUBLAS, MAX_ROWS, gemv, read_table, table_choice, table_path, write_table


def graph_time_us(fn, calls: int, replays: int) -> float:
    """Microseconds per call of fn(i) for i in range(calls), captured as one CUDA graph."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for i in range(calls):  # warm-up outside the graph: compiles, workspace allocation
            fn(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for i in range(calls):
            fn(i)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / (replays * calls)


def sweep(configs, k: int, time_us):
    """time_us(cfg) for every config whose BLOCK_K divides k -> (best cfg, its us, {str(cfg): us or why not})."""
    timings, best = {}, None
    for cfg in configs:
        if k % cfg[1]:
            continue
        try:
            t = time_us(cfg)
        except Exception as e:  # a config may not compile (registers, shared memory)
            timings[str(cfg)] = f"failed: {type(e).__name__}"
            continue
        timings[str(cfg)] = t
        if best is None or t < best[1]:
            best = (cfg, t)
    return best[0], best[1], timings


def model_shapes(spec: str) -> dict[str, int]:
    """--model ARCHITECTURE:VARIANT -> the projection sizes of that registered model (hidden, intermediate, qkv rows
    of the fused q|k|v weight, vocab); ValueError naming the spec and what is allowed."""
    from fms.models import get_config

    architecture, sep, variant = spec.partition(":")
    if not sep or not architecture or not variant:
        raise ValueError(f"--model must be ARCHITECTURE:VARIANT (for example llama:3.1-8b), got {spec!r}")
    c = get_config(architecture, variant)
    missing = [f for f in ("hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim")
               if getattr(c, f, None) is None]
    if missing:
        raise ValueError(f"--model {spec}: its config has no {', '.join(missing)} (a dense decoder's projections are "
                         f"timed here)")
    return {"hidden": c.hidden_size, "intermediate": c.intermediate_size,
            "qkv": (c.num_heads + 2 * c.num_kv_heads) * c.head_dim, "vocab": c.vocab_size}


def main(argv=None, prog=None):
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, metavar="ARCHITECTURE:VARIANT",
                   help="time this registered model's projection shapes (overrides the four size flags)")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=8192)
    p.add_argument("--qkv", type=int, default=3072, help="rows of the fused q/k/v weight")
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--replays", type=int, default=50)
    p.add_argument("--rows", type=int, default=1, help="input rows (1 to fms.triton.gemv.MAX_ROWS)")
    p.add_argument("--configs", choices=("sweep", "tuned"), default="sweep",
                   help="sweep block sizes, or time only the engine's default (fms.triton.gemv.BLOCKS)")
    p.add_argument("--results_dir", default=None)
    p.add_argument("--write_table", default=None, metavar="PATH",
                   help="merge the fastest choice per shape into this GEMV table file, or into FOLDER/<this GPU's "
                        "name>.json for a folder (fms/resources/gemv, or your FMS_GEMV_TABLE_DIR)")
    args = p.parse_args(argv)
    # what ran, for the results and the table's source: `fms bench gemv ...` or `python scripts/bench_gemv.py ...`
    command = " ".join([prog, *argv] if prog and argv is not None else ["python", *sys.argv])
    if args.model is not None:
        try:
            vars(args).update(model_shapes(args.model))
        except (ValueError, KeyError) as e:
            p.error(str(e.args[0] if e.args else e))
    if not 1 <= args.rows <= MAX_ROWS:  # more rows would time cuBLAS under the kernel's name (gemv hands them on)
        p.error(f"--rows must be in [1, {MAX_ROWS}] (the rows the GEMV kernel takes), got {args.rows}")
    if not torch.cuda.is_available():
        sys.exit("the GEMV benchmark times GPU kernels; no CUDA device here")
    dev, dt = torch.device("cuda"), torch.bfloat16
    h, i_ = args.hidden, args.intermediate
    shapes = {"qkv": (args.qkv, h), "o": (h, h), "gate_up": (2 * i_, h), "down": (h, i_), "lm_head": (args.vocab, h)}
    configs = list(itertools.product((1, 2, 4, 8, 16), (128, 256, 512, 1024), (2, 4, 8), (2,)))

    def engine_configs(n, k, silu_mul):  # what the engine runs for this shape: the table's kernel choice or BLOCKS
        choice = table_choice(torch.cuda.current_device(), args.rows, n, k, silu_mul)
        return [BLOCKS if choice == CUBLAS else choice]

    rows, full = [], {}
    for name, (n, k) in shapes.items():
        copies = 1 if name == "lm_head" else args.layers
        weights = [torch.randn(n, k, device=dev, dtype=dt) / k ** 0.5 for _ in range(copies)]
        x = torch.randn(args.rows, k, device=dev, dtype=dt)
        xx = torch.randn(args.rows, 2 * k, device=dev, dtype=dt)
        calls = args.layers
        nbytes = n * k * 2  # the weight: the rows' inputs and outputs are noise beside it
        ref = F.linear(x, weights[0]).float()
        timings = {"cublas": graph_time_us(lambda j: F.linear(x, weights[j % copies]), calls, args.replays)}
        best_cfg, best_us, full[name] = sweep(
            engine_configs(n, k, False) if args.configs == "tuned" else configs, k, lambda cfg: graph_time_us(lambda j: gemv(x, weights[j % copies], blocks=cfg), calls,
                                                  args.replays))
        err = (gemv(x, weights[0], blocks=best_cfg).float() - ref).abs().max().item()
        row = {"shape": name, "rows": args.rows, "n": n, "k": k, "cublas_us": timings["cublas"],
               "cublas_tb_s": nbytes / timings["cublas"] / 1e6, "triton_best_cfg": best_cfg,
               "triton_us": best_us, "triton_tb_s": nbytes / best_us / 1e6, "triton_max_abs_err": err}
        if name == "down":
            silu_mul = torch.compile(lambda t: F.silu(t[:, :k]) * t[:, k:])
            row["silu_mul_then_cublas_us"] = graph_time_us(lambda j: F.linear(silu_mul(xx), weights[j]), calls,
                                                           args.replays)
            row["fused_silu_mul_cfg"], row["fused_silu_mul_us"], _ = sweep(
                engine_configs(n, k, True) if args.configs == "tuned" else configs, k, lambda cfg: graph_time_us(lambda j: gemv(xx, weights[j], silu_mul=True, blocks=cfg),
                                                      calls, args.replays))
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{'shape':>8} {'N':>7} {'K':>5} {'cuBLAS us':>10} {'TB/s':>5} {'Triton us':>10} {'TB/s':>5}  best cfg")
    for r in rows:
        print(f"{r['shape']:>8} {r['n']:>7} {r['k']:>5} {r['cublas_us']:>10.2f} {r['cublas_tb_s']:>5.2f} "
              f"{r['triton_us']:>10.2f} {r['triton_tb_s']:>5.2f}  {r['triton_best_cfg']}")
    down = next(r for r in rows if r["shape"] == "down")
    print(f"down with SwiGLU: silu-mul kernel + cuBLAS {down['silu_mul_then_cublas_us']:.2f} us, "
          f"fused Triton {down['fused_silu_mul_us']:.2f} us {down['fused_silu_mul_cfg']}")
    if args.results_dir:
        os.makedirs(args.results_dir, exist_ok=True)
        out = {"metadata": run_metadata(command, dev), "rows": rows, "sweep_us": full}
        with open(os.path.join(args.results_dir, "bench_gemv.json" if args.rows == 1
                                                   else f"bench_gemv_rows{args.rows}.json"), "w") as f:
            json.dump(out, f, indent=1)
    if args.write_table:
        name = torch.cuda.get_device_name(dev)
        path = args.write_table
        if os.path.isdir(path):
            path = table_path(name, path)
        entries = merge_entries(path, table_entries(rows))
        write_table(path, name, entries, run_metadata(command, dev))
        print(f"wrote {len(entries)} entries to {path}")


def table_entries(rows: list[dict]) -> list[dict]:
    """The fastest choice per timed shape: the best kernel config, or cuBLAS where F.linear was faster."""
    entries = []
    for r in rows:
        timed = [(r["triton_us"], list(r["triton_best_cfg"]), False), (r["cublas_us"], CUBLAS, False)]
        if "fused_silu_mul_us" in r:
            timed += [(r["fused_silu_mul_us"], list(r["fused_silu_mul_cfg"]), True),
                      (r["silu_mul_then_cublas_us"], CUBLAS, True)]
        for silu_mul in sorted({t[2] for t in timed}):
            us, choice, _ = min(t for t in timed if t[2] == silu_mul)
            others = {("cublas_us" if c == CUBLAS else "triton_us"): u for u, c, s in timed if s == silu_mul}
            entries.append({"rows": r["rows"], "n": r["n"], "k": r["k"], "silu_mul": silu_mul, "choice": choice,
                            "us": us, **others})
    return entries


def merge_entries(path, new: list[dict]) -> list[dict]:
    """new, plus the entries of the table at path (if any) for other (rows, n, k, silu_mul)."""
    key = lambda e: (e["rows"], e["n"], e["k"], e["silu_mul"])  # noqa: E731
    old = []
    if os.path.isfile(path):
        read_table(path)  # refuse to merge into a malformed table
        with open(path) as f:
            old = json.load(f)["entries"]
    keys = {key(e) for e in new}
    return sorted([e for e in old if key(e) not in keys] + new, key=key)


if __name__ == "__main__":
    main()
