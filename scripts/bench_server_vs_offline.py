"""Server throughput at saturation vs the offline engine on the same workload (issue: >= 90% on the GPU).

One workload (seeded random token-id prompts, fixed output lengths, EOS ignored, all requests at t=0) runs
twice: through LLMEngine.generate() in this process, then through `fms serve` in a child process driven by
`fms bench serve`'s client (streaming /v1/completions). Each side gets an untimed warm-up first. Writes
JSON with the command, device, commit, both throughputs and their ratio.

    python scripts/bench_server_vs_offline.py --output results/server_vs_offline.json          # CUDA: 3.2-1b
    python scripts/bench_server_vs_offline.py --variant micro --num-prompts 8 --output /tmp/s.json  # CPU demo
    python scripts/bench_server_vs_offline.py --no-engine-process --output results/server_vs_offline_thread.json
                                           # the engine loop in a thread of the server process, for comparison
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(REPO))

from fms.entrypoints.server_vs_offline import (ServerVsOfflineConfig, run_server_vs_offline,  # noqa: E402
                                               write_placeholder_tokenizer)

__all__ = ["main", "parse_args", "write_placeholder_tokenizer"]


def parse_args(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="a local HF checkpoint folder instead of random weights "
                   "(--architecture/--variant); scripts/bench_server_overhead.py passes a 1-layer one")
    p.add_argument("--architecture", default="llama")
    p.add_argument("--variant", default="3.2-1b" if cuda else "micro")
    p.add_argument("--num-prompts", type=int, default=128 if cuda else 8)
    p.add_argument("--prompt-range", default="64,512" if cuda else "16,32", help="LO,HI prompt tokens")
    p.add_argument("--output-len", type=int, default=256 if cuda else 8)
    p.add_argument("--warmup-prompts", type=int, default=16 if cuda else 2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=2, help="timed runs per side, each with its own prompts (the "
                   "same on both sides); the median of the per-run ratios counts")
    p.add_argument("--same-prompts", action="store_true", help="every timed run resends the first run's prompts "
                   "(later runs hit the prefix cache) and the fastest run of each side counts: the method before "
                   "session 24")
    p.add_argument("--fresh-connections", action="store_true", help="each timed run opens its own connections "
                   "inside the run, as before session 25 (default: the client opens them before each run's clock "
                   "starts, as a long-running client's pool holds them)")
    p.add_argument("--idle-before-run", type=float, default=0.0, help="seconds both sides leave the GPU idle "
                   "before each timed run's clock starts (the server's also idles while the client reads /metrics "
                   "between runs; the offline engine's runs otherwise follow each other at once)")
    p.add_argument("--port", type=int, default=None, help="default: a free port")
    p.add_argument("--server-timeout", type=float, default=1200.0, help="seconds for the server to come up")
    p.add_argument("--engine-args", default="", help="extra engine flags for both sides, e.g. '--max-num-seqs 256'")
    p.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=None,
                   help="pass --engine-process / --no-engine-process to fms serve (default: fms serve's own)")
    p.add_argument("--output", type=Path, default=Path("results/server_vs_offline.json"))
    return p, p.parse_args(argv)


def main(argv=None) -> dict:
    parser, args = parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        config = ServerVsOfflineConfig(
            architecture=args.architecture, variant=args.variant, model=args.model, num_prompts=args.num_prompts,
            prompt_range=args.prompt_range, output_len=args.output_len, warmup_prompts=args.warmup_prompts,
            seed=args.seed, repeats=args.repeats, fresh_prompts=not args.same_prompts,
            fresh_connections=args.fresh_connections, idle_before_run_s=args.idle_before_run, port=args.port,
            server_timeout=args.server_timeout, engine_args=args.engine_args, engine_process=args.engine_process,
            output=args.output,
            command=" ".join(shlex.quote(a) for a in ["python", "scripts/bench_server_vs_offline.py", *argv]))
    except ValueError as e:
        parser.error(str(e))
    return run_server_vs_offline(config)


if __name__ == "__main__":
    main()
