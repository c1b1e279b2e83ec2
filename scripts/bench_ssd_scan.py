"""Mamba2 SSD prefill scan on the GPU: our Triton kernel (fms.triton.ssd_scan) swept over its block sizes,
against fla's chunk_simple_gla and the chunked PyTorch reference, at one mixer's shape (Granite-4.0-H-1B by
default: 48 heads x 64, state 128, one B/C group).

Inputs are those of profile_hybrid.py's mixer section (scan_inputs: randn x/B/C in the model dtype,
dt = softplus(randn), A = -logspace(-2, 0)). Each call is captured once in a CUDA graph and its replays are
timed with CUDA events (GPU time, no launch gaps); medians over --repeats. Every variant's output is checked
against the reference's (relative L2 error over y and the final state). Writes one JSON file.

    python scripts/bench_ssd_scan.py --batch_sizes 1,8 --context_lengths 4096,16384 --output final_project/results/x.json
"""

import argparse
import dataclasses
import itertools
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from fms.models import get_config
from fms.triton import ssd_scan
from fms.triton.support import cdiv, sm_count
from fms.modules.ssm import _fla_available, _ssd_scan_fla, ssd_scan_reference
from fms.utils.benchmarking import run_metadata
from scripts.profile_hybrid import Clock, _rel_err, scan_inputs, time_graph

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="4.0-h-1b", help="granite_hybrid variant whose Mamba shape is used")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--batch_sizes", type=_ints, default=[1, 8])
    p.add_argument("--context_lengths", type=_ints, default=[4096, 16384])
    p.add_argument("--block_t", type=_ints, default=[32, 64], help="kernel chunk lengths to sweep")
    p.add_argument("--block_p", type=_ints, default=[16, 32, 64], help="head_dim rows per program to sweep")
    p.add_argument("--num_segments", type=_ints, default=[1, 2, 4, 8], help="segments per row to sweep")
    p.add_argument("--num_warps", type=_ints, default=[4])
    p.add_argument("--defaults_only", action="store_true", help="time the default choice only (no sweep)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", required=True, help="JSON file to write")
    return p


def record(rows: list, where: dict, name: str, fn, ref, args, clock: Clock, **knobs):
    """Time one scan call replayed from a CUDA graph and append its row (or the error it raised); its output."""
    try:
        with torch.no_grad():
            out = fn()
            times = time_graph(fn, args, clock)
    except Exception as exc:  # noqa: BLE001 - a variant that does not compile is a result
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        rows.append({**where, "path": name, **knobs, "error": error})
        print(f"{where} {name} {knobs}: {error}", flush=True)
        return None
    row = {**where, "path": name, **knobs, "median_ms": statistics.median(times), "times_ms": times,
           "rel_err_vs_reference": None if ref is None else _rel_err(out, ref)}
    rows.append(row)
    print(f"{where} {name:9s} {knobs}: {row['median_ms']:.4f} ms err {row['rel_err_vs_reference']}", flush=True)
    return out


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_ssd_scan.py times CUDA kernels; no CUDA device here", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    clock = Clock(device)
    config = get_config("granite_hybrid", args.variant).mamba_config()
    dtype = DTYPES[args.dtype]
    variants = list(itertools.product(args.block_t, args.block_p, args.num_segments, args.num_warps))
    num_sms = sm_count(device)
    rows = []
    for batch, context in itertools.product(args.batch_sizes, args.context_lengths):
        where = {"batch_size": batch, "context_len": context}
        inputs = scan_inputs(config, batch, context, dtype, device, args.seed)
        chunk = config.chunk_size
        ref = record(rows, where, "reference", lambda: ssd_scan_reference(*inputs, chunk, None, True), None, args,
                     clock)
        if _fla_available():
            record(rows, where, "fla", lambda: _ssd_scan_fla(*inputs, chunk, None, True), ref, args, clock)
        for block_t, block_p, segments, warps in ([] if args.defaults_only else variants):
            if block_p > config.head_dim:
                continue
            knobs = {"block_t": block_t, "block_p": block_p, "num_segments": segments, "num_warps": warps}
            record(rows, where, "triton", lambda: ssd_scan.ssd_scan_triton(*inputs, chunk, None, True, **knobs),
                   ref, args, clock, **knobs)
        default_block_p = ssd_scan.choose_block_p(batch, config.num_heads, config.head_dim, num_sms, True)
        default_segments = ssd_scan.choose_num_segments(
            batch * config.num_heads * cdiv(config.head_dim, default_block_p), context, num_sms)
        record(rows, where, "default", lambda: ssd_scan.ssd_scan_triton(*inputs, chunk, None, True), ref, args,
               clock, block_p=default_block_p, num_segments=default_segments)
        inputs = ref = None  # free them before the next point's inputs
        torch.cuda.empty_cache()

    summary = []
    for batch, context in itertools.product(args.batch_sizes, args.context_lengths):
        here = [r for r in rows if r["batch_size"] == batch and r["context_len"] == context and "median_ms" in r]
        by = {r["path"]: r for r in here if r["path"] != "triton"}
        best = min((r for r in here if r["path"] == "triton"), key=lambda r: r["median_ms"], default=None)
        ref_ms = by.get("reference", {}).get("median_ms")
        entry = {"batch_size": batch, "context_len": context, "reference_ms": ref_ms,
                 "fla_ms": by.get("fla", {}).get("median_ms"), "default_ms": by.get("default", {}).get("median_ms"),
                 "best_ms": best and best["median_ms"],
                 "best": best and {k: best[k] for k in ("block_t", "block_p", "num_segments", "num_warps")}}
        for name in ("fla", "default", "best"):
            ms = entry[f"{name}_ms"]
            entry[f"{name}_vs_reference"] = ref_ms / ms if ref_ms and ms else None
        summary.append(entry)
    meta = run_metadata("python scripts/bench_ssd_scan.py " + " ".join(sys.argv[1:] if argv is None else argv), device)
    result = {"meta": meta, "config": {**vars(args), "mamba": dataclasses.asdict(config)},
              "notes": ["times: one scan call captured in a CUDA graph, CUDA events around each replay, median",
                        "rel_err_vs_reference: ||out - ref|| / ||ref||, max over y and the final state; the reference "
                        "is the chunked PyTorch scan in fp32 on the same inputs"],
              "rows": rows, "summary": summary}
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print("\nbatch context  reference   fla    default  best   | default/ref best/ref fla/ref  best config")
    for e in summary:
        f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        print(f"{e['batch_size']:5d} {e['context_len']:7d} {f(e['reference_ms']):>9} {f(e['fla_ms']):>7} "
              f"{f(e['default_ms']):>7} {f(e['best_ms']):>7} | {f(e['default_vs_reference']):>8} "
              f"{f(e['best_vs_reference']):>8} {f(e['fla_vs_reference']):>7}  {e['best']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
