"""Benchmark static-batch inference per attention backend: latency, throughput, ms/token, GPU and KV memory.

Sweeps batch size (at a fixed context) and context length (at batch 1); at each point every backend in
--attn_name runs in turn (A, B, A, B, ...) on the same random prompts, EOS ignored. Writes a table to
stdout and results.json, points.csv and PNG plots under --results_dir/<run name>/.

    python scripts/benchmark_inference.py                                  # CPU: micro model, ~1 minute
    python scripts/benchmark_inference.py --attn_name sdpa,paged --profile standard --mixed --peers hf
    python scripts/benchmark_inference.py --variant 3.2-1b --batch_sizes 1,8,32 --context_lengths 512,2048
"""

import argparse
import gc
import json
import shlex
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from fms.models import get_config, get_model, list_variants, read_hf_config
from fms.modules.attention import attention_op_names, get_attention_op
from fms.cache.paged import SUPPORTED_PAGE_SIZES
from fms.utils import benchmarking as bench

ARCHITECTURES = ("llama", "granite", "granite_hybrid")

# auto variants: (GPU >= 24 GB, smaller GPU, CPU) -> candidates tried in order
AUTO_VARIANTS = {
    ("auto-llama", "llama"): (["2-7b"], ["3.2-1b"], ["micro"]),
    ("auto-granite", "granite_hybrid"): (["4.0-h-1b", "4.0-1b"], ["4.0-h-350m", "4.0-350m"], ["h-micro-test", "nano"]),
    ("auto-granite", "granite"): (["3.3-2b"], ["3.3-2b"], ["micro"]),
}


def profile_defaults(profile: str, device: torch.device) -> dict:
    if device.type != "cuda":
        return dict(batch_sizes=[1, 2, 4], base_context=64, context_lengths=[32, 64, 128], max_new_tokens=8,
                    repeats=1, mixed_requests=32, mixed_prompt_range=(8, 64), mixed_output_range=(4, 12),
                    memory_budget_gb=0.05)
    if profile == "light":
        return dict(batch_sizes=[1, 2, 4, 8], base_context=256, context_lengths=[128, 256, 512, 1024],
                    max_new_tokens=32, repeats=3, mixed_requests=32, mixed_prompt_range=(32, 256),
                    mixed_output_range=(8, 64), memory_budget_gb=2.0)
    return dict(batch_sizes=[1, 2, 4, 8, 16, 32], base_context=512, context_lengths=[128, 256, 512, 1024, 2048, 4096],
                max_new_tokens=64, repeats=3, mixed_requests=64, mixed_prompt_range=(32, 512),
                mixed_output_range=(16, 128), memory_budget_gb=8.0)


# ---------------------------------------------------------------------------------------------
# arguments
# ---------------------------------------------------------------------------------------------
def _int_list(values) -> list[int] | None:
    if values is None:
        return None
    out = []
    for v in values:
        for part in str(v).replace(",", " ").split():
            out.append(int(part))
    return out


def _range(text: str) -> tuple[int, int]:
    lo, hi = (int(x) for x in text.split(","))
    return lo, hi


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
    w.add_argument("--profile", default="standard", choices=["standard", "light"],
                   help="default sweeps; light for GPUs under 16 GB (the CPU always gets a small sweep)")
    w.add_argument("--sweep", default="both", choices=["both", "batch", "context", "none"])
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


