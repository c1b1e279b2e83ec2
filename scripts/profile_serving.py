"""Where an LLMEngine run spends its time: torch.profiler over a short serving workload.

    python scripts/profile_serving.py --num_requests 32 --output_len 64       # CUDA: llama 3.2-1b bf16

Prints the kernels (self device time) and host operators (self CPU time) that cost the most, the
engine's own phase timers, and the device time of one decode step per batch size from CUDA-graph
replays. Writes profile.json (tables + command + device) to --results_dir. The work is
fms.bench.serving_profile.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fms.bench.serving_profile import ServingProfileConfig, profile_serving  # noqa: E402


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results_dir", type=Path, default=Path("results/profile_serving"))
    p.add_argument("--architecture", default="llama")
    p.add_argument("--variant", default=None, help="default: 3.2-1b on CUDA, micro on CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--num_requests", type=int, default=32)
    p.add_argument("--prompt_range", default="64,512")
    p.add_argument("--output_len", type=int, default=64)
    p.add_argument("--max_num_seqs", type=int, default=None)
    p.add_argument("--max_decode_steps", type=int, default=None, help="default: the engine's")
    p.add_argument("--num_pages", type=int, default=None)
    p.add_argument("--step_batch_sizes", default="1,8,32,128", help="decode-step device time per batch size")
    p.add_argument("--kernel_batch_sizes", default="1,128",
                   help="decode-step graphs whose kernels are tabled (idle rows: weights, no KV)")
    p.add_argument("--top", type=int, default=20)
    return p, p.parse_args(argv)


def main(argv=None):
    parser, args = parse_args(argv)
    lo, _, hi = args.prompt_range.partition(",")
    options = dict(vars(args), prompt_range=(int(lo), int(hi or lo)), step_batch_sizes=_ints(args.step_batch_sizes),
                   kernel_batch_sizes=_ints(args.kernel_batch_sizes))
    argv = sys.argv[1:] if argv is None else argv
    try:
        config = ServingProfileConfig(**options, command=" ".join(
            shlex.quote(a) for a in ["python", "scripts/profile_serving.py", *argv]))
    except ValueError as exc:
        parser.error(str(exc))
    return profile_serving(config)


if __name__ == "__main__":
    main()
