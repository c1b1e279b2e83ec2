"""Offline serving throughput of LLMEngine (continuous batching over the paged cache), optionally vs HF.

Workload: N requests with prompt lengths drawn uniformly from a seeded range and a fixed (or ranged)
number of new tokens, EOS ignored, random token ids; or prompts and reply lengths from a
ShareGPT-style JSON (--dataset). All requests arrive at t=0, so time to first token includes queueing.

    python scripts/benchmark_serving.py --results_dir results                       # CUDA: llama 3.2-1b bf16
    python scripts/benchmark_serving.py --results_dir results --peers hf            # + HF generate_batch
    python scripts/benchmark_serving.py --results_dir results --dataset sharegpt.json --tokenizer PATH

On CPU the defaults shrink to a demo (llama "micro", 8 requests of 16-32 + 8 tokens) that finishes in well under a
minute; its numbers say the engine runs, not how fast it is. Writes serving.json and serving.csv.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fms.models import get_model  # noqa: E402
from fms.serving import LLMEngine, SamplingParams  # noqa: E402
from fms.utils import benchmarking as bench  # noqa: E402

CSV_COLUMNS = (
    "system", "num_requests", "duration_s", "requests_per_s", "output_tokens_per_s", "total_tokens_per_s",
    "ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p90_ms", "tpot_p99_ms",
    "itl_p50_ms", "itl_p90_ms", "itl_p99_ms",
    "peak_gpu_mem_allocated_gb", "kv_pool_gb", "num_preemptions", "prefix_cache_hit_rate", "cuda_graphs",
    "attn_implementation", "tokens_match_fms", "first_token_match_fms", "mean_common_prefix_tokens", "error",
)


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
    return p.parse_args(argv)


def sharegpt_workload(path: Path, tokenizer, num_requests: int, seed: int, max_len: int):
    """(prompts, output lengths) from [{"conversations": [{"value": human}, {"value": reply}, ...]}, ...]
    or [{"prompt": str, "completion": str}, ...]; pairs too short (< 4 tokens) or too long are skipped."""
    data = json.loads(path.read_text())
    pairs = []
    for item in data:
        if "conversations" in item and len(item["conversations"]) >= 2:
            pairs.append((item["conversations"][0]["value"], item["conversations"][1]["value"]))
        elif "prompt" in item:
            pairs.append((item["prompt"], item.get("completion", item.get("output", ""))))
    random.Random(seed).shuffle(pairs)
    prompts, outputs = [], []
    for prompt, reply in pairs:
        p, o = tokenizer.encode(prompt), len(tokenizer.encode(reply))
        if len(p) < 4 or o < 4 or len(p) + o > max_len:
            continue
        prompts.append(p)
        outputs.append(o)
        if len(prompts) == num_requests:
            break
    if not prompts:
        raise ValueError(f"no usable prompt/reply pairs in {path} (need >= 4 tokens each, <= {max_len} in all)")
    return prompts, outputs


def percentiles_ms(values, prefix):
    if not values:
        return {f"{prefix}_p{q}_ms": None for q in (50, 90, 99)}
    ordered = sorted(values)

    def pick(q):
        return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] * 1e3

    return {f"{prefix}_p{q}_ms": pick(q) for q in (50, 90, 99)}


def _throughput(num_requests: int, num_in: int, num_out: int, duration_s: float) -> dict:
    """The rate fields every system's row reports, from token counts and wall time."""
    return {
        "num_requests": num_requests,
        "duration_s": duration_s,
        "requests_per_s": num_requests / duration_s,
        "output_tokens_per_s": num_out / duration_s,
        "total_tokens_per_s": (num_in + num_out) / duration_s,
    }


