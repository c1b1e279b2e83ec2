"""The offline serving benchmark: LLMEngine on a request workload (optionally vs HF generate_batch / static generate),
with its roofline.

All requests arrive at t=0, so time to first token includes queueing. On CPU the defaults shrink to a
demo (llama "micro", 8 requests of 16-32 + 8 tokens): its numbers say the engine runs, not how fast.
"""

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fms.bench.hf_peer import (HF_STATIC_SYSTEM, hf_generate_batch_point, hf_mamba_kernels, hf_static_generate_point,
                              hf_twin, static_batches)
from fms.bench.recompiles import RecompileLog
from fms.bench.results import run_metadata, write_csv, write_json
from fms.bench.roofline import ModelCost, batch1_decode_limit_tok_s, limit_fields, serving_roofline
from fms.bench.timing import GB, peak_memory_gb, reset_peak_memory, synchronize
from fms.bench.workloads import MixedWorkload, sharegpt_workload
from fms.models import get_model
from fms.runtime.compiled import DEFAULT_COMPILE_SCOPE, check_compile_scope
from fms.runtime.sampling_params import SamplingParams
from fms.serving import LLMEngine
from fms.serving.config import EngineConfig

CSV_COLUMNS = (
    "system", "num_requests", "duration_s", "requests_per_s", "output_tokens_per_s", "total_tokens_per_s",
    "ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p90_ms", "tpot_p99_ms",
    "itl_p50_ms", "itl_p90_ms", "itl_p99_ms",
    "peak_gpu_mem_allocated_gb", "kv_pool_gb", "num_preemptions", "prefix_cache_hit_rate", "cuda_graphs",
    "limit_tok_s", "pct_of_limit",
    "attn_implementation", "hf_batch_size", "tokens_match_fms", "first_token_match_fms", "mean_common_prefix_tokens",
    "error",
)
# hf: HF continuous batching (generate_batch, which refuses hybrids); hf_generate: HF static generate, left-padded
PEERS = ("hf", "hf_generate")
BATCH1_PROMPT = 128  # the batch-1 row's prompt tokens (issue 19's "one request, 128 prompt")


@dataclass
class ServingBenchConfig:
    """One serving benchmark run; None fields take the device's default (CUDA: the real workload, CPU: a demo)."""

    results_dir: Path = Path("results")
    architecture: str = "llama"
    variant: str | None = None
    model_path: str | None = None
    tokenizer: str | None = None
    data_type: str | None = None
    device: str = "cpu"
    num_requests: int | None = None
    prompt_range: tuple[int, int] | None = None
    output_range: tuple[int, int] | None = None
    dataset: Path | None = None
    decode_steps_sweep: tuple[int, ...] = ()
    batch1_tokens: int = 0
    seed: int = 0
    page_size: int = 16
    num_pages: int | None = None
    memory_fraction: float | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    max_model_len: int | None = None
    prefix_caching: bool = True
    cuda_graphs: bool = True
    compile: bool = True
    compile_scope: str = DEFAULT_COMPILE_SCOPE  # EngineConfig.compile_scope: "layers" (one layer, reused) or "model"
    graph_batch_sizes: tuple[int, ...] | None = None  # EngineConfig.graph_batch_sizes; None: the engine's default
    unbacked_batch: bool = False  # EngineConfig.unbacked_batch
    max_decode_steps: int | None = None
    respect_eos: bool = False
    peers: tuple[str, ...] = ()
    hf_batch_size: int | None = None  # hf_generate's requests per generate call; None: all in one (halved on OOM)
    warmup: bool = True
    command: str = "scripts/benchmark_serving.py"

    def __post_init__(self):
        is_cuda = torch.device(self.device).type == "cuda"
        if self.variant is None and self.model_path is None:
            self.variant = "3.2-1b" if is_cuda else "micro"
        defaults = dict(num_requests=128, prompt_range=(64, 512), output_range=(256, 256), max_num_seqs=128) \
            if is_cuda else dict(num_requests=8, prompt_range=(16, 32), output_range=(8, 8), max_num_seqs=8)
        for name, value in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        self.prompt_range, self.output_range = tuple(self.prompt_range), tuple(self.output_range)
        for name in ("num_requests", "page_size", "max_num_seqs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        check_compile_scope(self.compile_scope)
        if self.graph_batch_sizes is not None:  # the engine's own check, before a model is built
            self.graph_batch_sizes = EngineConfig(graph_batch_sizes=self.graph_batch_sizes).graph_batch_sizes
        for name in ("batch1_tokens",):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        bad = [k for k in self.decode_steps_sweep if k < 1]
        if bad:
            raise ValueError(f"decode_steps_sweep values must be >= 1, got {bad}")
        self.workload()  # checks the ranges
        unknown = [p for p in self.peers if p not in PEERS]
        if unknown:
            raise ValueError(f"peers: unknown peer {unknown}; allowed: {', '.join(PEERS)}")
        static_batches(self.num_requests, self.hf_batch_size)  # checks hf_batch_size
        if self.hf_batch_size is not None and "hf_generate" not in self.peers:
            raise ValueError(f"hf_batch_size {self.hf_batch_size} applies to the hf_generate peer only; add it to "
                             f"peers (--peers hf_generate), got peers {list(self.peers)}")

    @property
    def is_cuda(self) -> bool:
        return torch.device(self.device).type == "cuda"

    def workload(self, num_requests: int | None = None, output_range=None, seed: int | None = None):
        return MixedWorkload(num_requests or self.num_requests, self.prompt_range, output_range or self.output_range,
                             self.seed if seed is None else seed)


def percentiles_ms(values, prefix):
    if not values:
        return {f"{prefix}_p{q}_ms": None for q in (50, 90, 99)}
    ordered = sorted(values)

    def pick(q):
        return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] * 1e3

    return {f"{prefix}_p{q}_ms": pick(q) for q in (50, 90, 99)}


