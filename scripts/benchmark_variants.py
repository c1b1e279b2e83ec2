"""Benchmark GPT-2 attention variants (standard, sliding window, ALiBi) on a contiguous and the paged KV cache.

Random weights; for each context length, variant and cache layout: prefill and per-token decode latency,
tokens/s, peak GPU memory, KV pages held (at the fullest point with one-shot prefill, and with chunked
prefill, where a sliding window lets pages go), and how many greedy tokens the paged run shares with
the contiguous run. Learned positions stop standard GPT-2 at n_positions (1024); the window (NoPE) and
ALiBi variants have no position table and run past it. Table on stdout; JSON + CSV in --results_dir.
The work is fms.bench.variants.

    python scripts/benchmark_variants.py                                   # CPU: nano, short contexts
    python scripts/benchmark_variants.py --variant_size gpt2 --context_lengths 1024 4096 16384   # GPU
"""

import argparse
import shlex
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fms.bench.variants import VARIANT_SIZES, VARIANTS, VariantsBenchConfig, run_variants_benchmark
from fms.cache.paged import SUPPORTED_PAGE_SIZES


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant_size", default="nano", choices=sorted(VARIANT_SIZES))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--window", type=int, default=None, help="sliding window (default 32 for nano, 256 for gpt2)")
    p.add_argument("--contiguous_op", default="sdpa", choices=["sdpa", "flex"], help="op for the contiguous cache")
    p.add_argument("--context_lengths", type=int, nargs="+", default=None,
                   help="prompt lengths (default: 128 512 1536 on CPU; 512 960 2048 4096 8192 16384 on GPU)")
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--max_new_tokens", type=int, default=None, help="default 16 on CPU, 64 on GPU")
    p.add_argument("--page_size", type=int, default=16, choices=SUPPORTED_PAGE_SIZES)
    p.add_argument("--prefill_chunk", type=int, default=256, help="chunk of the pages_chunked_prefill pass")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per point (3 on GPU, 1 on CPU)")
    p.add_argument("--device_type", default=None, choices=["cuda", "cpu"], help="default: cuda if available")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"], help="default bf16 on GPU, fp32 on CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results_dir", default="results")
    return p, p.parse_args(argv)


def main(argv=None) -> dict:
    parser, args = parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    try:
        config = VariantsBenchConfig(**vars(args), command="python scripts/benchmark_variants.py " + shlex.join(argv))
    except ValueError as exc:
        parser.error(str(exc))
    return run_variants_benchmark(config)


if __name__ == "__main__":
    main()