def resolve_args(parser, argv):
    """Parse and check everything that can be checked before building the model."""
    args = parser.parse_args(argv)
    if args.device_type is None:
        args.device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device_type == "cuda" and not torch.cuda.is_available():
        parser.error("--device_type cuda: no CUDA GPU is available (use --device_type cpu)")
    device = torch.device(args.device_type)
    args.device = device

    args.backends = [b.strip() for b in args.attn_name.split(",") if b.strip()]
    if not args.backends:
        parser.error("--attn_name is empty; give one or more of " + ", ".join(attention_op_names()))
    for b in args.backends:
        try:
            get_attention_op(b)
        except ValueError:
            parser.error(f"--attn_name: unknown attention backend {b!r}; registered: {', '.join(attention_op_names())}")
    if len(set(args.backends)) != len(args.backends):
        parser.error(f"--attn_name lists a backend twice: {args.attn_name}")

    defaults = profile_defaults(args.profile, device)
    try:
        batch_sizes = _int_list(args.batch_sizes)
        context_lengths = _int_list(args.context_lengths)
    except ValueError as exc:
        parser.error(f"--batch_sizes / --context_lengths take integers: {exc}")
    args.explicit_contexts = context_lengths is not None or args.base_context is not None
    args.batch_sizes = batch_sizes if batch_sizes is not None else defaults["batch_sizes"]
    args.context_lengths = context_lengths if context_lengths is not None else defaults["context_lengths"]
    args.base_context = args.base_context if args.base_context is not None else defaults["base_context"]
    args.max_new_tokens = args.max_new_tokens if args.max_new_tokens is not None else defaults["max_new_tokens"]
    args.repeats = args.repeats if args.repeats is not None else defaults["repeats"]
    args.mixed_requests = args.mixed_requests or defaults["mixed_requests"]
    args.mixed_prompt_range = args.mixed_prompt_range or defaults["mixed_prompt_range"]
    args.mixed_output_range = args.mixed_output_range or defaults["mixed_output_range"]
    args.memory_budget_gb = args.memory_budget_gb or defaults["memory_budget_gb"]
    for name in ("batch_sizes", "context_lengths"):
        bad = [v for v in getattr(args, name) if v < 1]
        if bad:
            parser.error(f"--{name} must all be >= 1, got {bad}")
    for name in ("base_context", "base_batch", "max_new_tokens", "repeats", "mixed_requests"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.decode_window is not None and args.decode_window < 1:
        parser.error(f"--decode_window must be >= 1, got {args.decode_window}")
    if args.cuda_graphs and args.decode_window is None:
        parser.error("--cuda_graphs applies to decode windows: give --decode_window too")
    if args.cuda_graphs and device.type != "cuda":
        parser.error("--cuda_graphs needs --device_type cuda")
    args.decode = None
    if args.decode_window is not None:
        args.decode = {"decode_window": args.decode_window, "cuda_graphs": args.cuda_graphs,
                       "compile_decode": args.compile}
    if args.memory_budget_gb <= 0:
        parser.error(f"--memory_budget_gb must be > 0, got {args.memory_budget_gb}")
    try:
        args.workload = bench.MixedWorkload(args.mixed_requests, tuple(args.mixed_prompt_range),
                                            tuple(args.mixed_output_range), args.seed)
    except ValueError as exc:
        parser.error(f"--mixed: {exc}")
    args.peers = [x.strip() for x in (args.peers or "").split(",") if x.strip()]
    bad = [x for x in args.peers if x != "hf"]
    if bad:
        parser.error(f"--peers: unknown peer {bad}; allowed: hf")

    args.candidates = model_candidates(parser, args)
    config = first_config(parser, args)
    args.max_position_embeddings = config.max_position_embeddings
    check_lengths(parser, args, config)
    return args


def model_candidates(parser, args) -> list[tuple[str, str]]:
    """(architecture, variant) to try in order; auto variants depend on the device."""
    if args.model_path is not None:
        return [("hf_pretrained", Path(args.model_path).name)]
    variant = args.variant or ("auto-llama" if args.architecture == "llama" else "auto-granite")
    if not variant.startswith("auto-"):
        if variant not in list_variants(args.architecture):
            parser.error(f"--variant: unknown variant {variant!r} for {args.architecture}; "
                         f"allowed: {', '.join(list_variants(args.architecture))}, auto-llama, auto-granite")
        return [(args.architecture, variant)]
    key = (variant, args.architecture)
    if key not in AUTO_VARIANTS:
        allowed = sorted({f"{v} (--architecture {a})" for v, a in AUTO_VARIANTS})
        parser.error(f"--variant {variant} does not apply to --architecture {args.architecture}; allowed: "
                     + ", ".join(allowed))
    large, small, cpu = AUTO_VARIANTS[key]
    if args.device.type != "cuda":
        chosen = cpu
    else:
        total_gb = torch.cuda.get_device_properties(args.device).total_memory / 2**30
        chosen = large if total_gb >= 23.5 else small  # "24 GB" cards report a little under 24 GiB
    return [(args.architecture, v) for v in chosen]


def first_config(parser, args):
    arch, variant = args.candidates[0]
    try:
        if arch == "hf_pretrained":
            return read_hf_config(args.model_path)[1]
        return get_config(arch, variant)
    except (ValueError, FileNotFoundError) as exc:
        parser.error(str(exc))


def check_lengths(parser, args, config):
    """Explicit lengths that do not fit the model are an error; profile defaults are clipped to fit."""
    limit = config.max_position_embeddings
    new = args.max_new_tokens
    contexts = list(args.context_lengths) + [args.base_context]
    too_long = sorted({c for c in contexts if c + new > limit})
    if too_long:
        if args.explicit_contexts or new >= limit:
            parser.error(f"context {too_long[-1]} + max_new_tokens {new} = {too_long[-1] + new} tokens is longer "
                         f"than the model's max_position_embeddings ({limit})")
        fit = limit - new
        print(f"note: the profile's contexts {too_long} + {new} new tokens exceed the model's {limit} positions; "
              f"measuring {fit} instead")
        args.context_lengths = sorted({min(c, fit) for c in args.context_lengths})
        args.base_context = min(args.base_context, fit)
    if args.mixed and args.workload.max_len > limit:
        parser.error(f"--mixed: prompt {args.workload.prompt_range[1]} + output {args.workload.output_range[1]} "
                     f"tokens is longer than the model's max_position_embeddings ({limit})")


# ---------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------
def build_model(args):
    dtype = None if args.dtype == "auto" else args.dtype
    errors = []
    for arch, variant in args.candidates:
        try:
            if arch == "hf_pretrained":
                model = get_model("hf_pretrained", model_path=args.model_path, device_type=args.device.type,
                                  data_type=dtype, attn_name=args.backends[0])
                arch = read_hf_config(args.model_path)[0]
            else:
                model = get_model(arch, variant, device_type=args.device.type, data_type=dtype,
                                  attn_name=args.backends[0], seed=args.seed)
        except Exception as exc:  # noqa: BLE001 - e.g. a hybrid variant that fails to build: try the next
            errors.append(f"{arch} {variant}: {type(exc).__name__}: {exc}")
            print(f"could not build {arch} {variant} ({type(exc).__name__}: {exc})"
                  + ("; trying the next candidate" if (arch, variant) != args.candidates[-1] else ""))
            continue
        return model, arch, variant
    raise SystemExit("no model could be built:\n  " + "\n  ".join(errors))


def describe_model(model, arch, variant, args) -> dict:
    spec = model.cache_spec()
    info = {
        "architecture": arch,
        "variant": variant,
        "model_path": args.model_path,
        "weights": "checkpoint" if args.model_path else f"random (seed {args.seed})",
        "dtype": str(model.embedding.weight.dtype).replace("torch.", ""),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "max_position_embeddings": model.config.max_position_embeddings,
        "kv_bytes_per_token": spec.kv_bytes_per_token,
        "attention_layers": len(spec.attention_layers),
        "num_layers": spec.num_layers,
    }
    if args.device.type == "cuda":
        info["weights_gpu_memory_gb"] = torch.cuda.memory_allocated(args.device) / bench.GB
    return info


def raise_recompile_limit(args, limit: int = 256) -> None:
    """Every sweep point is a new shape for the compiled FlexAttention (dynamic=False) and for --compile.

    Past dynamo's recompile limit (8 by default) a function silently runs eagerly, and eager
    FlexAttention on a GPU is far slower: the later points would measure that instead.
    """
    if args.device.type != "cuda" and not args.compile:
        return
    import torch._dynamo

    config = torch._dynamo.config
    for name, value in (("recompile_limit", limit), ("cache_size_limit", limit),
                        ("accumulated_recompile_limit", 4 * limit), ("accumulated_cache_size_limit", 4 * limit)):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), value))


