"""Decode projection timing on the GPU: cuBLAS (F.linear) against fms.triton.gemv's Triton GEMV kernel (1 or 2 rows)
and fms.triton.splitk's split-K kernel (the engine's larger batch buckets, up to 256 rows).

For each weight shape of a model (Llama-3.2-1B by default), 16 distinct weights (one per layer,
so that L2 holds none of them) are multiplied by --rows rows in a CUDA graph of 16 launches, the way
a graphed decode step runs them; the graph is replayed and timed with CUDA events. The Triton
kernel is swept over block sizes; the best configuration per shape is reported beside cuBLAS.
The SwiGLU down projection is also timed fused (silu(gate) * up computed in the kernel) against the
engine's silu-mul kernel followed by cuBLAS.

    fms bench gemv --results_dir final_project/results/session5       # or python scripts/bench_gemv.py ...
    fms bench gemv --rows 2 --configs tuned   # batch-2 decode, the engine's default config only
    fms bench gemv --rows 1 --write_table fms/resources/gemv/NVIDIA_H200.json   # this GPU's shipped table
    fms bench gemv --rows 2 --model llama:3.1-8b --write_table $FMS_GEMV_TABLE_DIR   # your own, another model
    fms bench gemv --rows 4,8,16,32,64,128,256 --write_table fms/resources/gemv   # the batch buckets' split-K table

Shapes: Llama-3.2-1B's by default, --model ARCHITECTURE:VARIANT for a registered model's (its hidden, intermediate,
fused q/k/v rows and vocabulary), or --hidden/--intermediate/--qkv/--vocab.

--configs tuned times what the engine runs (this GPU's table where it lists the shape, else BLOCKS; above two rows,
cuBLAS where the table lists no split-K config).
--write_table merges the fastest choice per shape (a kernel config, or cuBLAS) into a GEMV table
(fms/resources/gemv/README.md), which fms.triton.gemv reads on that GPU.
"""

import argparse
import ast
import itertools
import json
import os
import sys

import torch
import torch.nn.functional as F

from fms.bench.results import run_metadata
from fms.triton.gemv import (BLOCKS, CUBLAS, MAX_ROWS, gemv, gemv_reference, read_table, silu_mul_rows, table_choice,
                             table_path, write_table)
from fms.triton.splitk import MAX_DOT_ROWS, candidate_configs, splitk_linear


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


def sweep(configs, k: int, time_us, dot: bool = False):
    """time_us(cfg) for every config whose BLOCK_K (times SPLIT_K for the split-K kernel's, dot) divides k
    -> (best cfg, its us, {str(cfg): us or why not}); (None, None, {}) when none is timed."""
    timings, best = {}, (None, None)
    for cfg in configs:
        if k % (cfg[1] * cfg[2] if dot else cfg[1]):
            continue
        try:
            t = time_us(cfg)
        except Exception as e:  # a config may not compile (registers, shared memory)
            timings[str(cfg)] = f"failed: {type(e).__name__}: {str(e)[:100]}"
            continue
        timings[str(cfg)] = t
        if best[0] is None or t < best[1]:
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


