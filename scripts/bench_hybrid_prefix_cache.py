"""Prefix caching on Granite-4.0-H: a shared system prompt, caching on vs off (fms.bench.hybrid_prefix).

    python scripts/bench_hybrid_prefix_cache.py --device cuda --results_dir final_project/results/hybrid_prefix
    python scripts/bench_hybrid_prefix_cache.py            # CPU: the tiny h-nano shape, end to end in seconds

Writes hybrid_prefix_cache.json (command, device, commit, one row per run).
"""

import argparse
import shlex
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fms.bench.hybrid_prefix import HybridPrefixBenchConfig, run_hybrid_prefix_benchmark  # noqa: E402


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results_dir", type=Path, default=Path("results"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--variant", default=None, help="granite_hybrid variant (default: 4.0-h-1b on CUDA, h-nano on CPU)")
    p.add_argument("--num_requests", type=int, default=None)
    p.add_argument("--system_tokens", type=int, default=None)
    p.add_argument("--unique_range", type=int, nargs=2, default=None, metavar=("LOW", "HIGH"))
    p.add_argument("--max_new_tokens", type=int, default=None)
    p.add_argument("--page_size", type=int, default=16)
    p.add_argument("--max_num_batched_tokens", type=int, default=None)
    p.add_argument("--no_attention_only_reference", action="store_true",
                   help="skip the all-attention model of the same shape (its hit rate is the comparison)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="torch.compile the engine's decode step and prefill (--no-compile: CUDA graphs only)")
    a = p.parse_args(argv)
    config = HybridPrefixBenchConfig(
        results_dir=a.results_dir, device=a.device, variant=a.variant, num_requests=a.num_requests,
        system_tokens=a.system_tokens, unique_range=None if a.unique_range is None else tuple(a.unique_range),
        max_new_tokens=a.max_new_tokens, page_size=a.page_size, max_num_batched_tokens=a.max_num_batched_tokens,
        attention_only_reference=not a.no_attention_only_reference, seed=a.seed, compile=a.compile,
        command=shlex.join(["python", "scripts/bench_hybrid_prefix_cache.py", *argv]),
    )
    return run_hybrid_prefix_benchmark(config)


if __name__ == "__main__":
    main()