class Compiled:
    """torch.compile of the model's forward that can fall back to eager when compilation fails.

    dynamic=None (dynamo's default): a size is static until a call changes it, then that dim becomes
    symbolic and stays so (a growing contiguous cache, a new batch size or pool size: one recompile
    each, not one per step or per point); sizes fixed by the model (heads, head_dim, state) never
    change and stay static. Size 1 is always specialized: batch-1 steps get graphs of their own.
    Counts the graphs dynamo compiles per (backend, step kind) and the graph breaks.
    """

    def __init__(self, model, enabled: bool, backend: str = "inductor", scope: str = "all"):
        self.model = model
        self.backend = backend
        self.scope = scope  # "decode": multi-token (prefill) steps run the eager forward
        self._eager = model.forward
        self.active = False
        self.error = None
        self.fell_back_at = None
        self.graphs: dict[str, dict[str, int]] = {}
        self._breaks_before = {}
        if enabled:
            try:
                from torch._dynamo.utils import counters

                self._breaks_before = dict(counters["graph_break"])
                model.forward = self._counted(torch.compile(model.forward, backend=backend))
                self.active = True
            except Exception as exc:  # noqa: BLE001
                self.fail(exc)

    def _counted(self, forward):
        from torch._dynamo.utils import counters

        def run(input_ids, *args, **kwargs):
            if self.scope == "decode" and input_ids.shape[1] != 1:
                return self._eager(input_ids, *args, **kwargs)
            before = counters["stats"]["unique_graphs"]
            out = forward(input_ids, *args, **kwargs)
            new = counters["stats"]["unique_graphs"] - before
            if new:
                backend = kwargs.get("attn_name") or self.model.attn_name
                kind = "decode" if input_ids.shape[1] == 1 else "prefill"  # one token per row, or several
                per_kind = self.graphs.setdefault(backend, {"prefill": 0, "decode": 0})
                per_kind[kind] += new
            return out

        return run

    def fail(self, exc, where: str | None = None) -> None:
        self.error = f"{type(exc).__name__}: {exc}"[:2000]
        self.fell_back_at = where
        print(f"torch.compile failed{f' at {where}' if where else ''} ({self.error.splitlines()[0][:300]}); "
              "continuing in eager mode")
        self.off()

    def off(self) -> None:
        if "forward" in vars(self.model):
            del self.model.forward
        self.active = False

    def run(self, fn, where: str | None = None):
        """fn(), and once more in eager mode if it fails while the forward is compiled."""
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - a compiled forward may fail on a new shape
            if not self.active:
                raise
            self.fail(exc, where)
            return fn()

    def summary(self, requested: bool) -> dict:
        """What results.json records: whether the runs were compiled, and how often dynamo compiled."""
        from torch._dynamo.utils import counters

        breaks = {reason.splitlines()[0][:300]: n - self._breaks_before.get(reason, 0)
                  for reason, n in counters["graph_break"].items() if n > self._breaks_before.get(reason, 0)}
        return {
            "requested": requested,
            "active": self.active,  # still compiled at the end
            "fell_back_to_eager": requested and not self.active,
            "fell_back_at": self.fell_back_at,
            "error": self.error,
            "mode": f"torch.compile(model.forward, backend={self.backend!r}), dynamic=None" if requested else None,
            "scope": self.scope if requested else None,  # all steps, or decode steps only
            "graphs": self.graphs,  # backend -> {"prefill": n, "decode": n} graphs compiled
            "graph_breaks": breaks,
        }


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
def progress(iterable, args, **kwargs):
    if args.no_progress:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, file=sys.stderr, dynamic_ncols=True, **kwargs)