def throughput(num_requests: int, num_in: int, num_out: int, duration_s: float) -> dict:
    """The rate fields every system's row reports, from token counts and wall time."""
    return {"num_requests": num_requests, "duration_s": duration_s, "requests_per_s": num_requests / duration_s,
            "output_tokens_per_s": num_out / duration_s, "total_tokens_per_s": (num_in + num_out) / duration_s}


def run_fms(engine, prompts, output_lens, respect_eos: bool, device: torch.device):
    params = [SamplingParams(max_new_tokens=o, ignore_eos=not respect_eos) for o in output_lens]
    reset_peak_memory(device)
    synchronize(device)
    start = time.perf_counter()
    outs = engine.generate(prompts, params, use_tqdm=True)
    synchronize(device)
    duration = time.perf_counter() - start
    stats = engine.stats()
    num_out = sum(len(o.token_ids) for o in outs)
    num_in = sum(len(p) for p in prompts)
    row = {
        "system": "fms LLMEngine",
        **throughput(len(prompts), num_in, num_out, duration),
        **percentiles_ms([o.time_to_first_token for o in outs if o.time_to_first_token is not None], "ttft"),
        # per request: (last token - first token) / (tokens - 1), the decode pace a user sees on average
        **percentiles_ms([(o.latency - o.time_to_first_token) / (len(o.token_ids) - 1)
                          for o in outs if len(o.token_ids) > 1], "tpot"),
        # gaps between token deliveries: with decode windows tokens arrive in bursts (gaps of ~0)
        **percentiles_ms([t for o in outs for t in o.inter_token_latencies], "itl"),
        "peak_gpu_mem_allocated_gb": peak_memory_gb(device)[0],
        "kv_pool_gb": engine.cache.memory_stats().bytes_allocated / GB,
        "num_preemptions": stats["num_preemptions"],
        "prefix_cache_hit_rate": stats["prefix_cache_hit_rate"],
        "cuda_graphs": stats["cuda_graphs"],
        "num_output_tokens": num_out,
        "num_input_tokens": num_in,
        "finish_reasons": {r: sum(o.finish_reason == r for o in outs) for r in {o.finish_reason for o in outs}},
        "engine_stats": stats,
    }
    failed = [o for o in outs if o.error is not None]
    if failed:  # a rate over requests that never ran would read as a slow engine: say so on the row
        row["error"] = f"{len(failed)} of {len(outs)} requests did not run ({failed[0].finish_reason}): {failed[0].error}"
    return row, [o.token_ids for o in outs]


