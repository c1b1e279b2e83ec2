"""The benchmark and evaluation subcommands that wrap fms.bench / fms.eval: `fms bench throughput` (offline
engine serving throughput), `fms bench static` (static batches per attention op), `fms bench latency` (one
batch end to end), `fms bench startup` (engine start-up by phase, cold and warm) and `fms eval`.
scripts/benchmark_serving.py, scripts/benchmark_inference.py, scripts/bench_startup.py and scripts/eval.py
call these. Options take vLLM-style dashes or the scripts' underscores alike.
`fms bench targets` (issue 19's table of targets) runs them as child processes (scripts/bench_targets.py).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import fields
from pathlib import Path

import torch

from fms.bench.models import ARCHITECTURES
from fms.bench.serving import PEERS, ServingBenchConfig, run_serving_benchmark
from fms.bench.startup import DEFAULT_MODELS, StartupBenchConfig, run_startup_benchmark
from fms.bench.static_run import PROFILES, SWEEPS, StaticBenchConfig, run_static_benchmark
from fms.bench.targets import ROW_NAMES, TargetsConfig, run_targets
from fms.cache.paged import SUPPORTED_PAGE_SIZES
from fms.eval.report import MODE_CHOICES, TASK_NAMES, EvalConfig, run_eval
from fms.runtime.compiled import COMPILE_SCOPES, DEFAULT_COMPILE_SCOPE
from fms.serving.config import parse_graph_sizes

THROUGHPUT_DOC = """Offline serving throughput of LLMEngine (continuous batching over the paged cache), optionally vs HF.

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
STATIC_DOC = """Benchmark static-batch inference per attention backend: latency, throughput, ms/token, GPU and KV memory.

Sweeps batch size (at a fixed context) and context length (at batch 1); at each point every backend in
--attn_name runs in turn (A, B, A, B, ...) on the same random prompts, EOS ignored. Writes a table to
stdout and results.json, points.csv and PNG plots under --results_dir/<run name>/; every row carries its
roofline limit (limit_tok_s, pct_of_limit; fms/bench/roofline.py). The work is fms.bench.static_run.

    python scripts/benchmark_inference.py                                  # CPU: micro model, ~1 minute
    python scripts/benchmark_inference.py --attn_name sdpa,paged --profile standard --mixed --peers hf
    python scripts/benchmark_inference.py --variant 3.2-1b --batch_sizes 1,8,32 --context_lengths 512,2048
"""
EVAL_DOC = """Accuracy, speed and memory of one model on MMLU / TruthfulQA (or summarization), default vs paged attention.

    python scripts/eval.py --task mmlu --data path/to/mmlu/test --mode both --output results/mmlu.json
    python scripts/eval.py --task truthfulqa_mc2 --data mc_task.json --model_path ckpt/ --mode paged

Data is read from local files only (see fms/resources/eval/README.md for the layouts). The work is
fms.eval.report.run_eval.
"""
STARTUP_DOC = """Engine start-up by phase, cold and warm, each model in two fresh processes.

For each ARCHITECTURE:VARIANT (random weights drawn on the device) a child process times: its interpreter
start, import torch + fms, get_model, LLMEngine(model) with its own phases (KV pool, decode compile + CUDA
graph capture, prefill warm-up) and the first generate() of one short request. "cold" runs with fresh, empty
TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR; "warm" is a second fresh process that finds what the first
wrote there. A child past --timeout is killed and recorded as timed out with the phases it finished. Engine
options pass through (--no-compile: CUDA graphs without torch.compile). The work is fms.bench.startup.

    fms bench startup --output results/startup.json        # CUDA: llama 3.2-1b, llama 3.1-8b, granite 4.0-h-1b
    fms bench startup --models llama:3.1-8b --timeout 270 --output results/startup_8b.json
    fms bench startup --no-compile --output results/startup_graphs_only.json
    fms bench startup --models llama:3.1-8b --runs cold --cache-dir results/startup_caches   # then --runs warm
    fms bench startup --models llama:3.1-8b --checkpoint --output results/startup_8b_ckpt.json  # load GB/s

On CPU the default is llama:micro: a demo that checks the benchmark runs (under a minute), not a measurement.
Writes one JSON (per model: the cold and warm phase tables, totals, the issue's targets met or not) and prints
a table of model x phase with cold and warm columns.
"""
# how each run records the command that made it (the scripts pass their own name)
THROUGHPUT_PROGRAM = ("fms", "bench", "throughput")  # how the recorded command starts (scripts pass theirs)
STATIC_PROGRAM = ("fms", "bench", "static")
STARTUP_PROGRAM = ("fms", "bench", "startup")
TARGETS_PROGRAM = ("fms", "bench", "targets")
TARGETS_DOC = """Issue 19's table of targets: each row runs an existing benchmark as a child process and reads its JSON.

Rows: startup-8b, startup-hybrid (fms bench startup), serving-1b and batch1-1b (one run of
scripts/benchmark_serving.py feeds both), serving-8b (with HF generate_batch), eval-fp32 (scripts/eval.py, paged
vs default in fp32), serving-hybrid (Granite-4.0-H-1B). Each run has its own --timeout; a run that fails or times
out is reported with its log tail and the next one still runs. A target is met only if every run of its row met
it (--repeats N reruns each job). Writes one JSON (command, device, commit; per row its runs: command, raw JSON,
measured, met) and the same table in markdown beside it; the JSON is rewritten after every run. The work is
fms.bench.targets.

    fms bench targets --rows serving-1b,batch1-1b,eval-fp32 --timeout 540 --output results/targets_a.json
    fms bench targets --rows startup-8b --timeout 590 --output results/targets_b.json
    fms bench targets --from-results results/targets_a.json results/targets_b.json --output results/targets.json
    fms bench targets --dry-run                                # the commands each row would run

Without CUDA the rows run tiny stand-ins (llama micro, granite_hybrid h-nano, a few requests) and the verdicts
read n/a (CPU): the targets are for the GPU (eval-fp32's is for the CPU too).
"""


