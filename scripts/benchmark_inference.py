"""Benchmark static-batch inference per attention backend: latency, throughput, ms/token, GPU and KV memory.

Sweeps batch size (at a fixed context) and context length (at batch 1); at each point every backend in
--attn_name runs in turn (A, B, A, B, ...) on the same random prompts, EOS ignored. Writes a table to
stdout and results.json, points.csv and PNG plots under --results_dir/<run name>/; every row carries its
roofline limit (limit_tok_s, pct_of_limit; fms/bench/roofline.py). The work is fms.bench.static_run.

    python scripts/benchmark_inference.py                                  # CPU: micro model, ~1 minute
    python scripts/benchmark_inference.py --attn_name sdpa,paged --profile standard --mixed --peers hf
    python scripts/benchmark_inference.py --variant 3.2-1b --batch_sizes 1,8,32 --context_lengths 512,2048
"""

import argparse
import shlex
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fms.bench.models import ARCHITECTURES
from fms.bench.static_run import PROFILES, SWEEPS, StaticBenchConfig, run_static_benchmark
from fms.cache.paged import SUPPORTED_PAGE_SIZES


def _int_list(values) -> list[int] | None:
    if values is None:
        return None
    return [int(part) for v in values for part in str(v).replace(",", " ").split()]


def _range(text: str) -> tuple[int, int]:
    lo, hi = (int(x) for x in text.split(","))
    return lo, hi


def _names(text: str | None) -> tuple[str, ...]:
    return tuple(x.strip() for x in (text or "").split(",") if x.strip())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--architecture", default="llama", choices=ARCHITECTURES)
    m.add_argument("--variant", default=None,
                   help="a registered variant, or auto-llama / auto-granite (picked from the device); "
                        "default: auto for the architecture")
    m.add_argument("--model_path", default=None, help="HF checkpoint folder (else random weights)")
    m.add_argument("--tokenizer", default=None, help="only used to decode one sample output")
    m.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="auto: bf16 on CUDA, fp32 on CPU")
    m.add_argument("--device_type", default=None, choices=["cuda", "cpu"], help="default: cuda if available")
    m.add_argument("--compile", action="store_true",
                   help="torch.compile the model forward for every backend (eager if it fails); results.json "
                        "records the graphs compiled per backend and step kind, graph breaks and any fallback")
    m.add_argument("--compile_scope", default="all", choices=["all", "decode"],
                   help="with --compile, which steps run compiled: all, or one-token decode steps only (prefill "
                        "eager, as gpt-fast compiles only its decode step)")
    m.add_argument("--compile_backend", default="inductor",
                   help="torch.compile backend for --compile (aot_eager: dynamo's graphs without code generation)")
    m.add_argument("--decode_window", type=int, default=None,
                   help="sweeps decode in windows of this many one-token steps per host synchronization, "
                        "inputs computed on the device (fms.utils.generation.Generator); with --compile the "
                        "window step is compiled (prefill eager)")
    m.add_argument("--cuda_graphs", action="store_true",
                   help="with --decode_window: replay each decode step from a CUDA graph")
    m.add_argument("--seed", type=int, default=0)
    w = p.add_argument_group("workload")
    w.add_argument("--attn_name", default="sdpa,paged", help="comma list of registered attention ops")
    w.add_argument("--profile", default="standard", choices=PROFILES,
                   help="default sweeps; light for GPUs under 16 GB (the CPU always gets a small sweep)")
    w.add_argument("--sweep", default="both", choices=SWEEPS)
    w.add_argument("--batch_sizes", nargs="+", default=None, help="batch sweep, e.g. 1,2,4,8")
    w.add_argument("--context_lengths", nargs="+", default=None, help="context sweep, e.g. 128,512,2048")
    w.add_argument("--base_context", type=int, default=None, help="context of the batch sweep (profile default)")
    w.add_argument("--base_batch", type=int, default=1, help="batch of the context sweep")
    w.add_argument("--max_new_tokens", type=int, default=None)
    w.add_argument("--page_size", type=int, default=16, choices=SUPPORTED_PAGE_SIZES)
    w.add_argument("--repeats", type=int, default=None, help="timed runs per point (3 on CUDA, 1 on CPU)")
    w.add_argument("--warmup", type=int, default=1, help="untimed runs per point and backend")
    x = p.add_argument_group("mixed-length workload and capacity")
    x.add_argument("--mixed", action="store_true", help="also run a mixed-length static batch per backend")
    x.add_argument("--mixed_requests", type=int, default=None)
    x.add_argument("--mixed_prompt_range", type=_range, default=None, help="LO,HI prompt tokens")
    x.add_argument("--mixed_output_range", type=_range, default=None, help="LO,HI output tokens")
    x.add_argument("--memory_budget_gb", type=float, default=None,
                   help="KV-cache budget for the largest-batch search (GB = 1e9 bytes)")
    o = p.add_argument_group("output")
    o.add_argument("--results_dir", default="results")
    o.add_argument("--run_name", default=None, help="subfolder of --results_dir (default: model-backends-time)")
    o.add_argument("--wandb", action="store_true", help="log to Weights & Biases (offline unless configured)")
    o.add_argument("--wandb_project", default="fms-inference-benchmark")
    o.add_argument("--peers", default=None, help="comma list of peer stacks to run the same workload on: hf")
    o.add_argument("--no_progress", action="store_true", help="no tqdm progress bars")
    return p


def config_from_args(parser: argparse.ArgumentParser, argv: list[str]) -> StaticBenchConfig:
    args = parser.parse_args(argv)
    try:
        batch_sizes, context_lengths = _int_list(args.batch_sizes), _int_list(args.context_lengths)
    except ValueError as exc:
        parser.error(f"--batch_sizes / --context_lengths take integers: {exc}")
    options = {k: v for k, v in vars(args).items() if k not in ("attn_name", "peers", "no_progress")}
    options.update(batch_sizes=batch_sizes, context_lengths=context_lengths, backends=_names(args.attn_name),
                   peers=_names(args.peers), progress=not args.no_progress,
                   command=" ".join(shlex.quote(a) for a in ["scripts/benchmark_inference.py", *argv]))
    try:
        return StaticBenchConfig(**options)
    except ValueError as exc:
        parser.error(str(exc))


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    run_static_benchmark(config_from_args(build_parser(), argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
