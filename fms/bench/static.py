"""Timed static-batch generation: per-step timing through generate(), sweep points and the mixed-length batch.

Timing drives the cache protocol itself (the same steps as `fms.utils.generation.generate`) so that the
prefill step and every decode step get their own timestamps:

    t0 | create cache, add rows, prefill forward, sample | t1 | decode step | t2 | ... | tN | last sync, free | end
        prefill_ms = t1 - t0            decode_ms_per_token = median(t[k+1] - t[k])      e2e = end - t0
"""

from dataclasses import dataclass, field

import torch

from fms.bench.timing import StepClock, median, peak_memory_gb, reset_peak_memory, synchronize
from fms.bench.workloads import MixedWorkload, SweepPoint, random_prompts, workload_pages
from fms.modules.attention import get_attention_op
from fms.utils.generation import Generator, generate

# Every figure measured for a sweep point; the CSV carries all of them.
FIGURES = (
    "prefill_ms",
    "decode_ms_per_token",
    "e2e_latency_ms",
    "requests_per_s",
    "input_tokens_per_s",
    "output_tokens_per_s",
    "peak_gpu_mem_allocated_gb",
    "peak_gpu_mem_reserved_gb",
    "kv_bytes_allocated",
    "kv_bytes_in_use",
    "kv_bytes_holding_tokens",
)
POINT_KEYS = ("sweep", "backend", "batch_size", "context_len", "max_new_tokens", "repeats")
EXTRA_KEYS = ("prefill_tokens_per_s", "state_bytes", "pages_in_use", "num_pages", "page_size", "matches_generate",
              "generate_agreement", "limit_tok_s", "pct_of_limit")
CSV_COLUMNS = POINT_KEYS + FIGURES + EXTRA_KEYS



def cache_options(backend: str, page_size: int, num_pages: int | None = None) -> dict:
    """The cache options this backend's op takes, of page_size and num_pages."""
    return get_attention_op(backend).cache_kwargs(page_size=page_size, num_pages=num_pages)


@dataclass
class Timing:
    prefill_ms: float
    decode_step_ms: list[float]
    e2e_ms: float
    outputs: list[list[int]]
    peak_mem_allocated_gb: float | None = None
    peak_mem_reserved_gb: float | None = None
    kv_stats: dict = field(default_factory=dict)

    @property
    def num_output_tokens(self) -> int:
        return sum(len(o) for o in self.outputs)


def token_agreement(outputs, reference) -> float:
    """Mean over rows of the fraction of tokens before the first difference (1.0: identical)."""
    fractions = []
    for out, ref in zip(outputs, reference):
        same = next((i for i, (a, b) in enumerate(zip(out, ref)) if a != b), min(len(out), len(ref)))
        fractions.append(same / max(len(out), len(ref), 1))
    return sum(fractions) / max(len(fractions), 1)


def _keep_fullest(peak: dict, cache) -> None:
    stats = cache.memory_stats().as_dict()
    if stats["kv_bytes_in_use"] >= peak.get("kv_bytes_in_use", -1):
        peak.clear()
        peak.update(stats)


def timed_generate(model, prompts, max_new_tokens, attn_name: str, record_stats: bool = False,
                   generator=None, **options) -> Timing:
    """Greedy static-batch generation (EOS ignored) through generate(), prefill and each decode step timed.

    max_new_tokens: one count for every row, or one per row (a row leaves the batch when it has its
    tokens). record_stats reads cache.memory_stats() after every step (slow; for an untimed pass)
    and keeps the fullest point, like generate(return_stats=True). generator: a
    fms.utils.generation.Generator to run on (decode windows, CUDA graphs), else generate(**options).
    decode_step_ms holds one entry per decode step or window: its wall time per token.
    """
    if not isinstance(max_new_tokens, int) and min(max_new_tokens) < 1 or max_new_tokens == 0:
        raise ValueError(f"max_new_tokens needs counts >= 1, got {max_new_tokens}")
    device = model.embedding.weight.device
    peak: dict = {}
    clock = StepClock(device)
    steps = []

    def on_step(kind, cache, num_steps):
        clock.mark()
        steps.append(max(num_steps, 1))
        if record_stats:
            _keep_fullest(peak, cache)

    synchronize(device)
    clock.mark()
    if generator is not None:
        outputs = generator.generate(prompts, max_new_tokens, on_step=on_step)
    else:
        outputs = generate(model, prompts, max_new_tokens, attn_name=attn_name, on_step=on_step, **options)
    clock.mark()
    intervals = clock.intervals_ms()
    per_token = [ms / n for ms, n in zip(intervals[1:-1], steps[1:])]
    return Timing(prefill_ms=intervals[0], decode_step_ms=per_token, e2e_ms=sum(intervals),
                  outputs=outputs, kv_stats=peak)



