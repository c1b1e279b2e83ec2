"""GPT-2 attention variants (standard, sliding window, ALiBi) on a contiguous and the paged KV cache: timings, pages."""

import csv
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from fms.bench.compiled import recompile_limits
from fms.bench.results import run_metadata, write_json
from fms.bench.static import cache_options, summarize, timed_generate, timed_repeat
from fms.bench.tables import markdown_table
from fms.bench.timing import release_memory
from fms.bench.workloads import random_prompts
from fms.cache.allocator import OutOfPagesError
from fms.cache.paged import SUPPORTED_PAGE_SIZES
from fms.models import get_model
from fms.modules.attention import attention_op_names, get_attention_op
from fms.utils.generation import generate

VARIANT_SIZES = {"nano": "nano", "gpt2": "gpt2"}  # --variant_size -> registered gpt2 variant
DEFAULT_WINDOW = {"nano": 32, "gpt2": 256}
COLUMNS = ("variant", "backend", "batch_size", "context_len", "max_new_tokens", "prefill_ms", "decode_ms_per_token",
           "e2e_latency_ms", "output_tokens_per_s", "decode_tokens_per_s", "peak_gpu_mem_allocated_gb",
           "kv_bytes_in_use", "pages_in_use", "pages_chunked_prefill", "matching_prefix", "skipped")


VARIANTS = ("standard", "window", "alibi")


@dataclass
class VariantsBenchConfig:
    """One variants run; None fields take the device's defaults (GPU: long contexts, 3 repeats; CPU: short, 1)."""

    variant_size: str = "nano"
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    window: int | None = None
    contiguous_op: str = "sdpa"
    paged_op: str = "paged"
    context_lengths: list[int] | None = None
    batch_size: int = 1
    max_new_tokens: int | None = None
    page_size: int = 16
    prefill_chunk: int = 256
    repeats: int | None = None
    device_type: str | None = None
    dtype: str | None = None
    seed: int = 0
    results_dir: str = "results"
    command: str = "scripts/benchmark_variants.py"

    def __post_init__(self):
        on_gpu = (self.device_type or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
        self.device_type = "cuda" if on_gpu else "cpu"
        if self.variant_size not in VARIANT_SIZES:
            raise ValueError(f"variant_size must be one of {', '.join(VARIANT_SIZES)}, got {self.variant_size!r}")
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown or not self.variants:
            raise ValueError(f"variants: unknown {unknown}; allowed: {', '.join(VARIANTS)}")
        for name in ("contiguous_op", "paged_op"):
            if getattr(self, name) not in attention_op_names():
                raise ValueError(f"{name}: unknown attention op {getattr(self, name)!r}; "
                                 f"registered: {', '.join(attention_op_names())}")
        if not get_attention_op(self.paged_op).uses_pages or get_attention_op(self.contiguous_op).uses_pages:
            raise ValueError(f"paged_op must be an op whose cache is paged and contiguous_op one whose cache is not, "
                             f"got {self.paged_op!r} and {self.contiguous_op!r}")
        if self.page_size not in SUPPORTED_PAGE_SIZES:
            raise ValueError(f"page_size must be one of {SUPPORTED_PAGE_SIZES}, got {self.page_size}")
        self.context_lengths = self.context_lengths or ([512, 960, 2048, 4096, 8192, 16384] if on_gpu
                                                        else [128, 512, 1536])
        self.max_new_tokens = self.max_new_tokens or (64 if on_gpu else 16)
        self.repeats = self.repeats or (3 if on_gpu else 1)
        self.window = self.window or DEFAULT_WINDOW[self.variant_size]
        self.dtype = self.dtype or ("bf16" if on_gpu else "fp32")
        for name in ("batch_size", "max_new_tokens", "repeats", "window", "prefill_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if min(self.context_lengths) < 1:
            raise ValueError(f"context_lengths must all be >= 1, got {self.context_lengths}")


def variant_overrides(name: str, window: int) -> dict:
    # A window over learned positions would still stop at n_positions; NoPE lifts that limit.
    return {"standard": {}, "window": dict(sliding_window=window, position_embedding_type="nope"),
            "alibi": dict(alibi=True)}[name]


def measure(model, prompts, backend, args, device) -> dict:
    """Timings and KV pages of one (variant, backend, context); args: the VariantsBenchConfig."""
    new = args.max_new_tokens
    options = cache_options(backend, args.page_size)
    timed_generate(model, prompts, new, backend, **options)  # warm-up (kernels, allocator)
    timings = [timed_repeat(model, prompts, new, backend, options, device) for _ in range(args.repeats)]
    row = summarize(timings, len(prompts), sum(len(p) for p in prompts))
    row["decode_tokens_per_s"] = len(prompts) * 1e3 / row["decode_ms_per_token"] if row["decode_ms_per_token"] else None
    stats = timed_generate(model, prompts, new, backend, record_stats=True, **options).kv_stats
    row.update(kv_bytes_in_use=stats.get("kv_bytes_in_use"), pages_in_use=stats.get("pages_in_use"))
    if get_attention_op(backend).uses_pages:  # pages a sliding window lets go during a chunked prefill
        _, chunked = generate(model, prompts, new, attn_name=backend, prefill_chunk_size=args.prefill_chunk,
                              return_stats=True, **options)
        row["pages_chunked_prefill"] = chunked.get("pages_in_use")
    row["outputs"] = timings[0].outputs
    return row


def matching_prefix(outputs, reference) -> int:
    """Greedy tokens equal to the contiguous run's before the first difference (min over rows).

    Random weights give near-tied logits, so in bf16 the two layouts' rounding can flip a token
    early; run with --dtype fp32 for a token-exact comparison.
    """
    def prefix(a, b):
        return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))

    return min(prefix(a, b) for a, b in zip(outputs, reference))