class _Parser(argparse.ArgumentParser):
    """Takes --max-num-seqs for --max_num_seqs (vLLM's spelling of the scripts' options)."""

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        known = {o for a in self._actions for o in a.option_strings}
        fixed = []
        for arg in args:
            flag, eq, value = arg.partition("=")
            if flag.startswith("--") and flag not in known and flag.replace("-", "_")[2:] and \
                    "--" + flag[2:].replace("-", "_") in known:
                arg = "--" + flag[2:].replace("-", "_") + eq + value
            fixed.append(arg)
        return super().parse_known_args(fixed, namespace)


# -- fms bench throughput (offline engine, scripts/benchmark_serving.py) ----------------------------------
def _serving_range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(",")
    return int(lo), int(hi or lo)


def throughput_parser_args(argv=None):
    p = _Parser(prog="fms bench throughput", description=THROUGHPUT_DOC.splitlines()[0])
    p.add_argument("--results_dir", type=Path, default=Path("results"))
    p.add_argument("--architecture", default="llama")
    p.add_argument("--variant", default=None, help="default: 3.2-1b on CUDA, micro on CPU")
    p.add_argument("--model_path", default=None, help="HF checkpoint folder (real weights) instead of random ones")
    p.add_argument("--tokenizer", default=None, help="tokenizer for --dataset (default: the shipped one)")
    p.add_argument("--data_type", default=None, help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--num_requests", type=int, default=None, help="default 128 (CUDA) / 8 (CPU)")
    p.add_argument("--prompt_range", type=_serving_range, default=None, help="LO,HI prompt tokens; default 64,512 / 16,32")
    p.add_argument("--output_range", type=_serving_range, default=None, help="LO,HI new tokens; default 256 / 8")
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
    p.add_argument("--compile_scope", default=DEFAULT_COMPILE_SCOPE, choices=COMPILE_SCOPES,
                   help="what one torch.compile covers (the engine's --compile-scope): one decoder layer compiled once "
                        "and reused for every layer (default, fast start-up), or the whole model (more throughput)")
    p.add_argument("--cuda_graph_sizes", type=parse_graph_sizes, default=None, dest="graph_batch_sizes",
                   help="decode batch sizes captured as CUDA graphs (the engine's --cuda-graph-sizes), e.g. "
                        "2,4,8,16,32,64,128; default: the engine's")
    p.add_argument("--unbacked_batch", action="store_true",
                   help="the engine's --unbacked-batch: one compile of the decode step serves batch 1 too, in a graph "
                        "of its own")
    p.add_argument("--max_decode_steps", type=int, default=None,
                   help="decode steps per host synchronization (default: the engine's, 16; 1 = every token)")
    p.add_argument("--respect_eos", action="store_true", help="stop at EOS (default: ignore it, fixed lengths)")
    p.add_argument("--peers", default="", help="comma list of peers to run on the same weights/workload: hf (HF "
                   "generate_batch, continuous batching), hf_generate (HF static generate, left-padded batches)")
    p.add_argument("--hf_batch_size", type=int, default=None,
                   help="requests per HF static generate call (--peers hf_generate); default: all in one call, "
                   "halved on CUDA out-of-memory")
    p.add_argument("--no_warmup", action="store_true", help="skip the short untimed warm-up run (always off on CPU)")
    return p, p.parse_args(argv)


def throughput_config(argv=None, program=THROUGHPUT_PROGRAM) -> ServingBenchConfig:
    parser, args = throughput_parser_args(argv)
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
            command=" ".join(shlex.quote(a) for a in [*program, *argv]))
    except ValueError as exc:
        parser.error(str(exc))



