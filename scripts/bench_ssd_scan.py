"""Mamba2 SSD prefill scan on the GPU: our Triton kernel (fms.triton.ssd_scan) swept over its block sizes,
against fla's chunk_simple_gla and the chunked PyTorch reference, at one mixer's shape (Granite-4.0-H-1B by
default: 48 heads x 64, state 128, one B/C group).

Inputs are those of profile_hybrid.py's mixer section (fms.bench.ssd.scan_inputs: randn x/B/C in the model
dtype, dt = softplus(randn), A = -logspace(-2, 0)). Each call is captured once in a CUDA graph and its replays
are timed with CUDA events (GPU time, no launch gaps); medians over --repeats. Every variant's output is checked
against the reference's (relative L2 error over y and the final state). Writes one JSON file. The work is
fms.bench.ssd.run_ssd_scan_bench.

    python scripts/bench_ssd_scan.py --batch_sizes 1,8 --context_lengths 4096,16384 --output final_project/results/x.json
"""

import argparse
import shlex
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fms.bench.ssd import DTYPES, SsdScanBenchConfig, run_ssd_scan_bench


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="4.0-h-1b", help="granite_hybrid variant whose Mamba shape is used")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--batch_sizes", type=_ints, default=(1, 8))
    p.add_argument("--context_lengths", type=_ints, default=(4096, 16384))
    p.add_argument("--block_t", type=_ints, default=(32, 64), help="kernel chunk lengths to sweep")
    p.add_argument("--block_p", type=_ints, default=(16, 32, 64), help="head_dim rows per program to sweep")
    p.add_argument("--num_segments", type=_ints, default=(1, 2, 4, 8), help="segments per row to sweep")
    p.add_argument("--num_warps", type=_ints, default=(4,))
    p.add_argument("--defaults_only", action="store_true", help="time the default choice only (no sweep)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", required=True, help="JSON file to write")
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        config = SsdScanBenchConfig(**vars(parser.parse_args(argv)), command=" ".join(
            shlex.quote(a) for a in ["python", "scripts/bench_ssd_scan.py", *argv]))
    except ValueError as exc:
        parser.error(str(exc))
    try:
        run_ssd_scan_bench(config)
    except RuntimeError as exc:  # no CUDA device
        print(f"bench_ssd_scan.py: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