def run(args) -> dict:
    device = torch.device(args.device_type)
    dtype = args.dtype
    backends = [args.contiguous_op, args.paged_op]
    rows = []
    for variant in args.variants:
        model = get_model("gpt2", VARIANT_SIZES[args.variant_size], device_type=args.device_type, data_type=dtype,
                          seed=args.seed, **variant_overrides(variant, args.window))
        limit = model.config.max_position_embeddings
        for context in args.context_lengths:
            prompts = random_prompts(args.batch_size, context, model.config.vocab_size, args.seed)
            reference = None
            for backend in backends:
                point = dict(variant=variant, backend=backend, batch_size=args.batch_size, context_len=context,
                             max_new_tokens=args.max_new_tokens)
                if context + args.max_new_tokens > limit:
                    rows.append(dict(point, skipped=f"> {limit} positions"))
                    continue
                try:
                    result = measure(model, prompts, backend, args, device)
                except (torch.cuda.OutOfMemoryError, OutOfPagesError) as e:
                    rows.append(dict(point, skipped=f"out of memory ({type(e).__name__})"))
                    release_memory(device)
                    continue
                outputs = result.pop("outputs")
                if backend == args.contiguous_op:
                    reference = outputs
                elif reference is not None:
                    result["matching_prefix"] = matching_prefix(outputs, reference)
                rows.append(dict(point, **result))
                print(f"  {variant:8} {backend:5} context {context:6}: {result['e2e_latency_ms']:.1f} ms", flush=True)
        del model
        release_memory(device)
    return {"metadata": run_metadata(args.command, device), "config": asdict(args), "rows": rows}


def table(rows) -> str:
    header = ["variant", "backend", "context", "prefill ms", "decode ms/tok", "e2e ms", "out tok/s", "peak GB",
              "KV MB", "pages", "pages (chunked)", "same tokens", "note"]
    body = [[r["variant"], r["backend"], r["context_len"], r.get("prefill_ms"), r.get("decode_ms_per_token"),
             r.get("e2e_latency_ms"), r.get("output_tokens_per_s"), r.get("peak_gpu_mem_allocated_gb"),
             None if r.get("kv_bytes_in_use") is None else r["kv_bytes_in_use"] / 1e6, r.get("pages_in_use"),
             r.get("pages_chunked_prefill"), r.get("matching_prefix"), r.get("skipped")] for r in rows]
    return markdown_table(header, body)




def run_variants_benchmark(config: VariantsBenchConfig) -> dict:
    """Every variant x context x backend; writes gpt2_variants_<size>_<device>.json and .csv, prints the table."""
    # the paged and flex ops share one compiled FlexAttention; every new prefill length is a recompile
    with recompile_limits(config.device_type == "cuda", limit=64):
        results = run(config)
    stem = Path(config.results_dir) / f"gpt2_variants_{config.variant_size}_{config.device_type}"
    write_json(stem.with_suffix(".json"), results)
    with stem.with_suffix(".csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results["rows"])
    print(table(results["rows"]))
    print(f"\nwrote {stem}.json and {stem}.csv")
    return results
