"""Benchmark GPT-2 attention variants (standard, sliding window, ALiBi) on a contiguous and the paged KV cache.

Random weights; for each context length, variant and cache layout: prefill and per-token decode latency,
tokens/s, peak GPU memory, KV pages held (at the fullest point with one-shot prefill, and with chunked
prefill, where a sliding window lets pages go), and how many greedy tokens the paged run shares with
the contiguous run. Learned positions stop standard GPT-2 at n_positions (1024); the window (NoPE) and
ALiBi variants have no position table and run past it. Table on stdout; JSON + CSV in --results_dir.

    python scripts/benchmark_variants.py                                   # CPU: nano, short contexts
    python scripts/benchmark_variants.py --variant_size gpt2 --context_lengths 1024 4096 16384   # GPU
"""

import argparse
import csv
import json
import shlex
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from fms.models import get_model
from fms.cache.allocator import OutOfPagesError
from fms.cache.paged import SUPPORTED_PAGE_SIZES
from fms.utils import benchmarking as bench
from fms.utils.generation import generate

VARIANT_SIZES = {"nano": "nano", "gpt2": "gpt2"}  # --variant_size -> registered gpt2 variant
DEFAULT_WINDOW = {"nano": 32, "gpt2": 256}
COLUMNS = ("variant", "backend", "batch_size", "context_len", "max_new_tokens", "prefill_ms", "decode_ms_per_token",
           "e2e_latency_ms", "output_tokens_per_s", "decode_tokens_per_s", "peak_gpu_mem_allocated_gb",
           "kv_bytes_in_use", "pages_in_use", "pages_chunked_prefill", "matching_prefix", "skipped")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant_size", default="nano", choices=sorted(VARIANT_SIZES))
    p.add_argument("--variants", nargs="+", default=["standard", "window", "alibi"],
                   choices=["standard", "window", "alibi"])
    p.add_argument("--window", type=int, default=None, help="sliding window (default 32 for nano, 256 for gpt2)")
    p.add_argument("--contiguous_op", default="sdpa", choices=["sdpa", "flex"], help="op for the contiguous cache")
    p.add_argument("--context_lengths", type=int, nargs="+", default=None,
                   help="prompt lengths (default: 128 512 1536 on CPU; 512 960 2048 4096 8192 16384 on GPU)")
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--max_new_tokens", type=int, default=None, help="default 16 on CPU, 64 on GPU")
    p.add_argument("--page_size", type=int, default=16, choices=SUPPORTED_PAGE_SIZES)
    p.add_argument("--prefill_chunk", type=int, default=256, help="chunk of the pages_chunked_prefill pass")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per point (3 on GPU, 1 on CPU)")
    p.add_argument("--device_type", default=None, choices=["cuda", "cpu"], help="default: cuda if available")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"], help="default bf16 on GPU, fp32 on CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results_dir", default="results")
    args = p.parse_args(argv)
    on_gpu = (args.device_type or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    args.device_type = "cuda" if on_gpu else "cpu"
    args.context_lengths = args.context_lengths or ([512, 960, 2048, 4096, 8192, 16384] if on_gpu else [128, 512, 1536])
    args.max_new_tokens = args.max_new_tokens or (64 if on_gpu else 16)
    args.repeats = args.repeats or (3 if on_gpu else 1)
    args.window = args.window or DEFAULT_WINDOW[args.variant_size]
    for name in ("batch_size", "max_new_tokens", "repeats", "window", "prefill_chunk"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if min(args.context_lengths) < 1:
        p.error(f"--context_lengths must all be >= 1, got {args.context_lengths}")
    return args


def variant_overrides(name: str, window: int) -> dict:
    # A window over learned positions would still stop at n_positions; NoPE lifts that limit.
    return {"standard": {}, "window": dict(sliding_window=window, position_embedding_type="nope"),
            "alibi": dict(alibi=True)}[name]


def measure(model, prompts, backend, args, device) -> dict:
    new = args.max_new_tokens
    options = bench.cache_options(backend, args.page_size)
    bench.timed_generate(model, prompts, new, backend, **options)  # warm-up (kernels, allocator)
    timings = [bench.timed_repeat(model, prompts, new, backend, options, device) for _ in range(args.repeats)]
    row = bench.summarize(timings, len(prompts), sum(len(p) for p in prompts))
    row["decode_tokens_per_s"] = len(prompts) * 1e3 / row["decode_ms_per_token"] if row["decode_ms_per_token"] else None
    stats = bench.timed_generate(model, prompts, new, backend, record_stats=True, **options).kv_stats
    row.update(kv_bytes_in_use=stats.get("kv_bytes_in_use"), pages_in_use=stats.get("pages_in_use"))
    if backend == "paged":
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
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    backends = [args.contiguous_op, "paged"]
    rows = []
    for variant in args.variants:
        model = get_model("gpt2", VARIANT_SIZES[args.variant_size], device_type=args.device_type, data_type=dtype,
                          seed=args.seed, **variant_overrides(variant, args.window))
        limit = model.config.max_position_embeddings
        for context in args.context_lengths:
            prompts = bench.random_prompts(args.batch_size, context, model.config.vocab_size, args.seed)
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
                    bench.release_memory(device)
                    continue
                outputs = result.pop("outputs")
                if backend == args.contiguous_op:
                    reference = outputs
                elif reference is not None:
                    result["matching_prefix"] = matching_prefix(outputs, reference)
                rows.append(dict(point, **result))
                print(f"  {variant:8} {backend:5} context {context:6}: {result['e2e_latency_ms']:.1f} ms", flush=True)
        del model
        bench.release_memory(device)
    command = "python scripts/benchmark_variants.py " + shlex.join(sys.argv[1:])
    return {"metadata": bench.run_metadata(command, device), "config": dict(vars(args), dtype=dtype), "rows": rows}


def table(rows) -> str:
    header = ["variant", "backend", "context", "prefill ms", "decode ms/tok", "e2e ms", "out tok/s", "peak GB",
              "KV MB", "pages", "pages (chunked)", "same tokens", "note"]
    body = [[r["variant"], r["backend"], r["context_len"], r.get("prefill_ms"), r.get("decode_ms_per_token"),
             r.get("e2e_latency_ms"), r.get("output_tokens_per_s"), r.get("peak_gpu_mem_allocated_gb"),
             None if r.get("kv_bytes_in_use") is None else r["kv_bytes_in_use"] / 1e6, r.get("pages_in_use"),
             r.get("pages_chunked_prefill"), r.get("matching_prefix"), r.get("skipped")] for r in rows]
    return bench.markdown_table(header, body)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.device_type == "cuda":
        # The paged and flex ops share one compiled FlexAttention; every new prefill length is a
        # recompile, and past dynamo's default limit (8) it silently runs eager over the whole pool.
        import torch._dynamo

        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    results = run(args)
    out_dir = Path(args.results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"gpt2_variants_{args.variant_size}_{args.device_type}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    with stem.with_suffix(".csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results["rows"])
    print(table(results["rows"]))
    print(f"\nwrote {stem}.json and {stem}.csv")
    return results


if __name__ == "__main__":
    main()