def run_fms(engine, prompts, output_lens, respect_eos, device):
    params = [SamplingParams(max_new_tokens=o, ignore_eos=not respect_eos) for o in output_lens]
    bench.reset_peak_memory(device)
    bench.synchronize(device)
    start = time.perf_counter()
    outs = engine.generate(prompts, params, use_tqdm=True)
    bench.synchronize(device)
    duration = time.perf_counter() - start
    peak_alloc, _ = bench.peak_memory_gb(device)
    stats = engine.stats()
    num_out = sum(len(o.token_ids) for o in outs)
    num_in = sum(len(p) for p in prompts)
    row = {
        "system": "fms LLMEngine",
        **_throughput(len(prompts), num_in, num_out, duration),
        **percentiles_ms([o.time_to_first_token for o in outs if o.time_to_first_token is not None], "ttft"),
        # per request: (last token - first token) / (tokens - 1), the decode pace a user sees on average
        **percentiles_ms([(o.latency - o.time_to_first_token) / (len(o.token_ids) - 1)
                          for o in outs if len(o.token_ids) > 1], "tpot"),
        # gaps between token deliveries: with decode windows tokens arrive in bursts (gaps of ~0)
        **percentiles_ms([t for o in outs for t in o.inter_token_latencies], "itl"),
        "peak_gpu_mem_allocated_gb": peak_alloc,
        "kv_pool_gb": engine.cache.memory_stats().bytes_allocated / bench.GB,
        "num_preemptions": stats["num_preemptions"],
        "prefix_cache_hit_rate": stats["prefix_cache_hit_rate"],
        "cuda_graphs": stats["cuda_graphs"],
        "num_output_tokens": num_out,
        "num_input_tokens": num_in,
        "finish_reasons": {r: sum(o.finish_reason == r for o in outs) for r in {o.finish_reason for o in outs}},
        "engine_stats": stats,
    }
    return row, [o.token_ids for o in outs]


