"""Offline serving throughput of LLMEngine (continuous batching over the paged cache), optionally vs HF.

Workload: N requests with prompt lengths drawn uniformly from a seeded range and a fixed (or ranged)
number of new tokens, EOS ignored, random token ids; or prompts and reply lengths from a
ShareGPT-style JSON (--dataset). All requests arrive at t=0, so time to first token includes queueing.
Every row carries its roofline limit (limit_tok_s, pct_of_limit). Same as `fms bench throughput`;
the flags live in fms.entrypoints.bench_cli, the work in fms.bench.serving.

    python scripts/benchmark_serving.py --results_dir results                       # CUDA: llama 3.2-1b bf16
    python scripts/benchmark_serving.py --results_dir results --peers hf            # + HF generate_batch
    python scripts/benchmark_serving.py --results_dir results --dataset sharegpt.json --tokenizer PATH

On CPU the defaults shrink to a demo (llama "micro", 8 requests of 16-32 + 8 tokens) that finishes in well under a
minute; its numbers say the engine runs, not how fast it is. Writes serving.json and serving.csv.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fms.entrypoints import bench_cli  # noqa: E402


def main(argv=None):
    return bench_cli.throughput_main(argv, program=("python", "scripts/benchmark_serving.py"))


if __name__ == "__main__":
    main()
