"""Time the Triton paged decode kernel against SDPA over contiguous K/V (CUDA only).

Llama-3-8B attention shape (Hq=32, Hkv=8, D=128; --head-dim 64 for Llama-3.2-1B), one query token per sequence, every sequence
at the same context length, pages shuffled across the pool. For each (batch, context) point:
check the kernel against SDPA, then time with triton.testing.do_bench (median), rotating over
several input sets so that no set is still in the 50 MB L2 (do_bench also flushes L2 before
every timed call). Reports ms, achieved GB/s (bytes of K+V read / time) and the ratio to the
faster SDPA form (enable_gqa, or K/V repeated to Hq heads).

    python scripts/bench_paged_decode_kernel.py --page-size 16 --out results/paged_decode_ps16.json
    python scripts/bench_paged_decode_kernel.py --sweep      # also try kernel knob settings (~+3 min)
    python scripts/bench_paged_decode_kernel.py --flex       # also the compiled FlexAttention paged path

The work is fms.bench.paged_decode_kernel.
"""

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fms.bench.paged_decode_kernel import PagedDecodeBenchConfig, run_paged_decode_bench


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--page-size", type=int, default=16, choices=[16, 32, 64, 128, 256])
    p.add_argument("--head-dim", type=int, default=128, choices=[64, 128, 256],
                   help="128: Llama-3 8B's attention shape; 64: Llama-3.2-1B's (both Hq=32, Hkv=8)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 128])
    p.add_argument("--context-lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--num-splits", type=int, default=None, help="force the split factor (default: heuristic)")
    p.add_argument("--pages-per-iter", type=int, default=None)
    p.add_argument("--num-warps", type=int, default=None, help="default: the launcher's for the head dim")
    p.add_argument("--num-stages", type=int, default=None, help="default: the launcher's for the head dim")
    p.add_argument("--sweep", action="store_true", help="also time a grid of kernel knob settings per point")
    p.add_argument("--flex", action="store_true", help="also time the compiled FlexAttention paged path (slow)")
    p.add_argument("--memory-fraction", type=float, default=0.8, help="of free GPU memory a point may use")
    p.add_argument("--out", type=str, default=None, help="write the results as JSON here")
    p.add_argument("--no-graphs", dest="graphs", action="store_false",
                   help="time eager launches instead of CUDA-graph replays")
    p.add_argument("--prefill", action="store_true",
                   help="time causal prefill instead: compiled paged FlexAttention vs SDPA (flash) on contiguous K/V")
    return p, p.parse_args(argv)



def main(argv=None) -> int:
    parser, args = parse_args(argv)
    options = {k.replace("-", "_"): v for k, v in vars(args).items()}
    try:
        config = PagedDecodeBenchConfig(**options)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        run_paged_decode_bench(config)
    except RuntimeError as exc:
        raise SystemExit(f"bench_paged_decode_kernel.py: {exc}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