def throughput_main(argv=None, program=THROUGHPUT_PROGRAM) -> dict:
    return run_serving_benchmark(throughput_config(argv, program))


# -- fms bench static (static batches, scripts/benchmark_inference.py) ------------------------------------
def _int_list(values) -> list[int] | None:
    if values is None:
        return None
    return [int(part) for v in values for part in str(v).replace(",", " ").split()]


def _range(text: str) -> tuple[int, int]:
    lo, hi = (int(x) for x in text.split(","))
    return lo, hi


def _names(text: str | None) -> tuple[str, ...]:
    return tuple(x.strip() for x in (text or "").split(",") if x.strip())


def static_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fms bench static", description=STATIC_DOC.splitlines()[0],
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


def static_config(parser: argparse.ArgumentParser, argv: list[str], program=STATIC_PROGRAM) -> StaticBenchConfig:
    args = parser.parse_args(argv)
    try:
        batch_sizes, context_lengths = _int_list(args.batch_sizes), _int_list(args.context_lengths)
    except ValueError as exc:
        parser.error(f"--batch_sizes / --context_lengths take integers: {exc}")
    options = {k: v for k, v in vars(args).items() if k not in ("attn_name", "peers", "no_progress")}
    options.update(batch_sizes=batch_sizes, context_lengths=context_lengths, backends=_names(args.attn_name),
                   peers=_names(args.peers), progress=not args.no_progress,
                   command=" ".join(shlex.quote(a) for a in [*program, *argv]))
    try:
        return StaticBenchConfig(**options)
    except ValueError as exc:
        parser.error(str(exc))



def static_main(argv=None, program=STATIC_PROGRAM) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    run_static_benchmark(static_config(static_parser(), argv, program))
    return 0


# -- fms eval (scripts/eval.py) ---------------------------------------------------------------------------
def eval_args(argv=None):
    p = _Parser(prog="fms eval", description=EVAL_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", default="both", choices=MODE_CHOICES,
                   help="default = sdpa attention, paged = paged KV cache + FlexAttention, both = each, compared")
    p.add_argument("--architecture", default="llama", help="llama, granite, granite_hybrid or hf_pretrained")
    p.add_argument("--variant", default=None, help="e.g. micro, 3.2-1b (default: micro without --model_path)")
    p.add_argument("--model_path", default=None, help="HF checkpoint folder (config.json + safetensors)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.json / tokenizer.model or a folder (default: the one in --model_path, else shipped)")
    p.add_argument("--task", default="mmlu", help=f"one of: {', '.join(TASK_NAMES)}")
    p.add_argument("--data", default=None, help="local data file or folder (never downloaded)")
    p.add_argument("--fewshot_data", default=None, help="dev split to take few-shot examples from")
    p.add_argument("--limit", type=int, default=None, help="first N questions of each subject")
    p.add_argument("--num_fewshot", type=int, default=0)
    p.add_argument("--fewshot_seed", type=int, default=1234, help="draws few-shot examples when there is no dev split")
    p.add_argument("--batch_size", type=int, default=8, help="model inputs per forward")
    p.add_argument("--device_type", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="bf16, fp16 or fp32 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--page_size", type=int, default=16, help="paged mode's page size in tokens")
    p.add_argument("--seed", type=int, default=0, help="random weights' seed (no --model_path)")
    p.add_argument("--max_new_tokens", type=int, default=64, help="summarization only")
    p.add_argument("--no_warmup", action="store_true",
                   help="skip the untimed warm-up batches (timings then include compilation)")
    p.add_argument("--timing_repeats", type=int, default=1,
                   help="timed passes per mode, modes interleaved; each mode reports its median pass "
                        "(multiple choice only)")
    p.add_argument("--no_share_context", action="store_true",
                   help="paged mode runs each answer's context too, as the default mode must (like-for-like timing "
                        "of the attention ops); by default a question's answers fork one sequence of its context")
    p.add_argument("--output", default=None, help="write every metric to this JSON file")
    p.add_argument("--log_samples", action="store_true", help="add per-question log-likelihoods to the JSON")
    p.add_argument("--wandb", action="store_true", help="log to Weights & Biases (offline unless configured)")
    p.add_argument("--wandb_project", default="fms-eval")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)



