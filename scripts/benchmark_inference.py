"""Benchmark static-batch inference per attention backend: latency, throughput, ms/token, GPU and KV memory.

Sweeps batch size (at a fixed context) and context length (at batch 1); at each point every backend in
--attn_name runs in turn (A, B, A, B, ...) on the same random prompts, EOS ignored. Writes a table to
stdout and results.json, points.csv and PNG plots under --results_dir/<run name>/; every row carries its
roofline limit (limit_tok_s, pct_of_limit; fms/bench/roofline.py). The work is fms.bench.static_run.

    python scripts/benchmark_inference.py                                  # CPU: micro model, ~1 minute
    python scripts/benchmark_inference.py --attn_name sdpa,paged --profile standard --mixed --peers hf
    python scripts/benchmark_inference.py --variant 3.2-1b --batch_sizes 1,8,32 --context_lengths 512,2048
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fms.entrypoints import bench_cli  # noqa: E402


def main(argv=None) -> int:
    """Same as `fms bench static`; the flags live in fms.entrypoints.bench_cli."""
    bench_cli._PROGRAM["static"] = ["scripts/benchmark_inference.py"]
    return bench_cli.static_main(argv)


if __name__ == "__main__":
    sys.exit(main())