def timed_repeat(model, prompts, max_new_tokens, backend, options, device, generator=None) -> Timing:
    """One timed run with the GPU peak-memory counters reset just before it."""
    reset_peak_memory(device)
    timing = timed_generate(model, prompts, max_new_tokens, backend, generator=generator, **options)
    timing.peak_mem_allocated_gb, timing.peak_mem_reserved_gb = peak_memory_gb(device)
    return timing


def summarize(timings: list[Timing], batch_size: int, num_input_tokens: int) -> dict:
    """Medians over repeats of one (point, backend)."""
    e2e_ms = median([t.e2e_ms for t in timings])
    prefill_ms = median([t.prefill_ms for t in timings])
    out_tokens = median([t.num_output_tokens for t in timings])
    e2e_s = e2e_ms / 1e3
    alloc = [t.peak_mem_allocated_gb for t in timings if t.peak_mem_allocated_gb is not None]
    reserved = [t.peak_mem_reserved_gb for t in timings if t.peak_mem_reserved_gb is not None]
    return {
        "prefill_ms": prefill_ms,
        "decode_ms_per_token": median([median(t.decode_step_ms) for t in timings]),
        "e2e_latency_ms": e2e_ms,
        "requests_per_s": batch_size / e2e_s,
        "input_tokens_per_s": num_input_tokens / e2e_s,
        "output_tokens_per_s": out_tokens / e2e_s,
        "prefill_tokens_per_s": num_input_tokens / (prefill_ms / 1e3),
        "peak_gpu_mem_allocated_gb": max(alloc) if alloc else None,
        "peak_gpu_mem_reserved_gb": max(reserved) if reserved else None,
        "e2e_latency_ms_repeats": [t.e2e_ms for t in timings],
    }



