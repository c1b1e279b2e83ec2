"""Offline serving throughput of LLMEngine (continuous batching over the paged cache), optionally vs HF.

Workload: N requests with prompt lengths drawn uniformly from a seeded range and a fixed (or ranged)
number of new tokens, EOS ignored, random token ids; or prompts and reply lengths from a
ShareGPT-style JSON (--dataset). All requests arrive at t=0, so time to first token includes queueing.
Every row carries its roofline limit (limit_tok_s, pct_of_limit). The work is fms.bench.serving.

    python scripts/benchmark_serving.py --results_dir results                       # CUDA: llama 3.2-1b bf16
    python scripts/benchmark_serving.py --results_dir results --peers hf            # + HF generate_batch
    python scripts/benchmark_serving.py --results_dir results --dataset sharegpt.json --tokenizer PATH

On CPU the defaults shrink to a demo (llama "micro", 8 requests of 16-32 + 8 tokens) that finishes in well under a
minute; its numbers say the engine runs, not how fast it is. Writes serving.json and serving.csv.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fms.bench.serving import PEERS, ServingBenchConfig, run_serving_benchmark  # noqa: E402


def _range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(",")
    return int(lo), int(hi or lo)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results_dir", type=Path, default=Path("results"))
    p.add_argument("--architecture", default="llama")
    p.add_argument("--variant", default=None, help="default: 3.2-1b on CUDA, micro on CPU")
    p.add_argument("--model_path", default=None, help="HF checkpoint folder (real weights) instead of random ones")
    p.add_argument("--tokenizer", default=None, help="tokenizer for --dataset (default: the shipped one)")
    p.add_argument("--data_type", default=None, help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--num_requests", type=int, default=None, help="default 128 (CUDA) / 8 (CPU)")
    p.add_argument("--prompt_range", type=_range, default=None, help="LO,HI prompt tokens; default 64,512 / 16,32")
    p.add_argument("--output_range", type=_range, default=None, help="LO,HI new tokens; default 256 / 8")
    p.add_argument("--dataset", type=Path, default=None, help="ShareGPT-style JSON (conversations or prompt/completion)")
    p.add_argument("--decode_steps_sweep", default=None,
                   help="K1,K2,...: run the workload once per max_decode_steps value on one engine (compiled once)")
    p.add_argument("--batch1_tokens", type=int, default=0,
                   help="also time one request (128-token prompt, this many new tokens) on the same engine")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--page_size", type=int, default=16)
    p.add_argument("--num_pages", type=int, default=None)
    p.add_argument("--memory_fraction", type=float, default=None, help="of free GPU memory for pages (default 0.9)")
    p.add_argument("--max_num_seqs", type=int, default=None)
    p.add_argument("--max_num_batched_tokens", type=int, default=None)
    p.add_argument("--max_model_len", type=int, default=None)
    p.add_argument("--no_prefix_caching", action="store_true")
    p.add_argument("--no_cuda_graphs", action="store_true")
    p.add_argument("--no_compile", action="store_true", help="decode step and prefill forward uncompiled (default: torch.compile on CUDA)")
    p.add_argument("--max_decode_steps", type=int, default=None,
                   help="decode steps per host synchronization (default: the engine's, 16; 1 = every token)")
    p.add_argument("--respect_eos", action="store_true", help="stop at EOS (default: ignore it, fixed lengths)")
    p.add_argument("--peers", default="", help="comma list of peers to run on the same weights/workload: hf")
    p.add_argument("--no_warmup", action="store_true", help="skip the short untimed warm-up run (always off on CPU)")
    return p, p.parse_args(argv)


def config_from_args(argv=None) -> ServingBenchConfig:
    parser, args = parse_args(argv)
    peers = [p for p in args.peers.split(",") if p]
    unknown = sorted(set(peers) - set(PEERS))
    if unknown:
        print(f"unknown peers ignored: {unknown} (supported: {', '.join(PEERS)})")
    options = {k: v for k, v in vars(args).items()
               if k not in ("no_prefix_caching", "no_cuda_graphs", "no_compile", "no_warmup", "peers",
                            "decode_steps_sweep")}
    argv = sys.argv[1:] if argv is None else argv
    try:
        return ServingBenchConfig(
            **options, prefix_caching=not args.no_prefix_caching, cuda_graphs=not args.no_cuda_graphs,
            compile=not args.no_compile, warmup=not args.no_warmup, peers=tuple(p for p in peers if p in PEERS),
            decode_steps_sweep=tuple(int(k) for k in args.decode_steps_sweep.split(",")) if args.decode_steps_sweep
            else (),
            command="python " + " ".join(shlex.quote(a) for a in ["scripts/benchmark_serving.py", *argv]))
    except ValueError as exc:
        parser.error(str(exc))


def main(argv=None):
    return run_serving_benchmark(config_from_args(argv))


if __name__ == "__main__":
    main()