def _common_prefix(a, b) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def run_hf_peer(model, architecture, prompts, output_lens, fms_tokens, device):
    if len(set(output_lens)) != 1:
        return {"system": "hf generate_batch", "error": "skipped: HF generate_batch takes one max_new_tokens for "
                "all requests and this workload's output lengths differ"}
    try:
        hf_model = bench.hf_twin(model, architecture)
        point = bench.hf_generate_batch_point(hf_model, prompts, output_lens[0], repeats=1, warmup=1, device=device)
    except Exception as exc:  # noqa: BLE001 - a peer failing must not lose our own results
        return {"system": "hf generate_batch", "error": f"{type(exc).__name__}: {exc}"}
    tokens = point.pop("outputs")
    duration = point["e2e_latency_ms"] / 1e3
    num_in = sum(len(p) for p in prompts)
    num_out = sum(len(t) for t in tokens)
    del hf_model
    return {
        "system": "hf generate_batch",
        **_throughput(len(prompts), num_in, num_out, duration),
        "peak_gpu_mem_allocated_gb": point["peak_gpu_mem_allocated_gb"],
        "attn_implementation": point["attn_implementation"],
        # random bf16 weights give near-tied logits, so greedy sequences drift apart after a few tokens
        "tokens_match_fms": sum(a == b for a, b in zip(tokens, fms_tokens)) / len(prompts),
        "first_token_match_fms": sum(a[:1] == b[:1] for a, b in zip(tokens, fms_tokens)) / len(prompts),
        "mean_common_prefix_tokens": sum(_common_prefix(a, b) for a, b in zip(tokens, fms_tokens)) / len(prompts),
        "attempts_failed": point.get("attempts_failed"),
    }


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    device = torch.device(args.device)
    is_cuda = device.type == "cuda"
    variant = args.variant or ("3.2-1b" if is_cuda else "micro")
    num_requests = args.num_requests or (128 if is_cuda else 8)
    prompt_range = args.prompt_range or ((64, 512) if is_cuda else (16, 32))
    output_range = args.output_range or ((256, 256) if is_cuda else (8, 8))
    if not is_cuda:
        print("CPU run: a tiny demo workload (llama micro, eager FlexAttention) that checks the engine end to end "
              "in under a minute; it is not a performance measurement.")
    model = get_model(args.architecture, None if args.model_path else variant, model_path=args.model_path,
                      device_type=device.type, data_type=args.data_type)
    architecture = args.architecture
    if args.dataset is not None:
        from fms.utils.tokenizers import get_tokenizer

        tokenizer = get_tokenizer(args.tokenizer)
        max_len = min(model.config.max_position_embeddings, args.max_model_len or 4096)
        prompts, output_lens = sharegpt_workload(args.dataset, tokenizer, num_requests, args.seed, max_len)
        if max(max(p) for p in prompts) >= model.config.vocab_size:
            raise SystemExit(f"the tokenizer produces ids >= the model's vocab_size {model.config.vocab_size}; "
                             "pass a matching --tokenizer or --model_path")
        workload = {"dataset": str(args.dataset), "num_requests": len(prompts)}
    else:
        mixed = bench.MixedWorkload(num_requests, prompt_range, output_range, seed=args.seed)
        prompts, output_lens = mixed.prompts(model.config.vocab_size)
        workload = {"num_requests": num_requests, "prompt_range": prompt_range, "output_range": output_range,
                    "seed": args.seed}
    max_num_seqs = args.max_num_seqs or (128 if is_cuda else 8)
    num_pages = args.num_pages
    if num_pages is None and not is_cuda:  # small pool: eager FlexAttention on CPU visits every pool slot
        num_pages = sum(-(-(len(p) + o) // args.page_size) for p, o in zip(prompts[:max_num_seqs], output_lens))
    sweep = [int(k) for k in args.decode_steps_sweep.split(",")] if args.decode_steps_sweep else []
    max_steps = max(sweep) if sweep else args.max_decode_steps
    engine = LLMEngine(
        model, page_size=args.page_size, num_pages=num_pages, memory_fraction=args.memory_fraction,
        max_num_seqs=max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len, enable_prefix_caching=not args.no_prefix_caching,
        use_cuda_graphs=None if not args.no_cuda_graphs else False,
        **({} if max_steps is None else {"max_decode_steps": max_steps}),
        compile_decode=False if args.no_compile else None,
        compile_prefill=False if args.no_compile else None,
    )
    if is_cuda and not args.no_warmup:
        # untimed: compiles kernels for common shapes; a distinct seed keeps it out of the prefix cache
        warm = bench.MixedWorkload(min(8, num_requests), prompt_range, (4, 4), seed=args.seed + 9973)
        engine.generate(warm.prompts(model.config.vocab_size)[0], SamplingParams(max_new_tokens=4, ignore_eos=True),
                        use_tqdm=False)
        if engine.prefix_cache is not None:
            engine.prefix_cache.clear()
        engine.reset_stats()
    rows = []
    for k in sweep or [None]:
        if k is not None:
            engine.scheduler.max_decode_steps = k
        fms_row, tokens = run_fms(engine, prompts, output_lens, args.respect_eos, device)
        if k is not None:
            fms_row["system"] += f" (max_decode_steps={k})"
        rows.append(fms_row)
        if len(rows) == 1:
            fms_tokens = tokens  # the HF peer is compared with the first run
        engine.reset_stats()
        if engine.prefix_cache is not None:
            engine.prefix_cache.clear()
    if args.batch1_tokens:
        one = bench.MixedWorkload(1, (128, 128), (args.batch1_tokens, args.batch1_tokens), seed=args.seed + 1)
        row, _ = run_fms(engine, *one.prompts(model.config.vocab_size), args.respect_eos, device)
        row["system"] += " batch-1"
        rows.append(row)
    peers = [p for p in args.peers.split(",") if p]
    if "hf" in peers:
        del engine
        if is_cuda:
            torch.cuda.empty_cache()
        rows.append(run_hf_peer(model, architecture, prompts, output_lens, fms_tokens, device))
    unknown = set(peers) - {"hf"}
    if unknown:
        print(f"unknown peers ignored: {sorted(unknown)} (supported: hf)")

    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    results = {
        "metadata": bench.run_metadata(command, device),
        "model": {"architecture": architecture, "variant": None if args.model_path else variant,
                  "model_path": args.model_path, "dtype": str(model.embedding.weight.dtype)},
        "workload": workload,
        "engine_options": {k: v for k, v in vars(args).items() if k not in ("results_dir", "dataset")},
        "results": rows,
        "cpu_demo": not is_cuda,
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / "serving.json").write_text(json.dumps(bench._jsonable(results), indent=2) + "\n")
    bench._write_csv(args.results_dir / "serving.csv", rows, CSV_COLUMNS)
    for row in rows:
        if row.get("error"):
            print(f"{row['system']}: {row['error']}")
            continue
        print(f"{row['system']}: {row['requests_per_s']:.2f} req/s, {row['output_tokens_per_s']:.1f} output tok/s, "
              f"{row['total_tokens_per_s']:.1f} total tok/s"
              + (f", TTFT p50 {row['ttft_p50_ms']:.0f} ms, TPOT p50 {row['tpot_p50_ms'] or 0:.2f} ms, "
                 f"preemptions {row['num_preemptions']}, prefix hit rate {row['prefix_cache_hit_rate']:.1%}"
                 if "ttft_p50_ms" in row else ""))
    print(f"wrote {args.results_dir / 'serving.json'} and {args.results_dir / 'serving.csv'}")
    return results


if __name__ == "__main__":
    main()