def eval_main(argv=None) -> dict:
    """Run the evaluation; returns the report. Raises EvalError (a ValueError) on bad input."""
    args = eval_args(argv)
    options = {k: v for k, v in vars(args).items() if k not in ("no_warmup", "no_progress", "no_share_context")}
    return run_eval(EvalConfig(**options, warmup=not args.no_warmup, progress=not args.no_progress,
                               share_context=not args.no_share_context))


def eval_cli(argv=None) -> int:
    try:
        eval_main(argv)
    except (ValueError, FileNotFoundError) as e:  # EvalError, and model / tokenizer set-up errors
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


# -- fms bench latency (one batch end to end, like vllm bench latency) ------------------------------------
def latency_parser() -> argparse.ArgumentParser:
    from fms.entrypoints.engine_args import add_engine_arguments, add_model_arguments

    p = _Parser(prog="fms bench latency", description="End-to-end latency of one batch of requests on the engine: "
                "random prompts of --input-len tokens, --output-len new tokens each (EOS ignored), timed "
                "--num-iters times after --num-iters-warmup untimed runs.")
    add_model_arguments(p)
    add_engine_arguments(p)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--num-iters-warmup", type=int, default=1)
    p.add_argument("--num-iters", type=int, default=3)
    p.add_argument("--output-json", type=Path, default=None)
    return p


def latency_main(argv=None) -> dict:
    from fms.entrypoints.engine_args import build_engine
    from fms.entrypoints.bench_serve import _commit, _percentiles, random_requests
    from fms.serving import SamplingParams

    argv = list(sys.argv[1:] if argv is None else argv)
    args = latency_parser().parse_args(argv)
    for name in ("batch_size", "input_len", "output_len", "num_iters"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    engine, loaded = build_engine(args)
    vocab_size = engine.model.config.vocab_size
    prompts = [r.prompt for r in random_requests(args.batch_size, args.input_len, 1, 0.0, vocab_size, args.seed)]
    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True)

    def run_once() -> float:
        start = time.perf_counter()
        engine.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - start

    for _ in range(args.num_iters_warmup):
        run_once()
    latencies = [run_once() for _ in range(args.num_iters)]
    report = {"command": " ".join(shlex.quote(a) for a in ["fms", "bench", "latency", *argv]), "commit": _commit(),
              "device": str(engine.model.cache_spec().device), "model": loaded.name,
              "batch_size": args.batch_size, "input_len": args.input_len, "output_len": args.output_len,
              "latencies_s": latencies, "avg_latency_s": sum(latencies) / len(latencies),
              **{k.replace("_e2el_ms", "_latency_ms"): v
                 for k, v in _percentiles(latencies, (10, 25, 50, 75, 90, 99), "e2el").items()}}
    print(f"avg latency {report['avg_latency_s']:.3f} s over {args.num_iters} iterations "
          f"(batch {args.batch_size}, {args.input_len} + {args.output_len} tokens)")
    if args.output_json is not None:
        args.output_json.parent.mkdir(parents=True, exist_ok=True)
        args.output_json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.output_json}")
    return report