def _common_prefix(a, b) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _match_fms(tokens, fms_tokens) -> dict:
    """How a peer's greedy tokens compare with ours, request by request."""
    n = len(tokens)
    # random bf16 weights give near-tied logits, so greedy sequences drift apart after a few tokens
    return {"tokens_match_fms": sum(a == b for a, b in zip(tokens, fms_tokens)) / n,
            "first_token_match_fms": sum(a[:1] == b[:1] for a, b in zip(tokens, fms_tokens)) / n,
            "mean_common_prefix_tokens": sum(_common_prefix(a, b) for a, b in zip(tokens, fms_tokens)) / n}


def run_hf_peer(model, architecture, prompts, output_lens, fms_tokens, device):
    if len(set(output_lens)) != 1:
        return {"system": "hf generate_batch", "error": "skipped: HF generate_batch takes one max_new_tokens for "
                "all requests and this workload's output lengths differ"}
    try:
        hf_model = hf_twin(model, architecture)
        point = hf_generate_batch_point(hf_model, prompts, output_lens[0], repeats=1, warmup=1, device=device)
    except Exception as exc:  # noqa: BLE001 - a peer failing must not lose our own results
        return {"system": "hf generate_batch", "error": f"{type(exc).__name__}: {exc}"}
    tokens = point.pop("outputs")
    del hf_model
    n = len(prompts)
    return {
        "system": "hf generate_batch",
        **throughput(n, sum(len(p) for p in prompts), sum(len(t) for t in tokens), point["e2e_latency_ms"] / 1e3),
        "peak_gpu_mem_allocated_gb": point["peak_gpu_mem_allocated_gb"],
        "attn_implementation": point["attn_implementation"],
        **_match_fms(tokens, fms_tokens),
        "attempts_failed": point.get("attempts_failed"),
    }


def run_hf_static_peer(model, architecture, prompts, output_lens, fms_tokens, eos_token_ids, batch_size, device):
    """HF's static `generate` on the same prompts (left-padded batches, greedy): the peer for hybrids too."""
    try:
        hf_model = hf_twin(model, architecture)
        point = hf_static_generate_point(hf_model, prompts, output_lens, batch_size=batch_size,
                                         eos_token_ids=eos_token_ids, device=device)
    except Exception as exc:  # noqa: BLE001 - a peer failing must not lose our own results
        return {"system": HF_STATIC_SYSTEM, "error": f"{type(exc).__name__}: {exc}"}
    tokens = point.pop("outputs")
    attn, mamba = hf_model.config._attn_implementation, hf_mamba_kernels(hf_model)
    del hf_model
    num_in = sum(len(p) for p in prompts)
    return {
        "system": HF_STATIC_SYSTEM,
        **throughput(len(prompts), num_in, point["num_output_tokens"], point["e2e_latency_ms"] / 1e3),
        # a static batch hands back every token when generate returns: no per-token times to report
        **percentiles_ms([], "ttft"), **percentiles_ms([], "tpot"), **percentiles_ms([], "itl"),
        "peak_gpu_mem_allocated_gb": point["peak_gpu_mem_allocated_gb"],
        "attn_implementation": attn,
        "hf_mamba_kernels": mamba,
        "hf_batch_size": point["batch_size"],
        "hf_batch_size_asked": batch_size,
        "num_batches": point["num_batches"],
        "out_of_memory_batch_sizes": point["out_of_memory_batch_sizes"],
        "num_output_tokens": point["num_output_tokens"],
        "num_input_tokens": num_in,
        "num_prompt_pad_tokens": point["num_prompt_pad_tokens"],
        "num_generated_tokens": point["num_generated_tokens"],
        **_match_fms(tokens, fms_tokens),
    }


def _workload(model, config: ServingBenchConfig):
    """(prompts, output lengths, what the workload was) from the dataset or the seeded ranges."""
    if config.dataset is None:
        prompts, output_lens = config.workload().prompts(model.config.vocab_size)
        return prompts, output_lens, {"num_requests": config.num_requests, "prompt_range": config.prompt_range,
                                      "output_range": config.output_range, "seed": config.seed}
    from fms.utils.tokenizers import get_tokenizer

    max_len = min(model.config.max_position_embeddings, config.max_model_len or 4096)
    prompts, output_lens = sharegpt_workload(config.dataset, get_tokenizer(config.tokenizer), config.num_requests,
                                             config.seed, max_len)
    if max(max(p) for p in prompts) >= model.config.vocab_size:
        raise SystemExit(f"the tokenizer produces ids >= the model's vocab_size {model.config.vocab_size}; "
                         "pass a matching --tokenizer or --model_path")
    return prompts, output_lens, {"dataset": str(config.dataset), "num_requests": len(prompts)}