def projection_shapes(hidden: int, intermediate: int, qkv: int, vocab: int) -> dict[str, tuple[int, int]]:
    """A dense decoder's decode projections, name -> (N, K) of the weight: the fused q|k|v, o, the fused gate|up, the
    down projection (fused with SwiGLU: K is the intermediate size) and the LM head."""
    return {"qkv": (qkv, hidden), "o": (hidden, hidden), "gate_up": (2 * intermediate, hidden),
            "down": (hidden, intermediate), "lm_head": (vocab, hidden)}


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
    p.add_argument("--rows", default="1",
                   help="input rows, or a comma-separated list (1 to fms.triton.gemv.MAX_ROWS: the GEMV kernel; up to "
                        "fms.triton.splitk.MAX_DOT_ROWS: the split-K kernel, for the engine's larger batch buckets)")
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
    try:
        row_counts = [int(r) for r in str(args.rows).split(",")]
    except ValueError:
        p.error(f"--rows must be a row count or a comma-separated list of them, got {args.rows!r}")
    bad = [r for r in row_counts if not 1 <= r <= MAX_DOT_ROWS]
    if bad:  # more rows would time cuBLAS under a kernel's name (gemv hands them on)
        p.error(f"--rows must be in [1, {MAX_DOT_ROWS}] (1 to {MAX_ROWS}: the GEMV kernel; more: the split-K "
                f"kernel), got {bad[0]}")
    if not torch.cuda.is_available():
        sys.exit("the GEMV benchmark times GPU kernels; no CUDA device here")
    dev = torch.device("cuda")
    shapes = projection_shapes(args.hidden, args.intermediate, args.qkv, args.vocab)
    rows, full = [], {}
    for count in row_counts:
        got_rows, got_full = time_shapes(args, shapes, count, dev)
        rows += got_rows
        full.update({f"{name}@{count}": sweep_us for name, sweep_us in got_full.items()})
    print(f"\n{'rows':>4} {'shape':>8} {'N':>7} {'K':>5} {'cuBLAS us':>10} {'TB/s':>5} {'Triton us':>10} {'TB/s':>5}  "
          f"best cfg")
    for r in rows:
        print(f"{r['rows']:>4} {r['shape']:>8} {r['n']:>7} {r['k']:>5} {r['cublas_us']:>10.2f} {r['cublas_tb_s']:>5.2f} "
              f"{r['triton_us']:>10.2f} {r['triton_tb_s']:>5.2f}  {r['triton_best_cfg']}")
    for down in (r for r in rows if r["shape"] == "down"):
        print(f"down with SwiGLU at {down['rows']} rows: silu-mul kernel + cuBLAS {down['silu_mul_then_cublas_us']:.2f} "
              f"us, fused Triton {down['fused_silu_mul_us']:.2f} us {down['fused_silu_mul_cfg']}")
    if args.results_dir:
        os.makedirs(args.results_dir, exist_ok=True)
        out = {"metadata": run_metadata(command, dev), "rows": rows, "sweep_us": full}
        label = "" if row_counts == [1] else "_rows" + "_".join(map(str, row_counts))
        with open(os.path.join(args.results_dir, f"bench_gemv{label}.json"), "w") as f:
            json.dump(out, f, indent=1)
    if args.write_table:
        name = torch.cuda.get_device_name(dev)
        path = args.write_table
        if os.path.isdir(path):
            path = table_path(name, path)
        entries = merge_entries(path, table_entries(rows))
        write_table(path, name, entries, run_metadata(command, dev))
        print(f"wrote {len(entries)} entries to {path}")


GEMV_CONFIGS = list(itertools.product((1, 2, 4, 8, 16), (128, 256, 512, 1024), (2, 4, 8), (2,)))


