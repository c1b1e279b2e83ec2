"""Does tensor parallel with one rank cost anything against today's single-process path?

Measures batch-1 decode (tokens/s through a reused Generator) and offline serving (output tokens/s through
LLMEngine.generate) three times: the plain model in this process ("plain", today's path), the model built with
get_model(..., distributed_strategy="tp") in one rank started by fms.distributed.launch (the TP code path
with one rank; `fms ... --tensor-parallel-size 1` itself launches nothing and uses the plain model), then the
plain model again (to bracket drift). Writes JSON with the command, device and commit.

    CPU (micro):   python scripts/bench_tp_overhead.py --variant micro --device cpu --decode-tokens 32 \
                       --serving-requests 8 --serving-new-tokens 16 --out results/tp_overhead/cpu_micro.json
    H200 (1B):     python scripts/bench_tp_overhead.py --variant 3.2-1b --device cuda \
                       --out results/tp_overhead/h200_llama_1b.json
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fms.bench.results import run_metadata, write_json  # noqa: E402
from fms.bench.timing import release_memory, synchronize  # noqa: E402
from fms.distributed import launch  # noqa: E402
from fms.models import get_model  # noqa: E402
from fms.serving import LLMEngine, SamplingParams  # noqa: E402
from fms.utils.generation import Generator  # noqa: E402


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (length,), generator=g).tolist() for _ in range(n)]


def measure(args: argparse.Namespace, strategy: str | None) -> dict:
    """Decode and serving rates of one model build (strategy None: today's path; "tp": the TP code path)."""
    device = torch.device(args.device)
    model = get_model(args.arch, args.variant, device_type=args.device, distributed_strategy=strategy)
    vocab = model.config.vocab_size
    out = {"strategy": strategy, "model_class": type(model).__name__, "has_tp_layers": model.tp is not None}

    prompt = _prompts(1, args.prompt_len, vocab, seed=0)
    generator = Generator(model, "paged", max_batch_size=1, max_seq_len=args.prompt_len + args.decode_tokens,
                          decode_window=args.decode_window, cuda_graphs=device.type == "cuda", page_size=16)
    rates = []
    for i in range(args.warmup + args.repeats):
        synchronize(device)
        start = time.perf_counter()
        tokens = generator.generate(prompt, args.decode_tokens)
        synchronize(device)
        if i >= args.warmup:
            rates.append(len(tokens[0]) / (time.perf_counter() - start))
    out["decode_tokens_per_s"] = rates
    out["decode_token_ids"] = tokens[0]
    out["decode_tokens_per_s_median"] = statistics.median(rates)
    del generator

    prompts = _prompts(args.serving_requests, args.prompt_len, vocab, seed=1)
    options = {} if args.compile else dict(compile_decode=False, compile_prefill=False)
    if args.memory_gb:
        options["memory_gb"] = args.memory_gb
    engine = LLMEngine(model, **options)
    params = SamplingParams(max_new_tokens=args.serving_new_tokens)
    engine.generate(prompts, params, use_tqdm=False)  # warm: graph capture, first compiles
    rates = []
    for _ in range(args.repeats):
        synchronize(device)
        start = time.perf_counter()
        outs = engine.generate(prompts, params, use_tqdm=False)
        synchronize(device)
        rates.append(sum(len(o.token_ids) for o in outs) / (time.perf_counter() - start))
    out["serving_output_tokens_per_s"] = rates
    out["serving_token_ids"] = [o.token_ids for o in outs]
    stats = engine.stats()  # whether the TP path's decode (all-reduces included) ran from CUDA graphs
    out["engine"] = {k: stats[k] for k in ("cuda_graphs", "compiled_decode", "num_graph_forwards",
                                           "num_eager_forwards", "startup_s")}
    out["serving_output_tokens_per_s_median"] = statistics.median(rates)
    del engine, model
    release_memory(device)
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="llama")
    parser.add_argument("--variant", default="3.2-1b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--decode-tokens", type=int, default=256)
    parser.add_argument("--decode-window", type=int, default=8)
    parser.add_argument("--serving-requests", type=int, default=64)
    parser.add_argument("--serving-new-tokens", type=int, default=128)
    parser.add_argument("--memory-gb", type=float, default=None, help="KV pool size (default: the engine's)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-bracket", action="store_true", help="skip the second plain run (saves one model build)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="torch.compile the engine's decode step and prefill (--no-compile: CUDA graphs only, "
                             "a start in seconds; both sides run the same way)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    results = run_metadata("python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
                           torch.device(args.device))
    results["args"] = vars(args)
    runs = [("plain", measure(args, None))]
    runs.append(("tp1", launch(measure, 1, (args, "tp"), start_method="spawn")[0]))
    if not args.no_bracket:
        runs.append(("plain_again", measure(args, None)))
    results["runs"] = dict(runs)
    plain = [r for name, r in runs if name.startswith("plain")]
    tp1 = results["runs"]["tp1"]
    for key in ("decode_tokens_per_s_median", "serving_output_tokens_per_s_median"):
        best_plain = max(r[key] for r in plain)
        results[f"tp1_over_plain_{key.removesuffix('_median')}"] = tp1[key] / best_plain
    # with one rank the all-reduces are identities: the TP path must give the plain path's tokens exactly
    for key in ("decode_token_ids", "serving_token_ids"):
        results[f"tp1_{key.removesuffix('_token_ids')}_tokens_equal_plain"] = all(
            tp1[key] == r[key] for r in plain)
    for key, value in results.items():
        if key.startswith("tp1_over_plain") or key.endswith("_equal_plain"):
            print(f"{key}: {value:.3f}" if isinstance(value, float) else f"{key}: {value}")
    for name, r in runs:
        print(f"{name:12s} decode {r['decode_tokens_per_s_median']:.1f} tok/s   "
              f"serving {r['serving_output_tokens_per_s_median']:.1f} tok/s")
    if args.out is not None:
        print(f"wrote {write_json(args.out, results)}")
    return results


if __name__ == "__main__":
    main()