# -- fms bench startup (start-up by phase, cold and warm, scripts/bench_startup.py) -----------------------
def startup_parser() -> argparse.ArgumentParser:
    from fms.entrypoints.engine_args import DTYPE_NAMES, add_engine_arguments

    p = _Parser(prog="fms bench startup", description=STARTUP_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("start-up benchmark")
    g.add_argument("--models", default=None,
                   help="comma list of ARCHITECTURE:VARIANT (random weights); default: "
                        f"{','.join(DEFAULT_MODELS['cuda'])} on CUDA, {','.join(DEFAULT_MODELS['cpu'])} on CPU")
    g.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    g.add_argument("--dtype", default=None, choices=DTYPE_NAMES, help="default: bf16 on CUDA, fp32 on CPU")
    g.add_argument("--seed", type=int, default=0, help="random weights' and the prompt's seed")
    g.add_argument("--timeout", type=float, default=StartupBenchConfig.timeout_s,
                   help="seconds each child process may run before it is killed and recorded as timed out")
    g.add_argument("--prompt-len", type=int, default=StartupBenchConfig.prompt_len,
                   help="the first generate(): one request of this many random tokens")
    g.add_argument("--max-tokens", type=int, default=StartupBenchConfig.max_tokens,
                   help="the first generate()'s new tokens (EOS ignored)")
    g.add_argument("--runs", default="cold,warm",
                   help="cold,warm (default), cold, or warm alone on the caches a cold run left in --cache-dir")
    g.add_argument("--cache-dir", type=Path, default=None,
                   help="keep the compile caches in CACHE_DIR/<model>/{inductor,triton} (default: temporary folders, "
                        "removed after each model); a cold run needs them empty")
    g.add_argument("--checkpoint", action="store_true",
                   help="time get_model('hf_pretrained') on a HF checkpoint of each model's shape (random weights, "
                        "written once before the runs, untimed) instead of drawing random weights; adds load GB/s")
    g.add_argument("--checkpoint-dir", type=Path, default=None,
                   help="with --checkpoint: keep the checkpoints in CHECKPOINT_DIR/<model>/ and reuse them in later "
                        "runs (default: temporary folders, removed after each model)")
    g.add_argument("--output", type=Path, default=StartupBenchConfig.output,
                   help="the results JSON (written after every child process)")
    add_engine_arguments(p)
    return p


def startup_config(argv=None, program=STARTUP_PROGRAM) -> StartupBenchConfig:
    from fms.entrypoints.engine_args import engine_config

    parser = startup_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    try:
        if args.tensor_parallel_size != 1:
            raise ValueError(f"--tensor-parallel-size must be 1 here (one process per start), got "
                             f"{args.tensor_parallel_size}")
        engine = engine_config(args)
        # only the options given: the child's engine takes its device defaults for the rest
        engine_options = {f.name: getattr(engine, f.name) for f in fields(engine)
                          if getattr(engine, f.name) != f.default}
        config = StartupBenchConfig(
            models=_names(args.models) if args.models is not None else None, device=args.device, dtype=args.dtype,
            seed=args.seed, engine_options=engine_options, timeout_s=args.timeout, prompt_len=args.prompt_len,
            max_tokens=args.max_tokens, runs=_names(args.runs), cache_dir=args.cache_dir,
            checkpoint=args.checkpoint, checkpoint_dir=args.checkpoint_dir, output=args.output,
            command=" ".join(shlex.quote(a) for a in [*program, *argv]))
        config.check_cache_dir()
        return config
    except ValueError as exc:
        parser.error(str(exc))


def startup_main(argv=None, program=STARTUP_PROGRAM) -> dict:
    return run_startup_benchmark(startup_config(argv, program))


# -- fms bench targets (issue 19's table, scripts/bench_targets.py) ------------------------------------------
def targets_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fms bench targets", description=TARGETS_DOC,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=",".join(ROW_NAMES),
                   help=f"comma list of rows (default: all): {', '.join(ROW_NAMES)}")
    p.add_argument("--repeats", type=int, default=TargetsConfig.repeats,
                   help="runs of each chosen row's job, in rounds")
    p.add_argument("--timeout", type=float, default=TargetsConfig.timeout_s,
                   help="seconds each run may take before it is killed (with its children) and recorded as timed out")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for all runs together (a device call's limit): each run's timeout is at most what is "
                        "left of it, and runs with nothing left are recorded as skipped")
    p.add_argument("--output", type=Path, default=None,
                   help="the results JSON, and FILE.md beside it (default when running: results/targets.json)")
    p.add_argument("--raw-dir", type=Path, default=None,
                   help="where each run's folder goes (its JSON and log); default: beside --output, <stem>_raw")
    p.add_argument("--device", default=None, choices=["cuda", "cpu"], help="default: cuda when available")
    p.add_argument("--commit", default=None, help="the commit to record when git cannot tell (a tree without .git)")
    p.add_argument("--compile-scope", default=None, choices=COMPILE_SCOPES,
                   help="the engine's --compile-scope for the start-up and serving rows (default: the engine's, layers)")
    p.add_argument("--from-results", type=Path, nargs="+", default=(), metavar="FILE",
                   help="run nothing: merge these targets JSONs (each row keeps every file's runs) and print the table")
    p.add_argument("--dry-run", action="store_true", help="print each job's command and run nothing")
    return p


def targets_config(argv=None, program=TARGETS_PROGRAM) -> TargetsConfig:
    parser = targets_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    try:
        return TargetsConfig(rows=_names(args.rows), repeats=args.repeats, timeout_s=args.timeout,
                             budget_s=args.budget, output=args.output,
                             raw_dir=args.raw_dir, device=args.device, commit=args.commit,
                             compile_scope=args.compile_scope,
                             from_results=tuple(args.from_results), dry_run=args.dry_run,
                             command=" ".join(shlex.quote(a) for a in [*program, *argv]))
    except ValueError as exc:
        parser.error(str(exc))


def targets_main(argv=None, program=TARGETS_PROGRAM) -> dict:
    return run_targets(targets_config(argv, program))