def run_sweeps(model, args, compiled, wandb_run, reference_outputs) -> list[dict]:
    if args.sweep == "none":
        return []
    batch_sizes = args.batch_sizes if args.sweep in ("both", "batch") else []
    contexts = args.context_lengths if args.sweep in ("both", "context") else []
    points = bench.sweep_points(batch_sizes, args.base_context, contexts, args.base_batch)
    rows = []
    bar = progress(points, args, desc="points", unit="point")
    for point in bar:
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(f"batch {point.batch_size} context {point.context_len}")
        def measure():
            return bench.measure_point(model, point, args.backends, args.max_new_tokens, repeats=args.repeats,
                                       warmup=args.warmup, seed=args.seed, page_size=args.page_size,
                                       device=args.device, decode=args.decode)

        point_rows = compiled.run(measure, f"batch {point.batch_size} context {point.context_len}")
        for r in point_rows:
            r["compiled"] = compiled.active
        reference_outputs[(point.batch_size, point.context_len)] = point_rows[0].pop("outputs", None)
        for r in point_rows[1:]:
            r.pop("outputs", None)
        bench.log_wandb_points(wandb_run, point_rows, "points")
        rows += point_rows
    return rows


def run_mixed(model, args, wandb_run) -> dict:
    w = args.workload
    print(f"\nmixed workload: {w.num_requests} requests, prompts {w.prompt_range[0]}-{w.prompt_range[1]} tokens, "
          f"outputs {w.output_range[0]}-{w.output_range[1]} tokens (seed {w.seed}), one static batch per backend")
    runs = bench.measure_mixed(model, w, args.backends, repeats=args.repeats, warmup=args.warmup,
                               page_size=args.page_size, device=args.device)
    bench.log_wandb_points(wandb_run, runs, "mixed")
    verify = args.device.type == "cuda" or args.memory_budget_gb <= 1.0
    capacity = []
    for backend in args.backends:
        try:
            capacity.append(bench.kv_capacity(model, w, backend, args.memory_budget_gb, args.page_size,
                                              verify=verify))
        except Exception as exc:  # noqa: BLE001 - a capacity search failure must not lose the measurements
            print(f"capacity search for {backend} failed: {type(exc).__name__}: {exc}")
    return {"workload": {"num_requests": w.num_requests, "prompt_range": list(w.prompt_range),
                         "output_range": list(w.output_range), "seed": w.seed},
            "note": "paged pool sized to the workload (sum of ceil((prompt+output)/page_size) pages); contiguous "
                    "cache holds max(prompt)+max(output) tokens per row. Largest batch is computed from the "
                    "per-row / per-page bytes measured on real caches"
                    + (", and checked by allocating it" if verify else ""),
            "runs": runs, "capacity": capacity}