def time_shapes(args, shapes: dict, count: int, dev) -> tuple[list[dict], dict]:
    """Time every shape at `count` input rows: cuBLAS against the GEMV kernel's configs (count <= MAX_ROWS) or the
    split-K kernel's (more), each also with the SwiGLU down projection fused. -> (result rows, {shape: sweep})."""
    dt = torch.bfloat16
    dot = count > MAX_ROWS
    sms = torch.cuda.get_device_properties(dev).multi_processor_count

    def configs_for(n, k, silu_mul):
        if args.configs == "tuned":  # what the engine runs: the table's choice (BLOCKS, or cuBLAS above MAX_ROWS)
            choice = table_choice(torch.cuda.current_device(), count, n, k, silu_mul)
            return [] if dot and choice == CUBLAS else [BLOCKS if choice == CUBLAS else choice]
        return candidate_configs(count, n, k, sms) if dot else GEMV_CONFIGS

    def kernel(x, w, silu_mul, cfg):
        return splitk_linear(x, w, None, silu_mul, cfg) if dot else gemv(x, w, silu_mul=silu_mul, blocks=cfg)

    def best_of(n, k, silu_mul, time_us):
        got = sweep(configs_for(n, k, silu_mul), k, time_us, dot)
        if dot and args.configs == "sweep" and got[0] is not None:  # the three best again with 8 warps, or 4 stages
            timed = sorted((t, c) for c, t in got[2].items() if isinstance(t, float))[:3]
            more = [(*ast.literal_eval(c)[:3], w, st) for _, c in timed for w, st in ((8, 3), (4, 4))]
            extra = sweep([c for c in more if str(c) not in got[2]], k, time_us, dot)
            got[2].update(extra[2])
            if extra[0] is not None and extra[1] < got[1]:
                got = (extra[0], extra[1], got[2])
        return got

    def checked_time_us(inputs, weights, silu_mul, expected):
        """time_us(cfg) over the layers' weights; a config that computes a wrong product (against expected, the
        first weight's) is a failed config, never the table's choice."""
        def time_us(cfg):
            got = kernel(inputs, weights[0], silu_mul, cfg).float()
            err = (got - expected).abs().max().item() / expected.abs().max().item()
            if not err <= 1e-2:
                raise ValueError(f"wrong result: relative error {err:.3g}")
            return graph_time_us(lambda j: kernel(inputs, weights[j % len(weights)], silu_mul, cfg), args.layers,
                                 args.replays)
        return time_us

    rows, full = [], {}
    for name, (n, k) in shapes.items():
        copies = 1 if name == "lm_head" else args.layers
        weights = [torch.randn(n, k, device=dev, dtype=dt) / k ** 0.5 for _ in range(copies)]
        x = torch.randn(count, k, device=dev, dtype=dt)
        xx = torch.randn(count, 2 * k, device=dev, dtype=dt)
        calls = args.layers
        nbytes = n * k * 2  # the weight: the rows' inputs and outputs are noise beside it
        ref = F.linear(x, weights[0]).float()
        cublas_us = graph_time_us(lambda j: F.linear(x, weights[j % copies]), calls, args.replays)
        best_cfg, best_us, full[name] = best_of(n, k, False, checked_time_us(x, weights, False, ref))
        if best_cfg is None:  # tuned, and the engine runs cuBLAS here
            best_cfg, best_us = CUBLAS, cublas_us
        err = (F.linear(x, weights[0]) if best_cfg == CUBLAS else kernel(x, weights[0], False, best_cfg)).float()
        row = {"shape": name, "rows": count, "n": n, "k": k, "cublas_us": cublas_us,
               "cublas_tb_s": nbytes / cublas_us / 1e6, "triton_best_cfg": best_cfg,
               "triton_us": best_us, "triton_tb_s": nbytes / best_us / 1e6,
               "triton_max_abs_err": (err - ref).abs().max().item()}
        if name == "down":  # the engine's unfused path: the SwiGLU kernel, then cuBLAS
            row["silu_mul_then_cublas_us"] = graph_time_us(lambda j: F.linear(silu_mul_rows(xx), weights[j]), calls,
                                                           args.replays)
            expected = gemv_reference(xx, weights[0], silu_mul=True).float()
            cfg, us, _ = best_of(n, k, True, checked_time_us(xx, weights, True, expected))
            row["fused_silu_mul_cfg"], row["fused_silu_mul_us"] = (cfg, us) if cfg is not None \
                else (CUBLAS, row["silu_mul_then_cublas_us"])
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows, full


def _as_choice(cfg):
    """A results row's config as a table choice (CUBLAS stays: --configs tuned where the engine runs cuBLAS)."""
    return CUBLAS if cfg == CUBLAS else list(cfg)


def table_entries(rows: list[dict]) -> list[dict]:
    """The fastest choice per timed shape: the best kernel config, or cuBLAS where F.linear was faster."""
    entries = []
    for r in rows:
        timed = [(r["triton_us"], _as_choice(r["triton_best_cfg"]), False), (r["cublas_us"], CUBLAS, False)]
        if "fused_silu_mul_us" in r:
            timed += [(r["fused_silu_mul_us"], _as_choice(r["fused_silu_mul_cfg"]), True),
                      (r["silu_mul_then_cublas_us"], CUBLAS, True)]
        for silu_mul in sorted({t[2] for t in timed}):
            us, choice, _ = min((t for t in timed if t[2] == silu_mul), key=lambda t: t[0])
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