def measure_point(model, point: SweepPoint, backends, max_new_tokens: int, *, repeats: int, warmup: int,
                  seed: int, page_size: int, device: torch.device, decode: dict | None = None) -> list[dict]:
    """Every backend at one point, alternating A, B, A, B... so drift hits all of them alike.

    The first warm-up of each backend is generate(return_stats=True): it gives the KV-cache
    statistics at the fullest step and reference tokens for the timed loop (matches_generate).
    decode: Generator options for the timed runs (decode_window, cuda_graphs, compile_decode); each
    backend then runs on one Generator for the whole point (graphs captured in its first run), and
    matches_generate compares its tokens with the per-token generate() pass.
    """
    prompts = random_prompts(point.batch_size, point.context_len, model.config.vocab_size, seed)
    reference: dict[str, tuple[list, dict]] = {}
    generators = {}
    if decode:
        for backend in backends:
            generators[backend] = Generator(model, backend, max_batch_size=point.batch_size,
                                            max_seq_len=point.context_len + max_new_tokens, **decode,
                                            **cache_options(backend, page_size))

    def reference_run(backend):
        outs, stats = generate(model, prompts, max_new_tokens, attn_name=backend, eos_token_id=None,
                               return_stats=True, **cache_options(backend, page_size))
        reference[backend] = (outs, stats)

    def warm(backend, i):
        if i == 0:
            reference_run(backend)
        if i > 0 or backend in generators:  # a generator's first run compiles and captures
            timed_generate(model, prompts, max_new_tokens, backend, generator=generators.get(backend),
                           **cache_options(backend, page_size))

    for i in range(warmup):
        for backend in backends:
            warm(backend, i)
    timings: dict[str, list[Timing]] = {b: [] for b in backends}
    for _ in range(repeats):
        for backend in backends:
            timings[backend].append(
                timed_repeat(model, prompts, max_new_tokens, backend, cache_options(backend, page_size), device,
                             generators.get(backend))
            )
    rows = []
    for backend in backends:
        if backend not in reference:  # --warmup 0: the generate() pass runs after the timed repeats
            reference_run(backend)
        outs, stats = reference[backend]
        row = {
            "sweep": point.sweep,
            "backend": backend,
            "batch_size": point.batch_size,
            "context_len": point.context_len,
            "max_new_tokens": max_new_tokens,
            "repeats": repeats,
            **summarize(timings[backend], point.batch_size, point.batch_size * point.context_len),
            "kv_bytes_allocated": stats.get("kv_bytes_allocated"),
            "kv_bytes_in_use": stats.get("kv_bytes_in_use"),
            "kv_bytes_holding_tokens": stats.get("kv_bytes_holding_tokens"),
            "state_bytes": stats.get("state_bytes"),
            "pages_in_use": stats.get("pages_in_use"),
            "num_pages": stats.get("num_pages"),
            "page_size": stats.get("page_size"),
            "matches_generate": timings[backend][-1].outputs == outs,
            "generate_agreement": token_agreement(timings[backend][-1].outputs, outs),
            "sample_output": outs[0][:16],
            "outputs": outs,
        }
        rows.append(row)
    return rows



def measure_mixed(model, workload: MixedWorkload, backends, *, repeats: int, warmup: int, page_size: int,
                  device: torch.device) -> list[dict]:
    """The mixed workload as one static batch per backend; rows leave the batch at their own output length.

    The paged pool is sized to the workload (sum over requests of ceil((prompt + output) / page_size)
    pages); the contiguous cache holds max(prompt) + max(output) tokens for every row.
    """
    prompts, outputs = workload.prompts(model.config.vocab_size)
    lengths = workload.lengths()

    def options(backend):
        return cache_options(backend, page_size, num_pages=workload_pages(lengths, page_size))

    stats = {}
    for i in range(max(warmup, 1)):  # the first pass is untimed and reads the cache statistics every step
        for backend in backends:
            t = timed_generate(model, prompts, outputs, backend, record_stats=(i == 0), **options(backend))
            if i == 0:
                stats[backend] = t.kv_stats
    timings: dict[str, list[Timing]] = {b: [] for b in backends}
    for _ in range(repeats):
        for backend in backends:
            timings[backend].append(timed_repeat(model, prompts, outputs, backend, options(backend), device))
    rows = []
    for backend in backends:
        s = stats[backend]
        summary = summarize(timings[backend], len(prompts), sum(len(p) for p in prompts))
        rows.append({
            "backend": backend,
            "num_requests": workload.num_requests,
            "prompt_range": list(workload.prompt_range),
            "output_range": list(workload.output_range),
            "total_prompt_tokens": sum(len(p) for p in prompts),
            "total_output_tokens": sum(outputs),
            **{k: summary[k] for k in ("prefill_ms", "decode_ms_per_token", "e2e_latency_ms", "requests_per_s",
                                       "output_tokens_per_s", "peak_gpu_mem_allocated_gb",
                                       "peak_gpu_mem_reserved_gb")},
            "kv_bytes_allocated": s.get("kv_bytes_allocated"),
            "kv_bytes_in_use": s.get("kv_bytes_in_use"),
            "kv_bytes_holding_tokens": s.get("kv_bytes_holding_tokens"),
            "kv_waste_fraction": 1 - s["kv_bytes_holding_tokens"] / s["kv_bytes_allocated"]
            if s.get("kv_bytes_allocated") else None,
            "state_bytes": s.get("state_bytes"),
            "pages_in_use": s.get("pages_in_use"),
            "num_pages": s.get("num_pages"),
        })
    return rows