def _build_engine(model, config: ServingBenchConfig, prompts, output_lens) -> LLMEngine:
    num_pages = config.num_pages
    if num_pages is None and not config.is_cuda:  # small pool: eager FlexAttention on CPU visits every pool slot
        num_pages = sum(-(-(len(p) + o) // config.page_size)
                        for p, o in zip(prompts[:config.max_num_seqs], output_lens))
        if config.batch1_tokens:  # the batch-1 request runs alone on the same engine: it must fit too
            num_pages = max(num_pages, -(-(BATCH1_PROMPT + config.batch1_tokens) // config.page_size))
    max_steps = max(config.decode_steps_sweep) if config.decode_steps_sweep else config.max_decode_steps
    return LLMEngine(
        model, page_size=config.page_size, num_pages=num_pages, memory_fraction=config.memory_fraction,
        max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
        max_model_len=config.max_model_len, enable_prefix_caching=config.prefix_caching,
        use_cuda_graphs=None if config.cuda_graphs else False,
        **({} if max_steps is None else {"max_decode_steps": max_steps}),
        compile_decode=None if config.compile else False, compile_prefill=None if config.compile else False,
        compile_scope=config.compile_scope, unbacked_batch=config.unbacked_batch,
        **({} if config.graph_batch_sizes is None else {"graph_batch_sizes": config.graph_batch_sizes}),
    )


def reset_engine(engine) -> None:
    """Between an untimed warm-up and a timed run: zero the statistics and empty the prefix cache."""
    engine.reset_stats()
    if engine.prefix_cache is not None:
        engine.prefix_cache.clear()


def run_serving_benchmark(config: ServingBenchConfig) -> dict:
    """Run the workload on LLMEngine (per decode-steps value), batch-1 and peers; write serving.json / .csv.
    Dynamo's graphs and recompiles are recorded at start-up (startup.dynamo) and over the timed fms runs
    (dynamo_during_runs, which should be empty: a compile there is inside a run's time)."""
    with RecompileLog() as recompiles:
        return _run_serving_benchmark(config, recompiles)


def _run_serving_benchmark(config: ServingBenchConfig, recompiles: RecompileLog) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    device = torch.device(config.device)
    if not config.is_cuda:
        print("CPU run: a tiny demo workload (llama micro, eager FlexAttention) that checks the engine end to end "
              "in under a minute; it is not a performance measurement.")
    start = time.perf_counter()
    model = get_model(config.architecture, None if config.model_path else config.variant,
                      model_path=config.model_path, device_type=device.type, data_type=config.data_type,
                      init_on_device=config.model_path is None)  # random weights drawn on the GPU: seconds
    synchronize(device)
    startup = {"get_model_s": time.perf_counter() - start}
    cost = ModelCost.of(model)
    prompts, output_lens, workload = _workload(model, config)
    start = time.perf_counter()
    engine = _build_engine(model, config, prompts, output_lens)
    startup["engine_s"] = time.perf_counter() - start
    startup["engine_phases_s"] = dict(engine.startup_s)
    startup["graph_capture_s"] = engine.runner.decoder.capture_times()
    if config.is_cuda and config.warmup:
        # untimed: compiles kernels for common shapes; a distinct seed keeps it out of the prefix cache
        start = time.perf_counter()
        warm = config.workload(min(8, config.num_requests), (4, 4), config.seed + 9973)
        engine.generate(warm.prompts(model.config.vocab_size)[0], SamplingParams(max_new_tokens=4, ignore_eos=True),
                        use_tqdm=False)
        startup["first_generate_s"] = time.perf_counter() - start
        reset_engine(engine)
    startup["dynamo"] = recompiles.snapshot()
    print("start-up: " + ", ".join(f"{k} {v:.1f} s" for k, v in startup.items() if isinstance(v, float)))
    roofline = serving_roofline(cost, [len(p) for p in prompts], output_lens, config.max_num_seqs)
    rows, fms_tokens = [], None
    for k in config.decode_steps_sweep or [None]:
        if k is not None:
            engine.scheduler.max_decode_steps = k
        row, tokens = run_fms(engine, prompts, output_lens, config.respect_eos, device)
        if k is not None:
            row["system"] += f" (max_decode_steps={k})"
        rows.append({**row, **limit_fields(roofline, row["output_tokens_per_s"])})
        fms_tokens = fms_tokens or tokens  # the HF peer is compared with the first run
        reset_engine(engine)
    if config.batch1_tokens:
        one = MixedWorkload(1, (BATCH1_PROMPT, BATCH1_PROMPT), (config.batch1_tokens, config.batch1_tokens),
                            seed=config.seed + 1)
        row, _ = run_fms(engine, *one.prompts(model.config.vocab_size), config.respect_eos, device)
        row["system"] += " batch-1"
        limit = serving_roofline(cost, [BATCH1_PROMPT], [config.batch1_tokens], 1)
        rows.append({**row, **limit_fields(limit, row["output_tokens_per_s"]),
                     "batch1_decode_limit_tok_s": batch1_decode_limit_tok_s(cost, BATCH1_PROMPT)})
    during_runs = recompiles.since(startup["dynamo"])
    if during_runs["recompiles"] or during_runs["graphs_traced"]:
        print(f"warning: dynamo traced {during_runs['graphs_traced']} graph(s) during the timed runs, recompiles: "
              f"{during_runs['recompiles']}; those runs' times include the compile")
    eos_token_ids = engine.eos_token_ids if config.respect_eos else frozenset()
    if config.peers:
        del engine
        if config.is_cuda:
            torch.cuda.empty_cache()
    for name in config.peers:
        if name == "hf":
            peer = run_hf_peer(model, config.architecture, prompts, output_lens, fms_tokens, device)
        else:
            peer = run_hf_static_peer(model, config.architecture, prompts, output_lens, fms_tokens, eos_token_ids,
                                      config.hf_batch_size, device)
        if config.is_cuda:
            torch.cuda.empty_cache()
        if "output_tokens_per_s" in peer:
            peer.update(limit_fields(roofline, peer["output_tokens_per_s"]))
        rows.append(peer)
    options = {k: v for k, v in asdict(config).items() if k not in ("results_dir", "dataset", "command")}
    results = {
        "metadata": run_metadata(config.command, device),
        "model": {"architecture": config.architecture, "variant": None if config.model_path else config.variant,
                  "model_path": config.model_path, "dtype": str(model.embedding.weight.dtype)},
        "workload": workload,
        "startup": startup,
        "dynamo_during_runs": during_runs,
        "engine_options": options,
        "roofline": roofline.as_dict(),
        "results": rows,
        "cpu_demo": not config.is_cuda,
    }
    results_dir = Path(config.results_dir)
    write_json(results_dir / "serving.json", results)
    write_csv(results_dir / "serving.csv", rows, CSV_COLUMNS)
    for row in rows:
        print(summary_line(row))
    print(f"wrote {results_dir / 'serving.json'} and {results_dir / 'serving.csv'}")
    return results


def summary_line(row: dict) -> str:
    if row.get("error"):
        return f"{row['system']}: {row['error']}"
    line = (f"{row['system']}: {row['requests_per_s']:.2f} req/s, {row['output_tokens_per_s']:.1f} output tok/s, "
            f"{row['total_tokens_per_s']:.1f} total tok/s")
    if row.get("ttft_p50_ms") is not None:  # None: no request produced a token (e.g. all rejected)
        line += (f", TTFT p50 {row['ttft_p50_ms']:.0f} ms, TPOT p50 {row['tpot_p50_ms'] or 0:.2f} ms, "
                 f"preemptions {row['num_preemptions']}, prefix hit rate {row['prefix_cache_hit_rate']:.1%}")
    if row.get("hf_batch_size"):
        line += f", static batches of {row['hf_batch_size']} ({row['num_batches']} generate calls)"
    if row.get("limit_tok_s"):
        line += f"; {row['pct_of_limit']:.1f}% of the {row['limit_tok_s']:.0f} tok/s roofline"
    return line