def run_peers(model, arch, args, reference_outputs) -> list[dict]:
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("--peers hf: transformers is not installed; skipping the HF peers (pip install transformers)")
        return []
    try:
        hf_model = bench.hf_twin(model, arch)
    except Exception as exc:  # noqa: BLE001
        print(f"--peers hf: could not build the HF model from ours ({type(exc).__name__}: {exc}); skipping")
        return []
    if args.device.type != "cuda":
        print("--peers hf: note HF continuous batching (generate_batch) is slow on the CPU")
    peers = []
    keys = list(reference_outputs)
    for batch_size, context_len in progress(keys, args, desc="hf peers", unit="point"):
        prompts = bench.random_prompts(batch_size, context_len, model.config.vocab_size, args.seed)
        for name, fn in (("hf_generate", bench.hf_generate_point),
                         ("hf_generate_batch", bench.hf_generate_batch_point)):
            row = {"peer": name, "batch_size": batch_size, "context_len": context_len,
                   "max_new_tokens": args.max_new_tokens}
            try:
                result = fn(hf_model, prompts, args.max_new_tokens, repeats=args.repeats, warmup=args.warmup,
                            device=args.device)
                ref = reference_outputs[(batch_size, context_len)]
                outs = result.pop("outputs")
                row.update(result)
                row["tokens_match_fms"] = None if ref is None else bench.token_agreement(outs, ref)
                if name == "hf_generate":
                    row["attn_implementation"] = "sdpa"
            except Exception as exc:  # noqa: BLE001 - a peer failing is reported, never fatal
                row["error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
                print(f"--peers hf: {name} failed at batch {batch_size} context {context_len}: {row['error']}")
            peers.append(row)
    del hf_model
    bench.release_memory(args.device)
    return peers


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = resolve_args(parser, argv)
    torch.manual_seed(args.seed)

    model, arch, variant = build_model(args)
    model_info = describe_model(model, arch, variant, args)
    where = "the CPU" if args.device.type == "cpu" else bench.device_name(args.device)
    if args.device.type == "cpu" and args.model_path is None:
        print(f"no GPU: running the small built-in model {arch} {variant} with random weights on the CPU")
    else:
        print(f"model: {arch} {variant} ({model_info['weights']} weights, {model_info['dtype']}) on {where}")
    print(f"backends: {', '.join(args.backends)} | max_new_tokens {args.max_new_tokens} | repeats {args.repeats} "
          f"| warmup {args.warmup} | page_size {args.page_size}")
    if args.device.type == "cuda" and args.profile == "standard" and \
            torch.cuda.get_device_properties(args.device).total_memory < 16 * 2**30:
        print("note: this GPU has < 16 GB; --profile light (make bench-llama-t4) may fit better")
    if args.compile and args.warmup == 0:
        print("note: --compile with --warmup 0: the timed runs include dynamo's compilation")
    raise_recompile_limit(args)
    # with decode windows, --compile compiles the window step (the Generator's runner), not model.forward
    compiled = Compiled(model, args.compile and args.decode is None, args.compile_backend, args.compile_scope)

    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_name = args.run_name or f"{arch}-{variant}-{'_'.join(args.backends)}-{stamp}".replace("/", "_")
    results_dir = Path(args.results_dir) / run_name
    command = " ".join(shlex.quote(a) for a in ["scripts/benchmark_inference.py", *argv])
    config = {k: v for k, v in vars(args).items() if k not in ("device", "workload", "candidates", "decode")}
    config["device"] = str(args.device)
    wandb_run = bench.start_wandb({**config, **model_info}, results_dir, run_name, args.wandb_project) \
        if args.wandb else None

    reference_outputs: dict = {}
    points = run_sweeps(model, args, compiled, wandb_run, reference_outputs)
    bench.release_memory(args.device)
    mixed = compiled.run(lambda: run_mixed(model, args, wandb_run), "mixed workload") if args.mixed else None
    if mixed:
        mixed["compiled"] = compiled.active
    bench.release_memory(args.device)
    config["compile"] = compiled.summary(args.compile and args.decode is None)
    if args.decode is not None:
        config["compile"]["decode_windows"] = {
            **args.decode,
            "note": ("timed runs go through one Generator per backend and point (cache, CUDA graphs); the window "
                     "step is compiled by DecodeWindowRunner (dynamic=True) when compile_decode, prefill eager. "
                     "Every backend's Generator stays allocated for the point, so peak GPU memory includes all of "
                     "their caches; compare KV bytes, not peak memory, between backends"),
        }
    if args.compile and args.decode is None:
        print(f"compile: graphs {config['compile']['graphs']}, graph breaks "
              f"{sum(config['compile']['graph_breaks'].values())}"
              + (f"; fell back to eager at {compiled.fell_back_at}" if not compiled.active else ""))
    peers = []
    if args.peers:
        compiled.off()  # the HF twin copies weights from the plain module
        peers = run_peers(model, arch, args, reference_outputs)
        bench.log_wandb_points(wandb_run, [{**p, "backend": p["peer"]} for p in peers], "peers")

    results = {
        "meta": bench.run_metadata(command, args.device),
        "model": model_info,
        "config": config,
        "figures": list(bench.FIGURES),
        "points": points,
        "mixed": mixed,
        "peers": peers,
    }
    paths = bench.write_results(results_dir, results)
    plots = bench.plot_results(results, results_dir)
    results["paths"] = {**{k: str(v) for k, v in paths.items()}, "plots": {k: str(v) for k, v in plots.items()}}
    paths["json"].write_text(json.dumps(bench._jsonable(results), indent=2) + "\n")

    tables = [f"# {arch} {variant} on {results['meta']['device']}\n\n`{command}`"]
    if points:
        tables.append("## all points\n" + bench.points_table(points))
        tables.append("## side by side\n" + bench.side_by_side_tables(points, args.backends))
    if mixed:
        tables.append("## mixed-length workload\n" + mixed["note"] + "\n\n" + bench.mixed_tables(mixed))
    if peers:
        tables.append("## HF transformers peers (same weights, same prompts)\n= fms: share of tokens before the first "
                      "difference from our first backend's (random weights give near-tied logits, so < 1 is "
                      "expected in bf16)\n\n" + bench.peers_table(peers))
    text = "\n\n".join(tables) + "\n"
    print("\n" + text)
    (results_dir / "tables.md").write_text(text)
    decode_sample(args, points)
    bench.finish_wandb(wandb_run, results, plots)
    print(f"results: {paths['json']}  {paths['csv']}  plots: {', '.join(p.name for p in plots.values())}")
    if any(p.get("matches_generate") is False for p in points):
        print("note: at some points the timed loop's tokens differ from generate()'s (generate_agreement = "
              "share of tokens before the first difference). Same "
              "steps, so this is numerics: random weights give near-tied logits, and in bf16 a kernel choice that "
              "depends on memory alignment can flip a greedy pick. With fp32 on the CPU they match exactly.")
    del model
    gc.collect()
    return 0


def decode_sample(args, points):
    if not args.tokenizer or not points:
        return
    try:
        from fms.utils.tokenizers import get_tokenizer

        tokenizer = get_tokenizer(args.tokenizer)
        text = tokenizer.decode(points[0]["sample_output"])
        print(f"sample output ({points[0]['backend']}, first row, random prompt): {text!r}")
    except Exception as exc:  # noqa: BLE001 - decoding is cosmetic
        print(f"--tokenizer: could not decode a sample ({type(exc).__name__}: {exc})")


if __name__ == "__main__":
    sys.exit(main())
