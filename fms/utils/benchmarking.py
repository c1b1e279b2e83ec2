"""Inference benchmark measurements: timed static-batch generation, memory, KV capacity, HF peers, results IO.

Timing drives the cache protocol itself (the same steps as `fms.utils.generation.generate`) so that the
prefill step and every decode step get their own timestamps:

    t0 | create cache, add rows, prefill forward, sample | t1 | decode step | t2 | ... | tN | last sync, free | end
        prefill_ms = t1 - t0            decode_ms_per_token = median(t[k+1] - t[k])      e2e = end - t0

CUDA events on a GPU, time.perf_counter on the CPU. Sizes in GB are 1e9 bytes.
"""

import csv
import gc
import json
import math
import os
import platform
import random
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from fms.modules.attention import get_attention_op
from fms.cache.allocator import OutOfPagesError
from fms.cache.paged import PagedKVCache
from fms.utils.generation import Generator, generate, validate_prompts

GB = 1e9

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
              "generate_agreement")
CSV_COLUMNS = POINT_KEYS + FIGURES + EXTRA_KEYS

# Ops whose cache takes a page size; the others take no cache options.
PAGED_OPS = ("paged",)


def cache_options(backend: str, page_size: int) -> dict:
    return {"page_size": page_size} if backend in PAGED_OPS else {}


# ---------------------------------------------------------------------------------------------
# clocks and memory
# ---------------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepClock:
    """Timestamps on the device timeline: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.is_cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.is_cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def intervals_ms(self) -> list[float]:
        if self.is_cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:])]


def reset_peak_memory(device: torch.device) -> None:
    """Before a measured run: return cached blocks first, so that the reserved peak is this run's own."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def peak_memory_gb(device: torch.device) -> tuple[float | None, float | None]:
    """(max allocated, max reserved) since the last reset, in GB; (None, None) off the GPU."""
    if device.type != "cuda":
        return None, None
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / GB, torch.cuda.max_memory_reserved(device) / GB


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


# ---------------------------------------------------------------------------------------------
# workloads
# ---------------------------------------------------------------------------------------------
def random_prompts(batch_size: int, context_len: int, vocab_size: int, seed: int) -> list[list[int]]:
    """batch_size prompts of exactly context_len random token ids; the same (seed, shape) gives the same ids."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + batch_size * 7919 + context_len)
    return torch.randint(0, vocab_size, (batch_size, context_len), generator=generator).tolist()


@dataclass(frozen=True)
class MixedWorkload:
    """Requests with prompt and output lengths drawn from seeded uniform ranges (inclusive)."""

    num_requests: int
    prompt_range: tuple[int, int]
    output_range: tuple[int, int]
    seed: int = 0

    def __post_init__(self):
        for name, (lo, hi) in (("prompt_range", self.prompt_range), ("output_range", self.output_range)):
            if not 1 <= lo <= hi:
                raise ValueError(f"{name} must be LO,HI with 1 <= LO <= HI, got {lo},{hi}")
        if self.num_requests < 1:
            raise ValueError(f"the mixed workload needs >= 1 request, got {self.num_requests}")

    @property
    def max_len(self) -> int:
        """The longest request the workload can hold: what a contiguous cache sizes every row for."""
        return self.prompt_range[1] + self.output_range[1]

    def lengths(self, count: int | None = None) -> list[tuple[int, int]]:
        """(prompt, output) lengths; the first num_requests are the workload, later ones extend the same stream."""
        rng = random.Random(self.seed)
        return [(rng.randint(*self.prompt_range), rng.randint(*self.output_range))
                for _ in range(count or self.num_requests)]

    def prompts(self, vocab_size: int) -> tuple[list[list[int]], list[int]]:
        generator = torch.Generator().manual_seed(self.seed)
        lens = self.lengths()
        prompts = [torch.randint(0, vocab_size, (p,), generator=generator).tolist() for p, _ in lens]
        return prompts, [o for _, o in lens]


# ---------------------------------------------------------------------------------------------
# the timed generation loop
# ---------------------------------------------------------------------------------------------
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


def _time_calls(run, warmup: int, repeats: int, device):
    """Median wall ms of run() over repeats after warmup calls; -> (ms, last result, peak alloc GB)."""
    for _ in range(warmup):
        run()
    times, out = [], None
    reset_peak_memory(device)
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        out = run()
        synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    peak_alloc, _ = peak_memory_gb(device)
    return statistics.median(times), out, peak_alloc


def timed_repeat(model, prompts, max_new_tokens, backend, options, device, generator=None) -> Timing:
    """One timed run with the GPU peak-memory counters reset just before it."""
    reset_peak_memory(device)
    timing = timed_generate(model, prompts, max_new_tokens, backend, generator=generator, **options)
    timing.peak_mem_allocated_gb, timing.peak_mem_reserved_gb = peak_memory_gb(device)
    return timing


def summarize(timings: list[Timing], batch_size: int, num_input_tokens: int) -> dict:
    """Medians over repeats of one (point, backend)."""
    e2e_ms = _median([t.e2e_ms for t in timings])
    prefill_ms = _median([t.prefill_ms for t in timings])
    out_tokens = _median([t.num_output_tokens for t in timings])
    e2e_s = e2e_ms / 1e3
    alloc = [t.peak_mem_allocated_gb for t in timings if t.peak_mem_allocated_gb is not None]
    reserved = [t.peak_mem_reserved_gb for t in timings if t.peak_mem_reserved_gb is not None]
    return {
        "prefill_ms": prefill_ms,
        "decode_ms_per_token": _median([_median(t.decode_step_ms) for t in timings]),
        "e2e_latency_ms": e2e_ms,
        "requests_per_s": batch_size / e2e_s,
        "input_tokens_per_s": num_input_tokens / e2e_s,
        "output_tokens_per_s": out_tokens / e2e_s,
        "prefill_tokens_per_s": num_input_tokens / (prefill_ms / 1e3),
        "peak_gpu_mem_allocated_gb": max(alloc) if alloc else None,
        "peak_gpu_mem_reserved_gb": max(reserved) if reserved else None,
        "e2e_latency_ms_repeats": [t.e2e_ms for t in timings],
    }


# ---------------------------------------------------------------------------------------------
# sweep points
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SweepPoint:
    batch_size: int
    context_len: int
    sweeps: tuple[str, ...]

    @property
    def sweep(self) -> str:
        return "+".join(self.sweeps)


def sweep_points(batch_sizes, base_context, context_lengths, base_batch) -> list[SweepPoint]:
    """Batch sweep at base_context, then context sweep at base_batch; a shared point is measured once."""
    order: dict[tuple[int, int], list[str]] = {}
    for b in batch_sizes:
        order.setdefault((b, base_context), []).append("batch")
    for c in context_lengths:
        order.setdefault((base_batch, c), []).append("context")
    return [SweepPoint(b, c, tuple(s)) for (b, c), s in order.items()]


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


# ---------------------------------------------------------------------------------------------
# mixed-length workload: KV bytes per backend and the largest batch within a KV budget
# ---------------------------------------------------------------------------------------------
def workload_pages(lengths, page_size: int) -> int:
    return sum(math.ceil((p + o) / page_size) for p, o in lengths)


def measure_mixed(model, workload: MixedWorkload, backends, *, repeats: int, warmup: int, page_size: int,
                  device: torch.device) -> list[dict]:
    """The mixed workload as one static batch per backend; rows leave the batch at their own output length.

    The paged pool is sized to the workload (sum over requests of ceil((prompt + output) / page_size)
    pages); the contiguous cache holds max(prompt) + max(output) tokens for every row.
    """
    prompts, outputs = workload.prompts(model.config.vocab_size)
    lengths = workload.lengths()

    def options(backend):
        opts = cache_options(backend, page_size)
        if backend in PAGED_OPS:
            opts["num_pages"] = workload_pages(lengths, page_size)
        return opts

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


def kv_capacity(model, workload: MixedWorkload, backend: str, budget_gb: float, page_size: int,
                verify: bool = False, max_requests: int = 1_000_000) -> dict:
    """Largest batch of this workload's requests whose KV cache fits in budget_gb (1e9 bytes).

    Computed from sizes measured on real caches, not from a formula: a 1-row cache gives a contiguous
    row's bytes (max_len tokens + its scratch column); a 1-page pool gives a page's bytes. Contiguous:
    floor(budget / row_bytes) rows. Paged: requests in workload order while the sum of
    ceil((prompt + output) / page_size) pages fits in floor(budget / page_bytes) - 1 pages (one scratch
    page). verify=True allocates a cache of that size and fills it to check the computed answer.
    Recurrent (Mamba) state is not part of the KV budget; it is reported per sequence.
    """
    spec = model.cache_spec()
    op = get_attention_op(backend)
    budget = budget_gb * GB
    max_len = workload.max_len
    probe = op.create_cache(spec, 1, max_len, **_probe_options(backend, page_size))
    if isinstance(probe, PagedKVCache):
        page_bytes = probe.memory_stats().bytes_allocated
        state_per_seq = _state_bytes_per_seq(probe)
        usable_pages = max(int(budget // page_bytes) - 1, 0)
        used, count, lengths = 0, 0, workload.lengths(max(4 * workload.num_requests, 64))
        while count < max_requests:
            if count == len(lengths):
                lengths = workload.lengths(2 * len(lengths))
            need = math.ceil(sum(lengths[count]) / page_size)
            if used + need > usable_pages:
                break
            used += need
            count += 1
        result = {"backend": backend, "kind": "paged", "page_bytes": page_bytes, "page_size": page_size,
                  "pool_pages": usable_pages, "pages_used": used, "largest_batch": count,
                  "kv_bytes_needed": used * page_bytes, "state_bytes_per_seq": state_per_seq,
                  "rule": "sum(ceil((prompt+output)/page_size)) * page_bytes <= budget - 1 scratch page"}
        if verify:
            result["verify"] = _verify_paged(op, spec, workload, lengths[: count + 1], count, budget_gb, page_size,
                                             usable_pages)
    else:
        row_bytes = probe.memory_stats().bytes_allocated
        count = min(int(budget // row_bytes), max_requests)
        result = {"backend": backend, "kind": "contiguous", "row_bytes": row_bytes, "max_len": max_len,
                  "largest_batch": count, "kv_bytes_needed": count * row_bytes,
                  "state_bytes_per_seq": _state_bytes_per_seq(probe),
                  "rule": "batch * (max_len + 1 scratch column) * bytes_per_token <= budget"}
        if verify:
            result["verify"] = _verify_contiguous(op, spec, max_len, count, row_bytes, budget)
    result.update(budget_gb=budget_gb, kv_bytes_per_token=spec.kv_bytes_per_token)
    return result


def _probe_options(backend, page_size):
    return {**cache_options(backend, page_size), **({"num_pages": 1} if backend in PAGED_OPS else {})}


def _state_bytes_per_seq(cache) -> int:
    if cache.state_pool is None:
        return 0
    cache.add("probe")
    try:
        return cache.memory_stats().state_bytes
    finally:
        cache.free("probe")


def _device_bytes(device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.memory_allocated(device)


def _verify_paged(op, spec, workload, lengths, count, budget_gb, page_size, usable_pages) -> dict:
    """Allocate the pool for the budget, reserve pages for `count` requests, check the next one does not fit."""
    before = _device_bytes(spec.device)
    try:
        cache = op.create_cache(spec, max_batch_size=count + 1, max_seq_len=workload.max_len, page_size=page_size,
                                memory_gb=budget_gb)
    except torch.cuda.OutOfMemoryError as exc:
        return {"ok": False, "error": f"OutOfMemoryError: {exc}"}
    allocated = _device_bytes(spec.device)
    fitted = 0
    for i, (p, o) in enumerate(lengths[:count]):
        cache.add(i)
        cache.prepare([i], [p + o])
        fitted += 1
    next_fails = False
    if len(lengths) > count:
        cache.add(count)
        try:
            cache.prepare([count], [sum(lengths[count])])
        except OutOfPagesError:
            next_fails = True
    return {
        "ok": cache.num_pages == usable_pages and fitted == count and next_fails,
        "pool_pages": cache.num_pages, "requests_reserved": fitted, "next_request_out_of_pages": next_fails,
        "device_bytes_allocated": None if before is None else allocated - before,
    }


def _verify_contiguous(op, spec, max_len, count, row_bytes, budget) -> dict:
    if count < 1:
        return {"ok": True, "note": "not even one row fits"}
    before = _device_bytes(spec.device)
    try:
        cache = op.create_cache(spec, max_batch_size=count, max_seq_len=max_len)
    except torch.cuda.OutOfMemoryError as exc:
        return {"ok": False, "error": f"OutOfMemoryError: {exc}"}
    allocated = cache.memory_stats().bytes_allocated
    after = _device_bytes(spec.device)
    del cache
    return {"ok": allocated == count * row_bytes and allocated <= budget < allocated + row_bytes,
            "cache_bytes_allocated": allocated,
            "device_bytes_allocated": None if before is None else after - before}


# ---------------------------------------------------------------------------------------------
# HF transformers peers (same config, same random weights)
# ---------------------------------------------------------------------------------------------
def hf_config_dict(architecture: str, config) -> dict:
    """Our config -> HF config.json fields (the inverse of the models' *_config_from_hf)."""
    c = config
    hf = dict(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim,
        intermediate_size=c.intermediate_size, rms_norm_eps=c.rms_norm_eps,
        max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=c.tie_word_embeddings,
        attention_bias=False, mlp_bias=False, hidden_act="silu", bos_token_id=c.bos_token_id,
        eos_token_id=None,
        pad_token_id=c.pad_token_id if c.pad_token_id is not None and c.pad_token_id < c.vocab_size else 0,
        rope_theta=c.rope_theta,
    )
    if c.rope_scaling is not None:
        s = c.rope_scaling
        hf["rope_scaling"] = dict(rope_type="llama3", factor=s.factor, low_freq_factor=s.low_freq_factor,
                                  high_freq_factor=s.high_freq_factor,
                                  original_max_position_embeddings=s.original_max_position_embeddings)
    if c.sliding_window is not None or c.alibi or c.attn_logit_softcapping is not None:
        raise ValueError("the HF peer supports plain causal attention only (no sliding window/alibi/softcap)")
    if architecture == "llama":
        return dict(hf, model_type="llama")
    granite = dict(embedding_multiplier=c.embedding_multiplier,
                   attention_multiplier=c.attention_multiplier or c.head_dim ** -0.5,
                   residual_multiplier=c.residual_multiplier, logits_scaling=c.logits_scaling)
    if architecture == "granite":
        return dict(hf, model_type="granite", **granite)
    if architecture == "granite_hybrid":
        hybrid = dict(
            hf, **granite, model_type="granitemoehybrid", layer_types=list(c.layer_types),
            position_embedding_type=c.position_embedding_type,
            shared_intermediate_size=c.intermediate_size, intermediate_size=c.expert_intermediate_size or
            c.intermediate_size, num_local_experts=c.num_experts, num_experts_per_tok=c.num_experts_per_token,
        )
        if "mamba" in c.layer_types:
            inner = c.mamba_num_heads * c.mamba_head_dim
            if inner % c.hidden_size:
                raise ValueError(f"HF computes the Mamba width as an integer multiple of hidden_size; {inner} is not")
            hybrid.update(
                mamba_n_heads=c.mamba_num_heads, mamba_d_head=c.mamba_head_dim, mamba_d_state=c.mamba_state_size,
                mamba_n_groups=c.mamba_num_groups, mamba_d_conv=c.mamba_conv_kernel,
                mamba_chunk_size=c.mamba_chunk_size, mamba_conv_bias=c.mamba_conv_bias,
                mamba_proj_bias=c.mamba_proj_bias, mamba_expand=inner // c.hidden_size,
            )
        return hybrid
    raise ValueError(f"no HF peer for architecture {architecture!r}")


def _hf_config(hf: dict):
    import inspect

    from transformers import AutoConfig

    hf = dict(hf)
    model_type = hf.pop("model_type")
    config_class = type(AutoConfig.for_model(model_type))
    if "rope_parameters" in inspect.signature(config_class.__init__).parameters:  # transformers v5
        params = {"rope_type": "default", "rope_theta": hf.pop("rope_theta")}
        params.update(hf.pop("rope_scaling", None) or {})
        hf["rope_parameters"] = params
    return AutoConfig.for_model(model_type, **hf)


def hf_twin(model, architecture: str):
    """A HF transformers model with our config and a copy of our weights (same device and dtype)."""
    from transformers import AutoModelForCausalLM

    from fms.utils import serialization

    rules, _ = serialization._RULES[architecture]
    config = _hf_config(hf_config_dict(architecture, model.config))
    param = model.embedding.weight
    with torch.device(param.device):
        hf_model = AutoModelForCausalLM.from_config(config, dtype=param.dtype, attn_implementation="sdpa")
    hf_state = hf_model.state_dict()
    filled = set()
    with torch.no_grad():
        for name, ours in model.named_parameters():
            sources, rule = serialization._sources_for(name, rules)
            if rule.transform is not None:
                raise ValueError(f"cannot invert the checkpoint transform for {name}")
            absent = [src for src in sources if src not in hf_state]
            if absent:
                raise ValueError(f"the installed transformers has no tensor {absent[0]} (for our {name}); "
                                 "its names for this model differ from the checkpoint's")
            if len(sources) == 1:
                pieces = [ours]
            else:
                pieces = ours.split([hf_state[s].shape[0] for s in sources], dim=0)
            for source, piece in zip(sources, pieces):
                if tuple(hf_state[source].shape) != tuple(piece.shape):
                    raise ValueError(f"{name} {list(piece.shape)} does not fit HF {source} "
                                     f"{list(hf_state[source].shape)}")
                hf_state[source].copy_(piece)
                filled.add(source)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    buffers = {n for n, _ in hf_model.named_buffers()}
    missing = sorted(set(hf_state) - filled - tied - buffers)
    if missing:
        raise ValueError(f"HF parameters with no fms counterpart: {missing[:5]}")
    hf_model.generation_config.eos_token_id = None
    hf_model.generation_config.pad_token_id = config.pad_token_id
    return hf_model.eval()


@torch.no_grad()
def hf_generate_point(hf_model, prompts, max_new_tokens, *, repeats, warmup, device) -> dict:
    """HF `generate` (static cache off, attn sdpa) on equal-length prompts: output tokens/s."""
    input_ids = torch.tensor(prompts, dtype=torch.long, device=device)
    kwargs = dict(attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                  min_new_tokens=max_new_tokens, do_sample=False)

    def run():
        return hf_model.generate(input_ids, **kwargs)[:, input_ids.shape[1]:]

    e2e, out, peak_alloc = _time_calls(run, warmup, repeats, device)
    return {"e2e_latency_ms": e2e, "output_tokens_per_s": out.numel() / (e2e / 1e3),
            "requests_per_s": len(prompts) / (e2e / 1e3), "peak_gpu_mem_allocated_gb": peak_alloc,
            "outputs": out.tolist()}


HF_CB_ATTN = ("paged|sdpa", "sdpa", "paged|eager")


def hf_generate_batch_point(hf_model, prompts, max_new_tokens, *, repeats, warmup, device) -> dict:
    """HF continuous batching (`generate_batch`), trying the paged attention implementations in HF_CB_ATTN.

    Where generate_batch takes persistent_manager, the warm-up call builds the manager (cache sized
    from free GPU memory, CUDA graphs captured) and the timed calls reuse it: steady-state throughput.
    Otherwise every timed call includes that set-up (reported as manager_reused False).
    """
    import inspect

    from transformers import GenerationConfig

    if not hasattr(hf_model, "generate_batch"):
        raise RuntimeError("this transformers has no generate_batch (continuous batching)")
    gen = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None,
                           pad_token_id=hf_model.generation_config.pad_token_id)
    accepted = inspect.signature(hf_model.generate_batch).parameters
    extra = {"progress_bar": False} if "progress_bar" in accepted else {}
    reuse = "persistent_manager" in accepted
    if reuse:
        extra["persistent_manager"] = True
    destroy = getattr(hf_model, "destroy_cached_continuous_batching_manager", None)
    original = hf_model.config._attn_implementation
    errors = []
    for attn in HF_CB_ATTN:
        try:
            hf_model.set_attn_implementation(attn)

            def run():
                results = hf_model.generate_batch(inputs=prompts, generation_config=gen, **extra)
                tokens = [list(r.generated_tokens) for r in results.values()]
                if len(tokens) != len(prompts) or any(getattr(r, "error", None) for r in results.values()):
                    raise RuntimeError(f"generate_batch returned {len(tokens)} of {len(prompts)} results")
                return tokens

            e2e, tokens, peak_alloc = _time_calls(run, max(warmup, 1), repeats, device)
            return {"attn_implementation": attn, "manager_reused": reuse, "e2e_latency_ms": e2e,
                    "output_tokens_per_s": sum(len(t) for t in tokens) / (e2e / 1e3),
                    "requests_per_s": len(prompts) / (e2e / 1e3), "peak_gpu_mem_allocated_gb": peak_alloc,
                    "outputs": tokens, "attempts_failed": errors}
        except Exception as exc:  # noqa: BLE001 - report and try the next implementation
            errors.append(f"{attn}: {type(exc).__name__}: {exc}")
        finally:
            try:
                if destroy is not None:
                    destroy()  # the manager was sized for this point's requests
                hf_model.set_attn_implementation(original)
            except Exception:  # noqa: BLE001
                pass
    raise RuntimeError("generate_batch failed with every attention implementation: " + " | ".join(errors))


# ---------------------------------------------------------------------------------------------
# run metadata, results files, tables, plots, wandb
# ---------------------------------------------------------------------------------------------
def git_commit(cwd=None) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def run_metadata(command: str, device: torch.device) -> dict:
    meta = {
        "command": command,
        "device": device_name(device),
        "device_type": device.type,
        "torch_version": torch.__version__,
        "git_commit": git_commit(Path(__file__).resolve().parent),
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "gb": "1e9 bytes",
    }
    if device.type == "cuda":
        meta["gpu_memory_gb"] = torch.cuda.get_device_properties(device).total_memory / GB
    try:
        import transformers

        meta["transformers_version"] = transformers.__version__
    except ImportError:
        meta["transformers_version"] = None
    return meta


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def write_results(results_dir: Path, results: dict) -> dict[str, Path]:
    """results.json (everything), points.csv (one row per point and backend), mixed.csv / peers.csv if any."""
    results_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": results_dir / "results.json", "csv": results_dir / "points.csv"}
    paths["json"].write_text(json.dumps(_jsonable(results), indent=2) + "\n")
    _write_csv(paths["csv"], results["points"], CSV_COLUMNS)
    if results.get("mixed"):
        paths["mixed_csv"] = results_dir / "mixed.csv"
        _write_csv(paths["mixed_csv"], results["mixed"]["runs"], list(results["mixed"]["runs"][0]))
    if results.get("peers"):
        paths["peers_csv"] = results_dir / "peers.csv"
        cols = ("peer", "batch_size", "context_len", "max_new_tokens", "e2e_latency_ms", "output_tokens_per_s",
                "requests_per_s", "peak_gpu_mem_allocated_gb", "attn_implementation", "manager_reused",
                "tokens_match_fms", "error")
        _write_csv(paths["peers_csv"], results["peers"], cols)
    return paths


def _write_csv(path: Path, rows, columns):
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(row.get(k)) for k in columns})


def _csv_value(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, tuple)):
        return " ".join(str(x) for x in v)
    return v


def _fmt(v, digits=2):
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _mb(v):
    return None if v is None else v / 1e6


def markdown_table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def points_table(points) -> str:
    header = ["sweep", "backend", "batch", "context", "new", "prefill ms", "decode ms/tok", "e2e ms", "req/s",
              "in tok/s", "out tok/s", "peak alloc GB", "peak resv GB", "KV alloc MB", "KV in use MB",
              "KV tokens MB", "= generate"]
    rows = [[p["sweep"], p["backend"], p["batch_size"], p["context_len"], p["max_new_tokens"], p["prefill_ms"],
             p["decode_ms_per_token"], p["e2e_latency_ms"], p["requests_per_s"], p["input_tokens_per_s"],
             p["output_tokens_per_s"], p["peak_gpu_mem_allocated_gb"], p["peak_gpu_mem_reserved_gb"],
             _mb(p["kv_bytes_allocated"]), _mb(p["kv_bytes_in_use"]), _mb(p["kv_bytes_holding_tokens"]),
             p["generate_agreement"]] for p in points]
    return markdown_table(header, rows)


def side_by_side_tables(points, backends) -> str:
    """Seed-report layout: one row per sweep value, each backend's figures side by side."""
    out = []
    for sweep, key, label in (("batch", "batch_size", "Batch Size"), ("context", "context_len", "Context Length")):
        chosen = [p for p in points if sweep in p["sweep"].split("+")]
        if not chosen:
            continue
        header = [label]
        for b in backends:
            header += [f"{b} latency ms", f"{b} QPS", f"{b} ms/token", f"{b} peak GB"]
        rows = []
        for value in sorted({p[key] for p in chosen}):
            row = [value]
            for b in backends:
                p = next((q for q in chosen if q[key] == value and q["backend"] == b), None)
                row += [None] * 4 if p is None else [p["e2e_latency_ms"], p["requests_per_s"],
                                                     p["decode_ms_per_token"], p["peak_gpu_mem_allocated_gb"]]
            rows.append(row)
        out.append(f"{sweep} sweep\n" + markdown_table(header, rows))
    return "\n\n".join(out)


def mixed_tables(mixed: dict) -> str:
    runs = mixed["runs"]
    header = ["backend", "requests", "e2e ms", "out tok/s", "KV alloc MB", "KV in use MB", "KV tokens MB",
              "KV waste", "peak alloc GB"]
    rows = [[r["backend"], r["num_requests"], r["e2e_latency_ms"], r["output_tokens_per_s"],
             _mb(r["kv_bytes_allocated"]), _mb(r["kv_bytes_in_use"]), _mb(r["kv_bytes_holding_tokens"]),
             r["kv_waste_fraction"], r["peak_gpu_mem_allocated_gb"]] for r in runs]
    cap = mixed["capacity"]
    cap_header = ["backend", "KV budget GB", "largest batch", "KV bytes needed MB", "rule", "verified"]
    cap_rows = [[c["backend"], c["budget_gb"], c["largest_batch"], _mb(c["kv_bytes_needed"]), c["rule"],
                 _verify_label(c.get("verify"))] for c in cap]
    return (markdown_table(header, rows) + "\n\nlargest batch within the KV budget (computed from measured "
            "per-row / per-page sizes)\n" + markdown_table(cap_header, cap_rows))


def _verify_label(v):
    if v is None:
        return "not run"
    return "yes" if v.get("ok") else f"NO {v}"


def peers_table(peers) -> str:
    header = ["peer", "batch", "context", "new", "e2e ms", "out tok/s", "peak alloc GB", "attn", "= fms", "error"]
    rows = [[p["peer"], p["batch_size"], p["context_len"], p["max_new_tokens"], p.get("e2e_latency_ms"),
             p.get("output_tokens_per_s"), p.get("peak_gpu_mem_allocated_gb"), p.get("attn_implementation") or "-",
             p.get("tokens_match_fms"), p.get("error") or ""] for p in peers]
    return markdown_table(header, rows)


# -- plots ------------------------------------------------------------------------------------
def plot_results(results: dict, results_dir: Path) -> dict[str, Path]:
    """PNG per figure; every backend (and HF peer) is a line on each plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = results["points"]
    backends = results["config"]["backends"]
    peers = results.get("peers") or []
    title = f"{results['model']['architecture']} {results['model']['variant']} on {results['meta']['device']}"
    paths = {}

    def sweep_of(name):
        return [p for p in points if name in p["sweep"].split("+")]

    def line_plot(name, sweep, key, ylabel, xlabel, log_x, extra=None):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        chosen = sweep_of(sweep)
        drawn = False
        for backend in backends:
            rows = sorted((p for p in chosen if p["backend"] == backend), key=lambda p: p[_x_key(sweep)])
            xs = [p[_x_key(sweep)] for p in rows if p.get(key) is not None]
            ys = [p[key] for p in rows if p.get(key) is not None]
            if xs:
                ax.plot(xs, ys, marker="o", label=backend)
                drawn = True
        if extra:
            drawn = extra(ax, chosen) or drawn
        if not drawn:
            ax.text(0.5, 0.5, "no points measured", ha="center", va="center", transform=ax.transAxes)
        if log_x and drawn:
            ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.grid(True, alpha=0.3)
        if drawn:
            ax.legend()
        fig.tight_layout()
        path = results_dir / f"{name}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths[name] = path

    def peer_lines(ax, chosen):
        drawn = False
        keys = {(p["batch_size"], p["context_len"]) for p in chosen}
        for peer in sorted({p["peer"] for p in peers}):
            rows = sorted((p for p in peers if p["peer"] == peer and (p["batch_size"], p["context_len"]) in keys
                           and p.get("output_tokens_per_s") is not None), key=lambda p: p["batch_size"])
            if rows:
                ax.plot([p["batch_size"] for p in rows], [p["output_tokens_per_s"] for p in rows], marker="s",
                        linestyle="--", label=peer)
                drawn = True
        return drawn

    line_plot("latency_vs_batch", "batch", "e2e_latency_ms", "end-to-end latency (ms)", "batch size", True)
    line_plot("throughput_vs_batch", "batch", "output_tokens_per_s", "output tokens/s", "batch size", True,
              extra=peer_lines)
    line_plot("ms_per_token_vs_context", "context", "decode_ms_per_token", "decode ms/token (median step)",
              "context length (tokens)", True)
    has_gpu_peak = any(p.get("peak_gpu_mem_allocated_gb") is not None for p in points)
    if has_gpu_peak:
        line_plot("peak_memory_vs_context", "context", "peak_gpu_mem_allocated_gb", "peak GPU memory allocated (GB)",
                  "context length (tokens)", True)
    else:
        for p in points:
            p["_kv_allocated_mb"] = p["kv_bytes_allocated"] / 1e6 if p.get("kv_bytes_allocated") else None
        line_plot("peak_memory_vs_context", "context", "_kv_allocated_mb",
                  "KV cache allocated (MB); no GPU peak on the CPU", "context length (tokens)", True)
        for p in points:
            p.pop("_kv_allocated_mb", None)
    if results.get("mixed"):
        paths["mixed_kv_memory"] = _plot_mixed(plt, results["mixed"], results_dir, title)
    return paths


def _x_key(sweep):
    return "batch_size" if sweep == "batch" else "context_len"


def _plot_mixed(plt, mixed, results_dir, title):
    runs, caps = mixed["runs"], mixed["capacity"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.5))
    names = [r["backend"] for r in runs]
    kinds = (("kv_bytes_allocated", "allocated"), ("kv_bytes_in_use", "in use (peak)"),
             ("kv_bytes_holding_tokens", "holding tokens"))
    width = 0.8 / len(kinds)
    for i, (key, label) in enumerate(kinds):
        left.bar([j + i * width for j in range(len(runs))], [(r[key] or 0) / 1e6 for r in runs], width, label=label)
    left.set_xticks([j + width for j in range(len(runs))], names)
    left.set_ylabel("KV cache (MB)")
    left.set_title(f"mixed workload: {runs[0]['num_requests']} requests", fontsize=9)
    left.legend(fontsize=8)
    right.bar([c["backend"] for c in caps], [c["largest_batch"] for c in caps])
    right.set_ylabel("largest batch")
    right.set_title(f"fits in {caps[0]['budget_gb']} GB of KV cache", fontsize=9)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = results_dir / "mixed_kv_memory.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# -- wandb ------------------------------------------------------------------------------------
WANDB_MISSING = "wandb is not installed; pip install wandb or drop --wandb"


def start_wandb(config: dict, results_dir: Path, name: str, project: str = "fms-inference-benchmark"):
    """A wandb run, or None (with a message) if wandb is missing or fails to start: it is never required.

    Offline unless WANDB_MODE says otherwise or WANDB_API_KEY is set.
    """
    try:
        import wandb
    except ImportError:
        print(WANDB_MISSING)
        return None
    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    try:
        results_dir.mkdir(parents=True, exist_ok=True)
        run = wandb.init(project=os.environ.get("WANDB_PROJECT", project), name=name, config=_jsonable(config),
                         dir=str(results_dir), mode=mode)
    except Exception as exc:  # noqa: BLE001 - logging must never stop a benchmark
        print(f"wandb could not start ({type(exc).__name__}: {exc}); continuing without it")
        return None
    print(f"wandb: logging in {mode} mode under {results_dir / 'wandb'}")
    return run


def log_wandb_points(run, rows, section: str) -> None:
    if run is None:
        return
    for row in rows:
        numbers = {f"{section}/{row['backend']}/{k}": v for k, v in row.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None}
        run.log({**numbers, f"{section}/batch_size": row.get("batch_size"),
                 f"{section}/context_len": row.get("context_len")})


def finish_wandb(run, results: dict, plots: dict[str, Path]) -> None:
    if run is None:
        return
    import wandb

    try:
        points = results["points"]
        if points:
            columns = list(CSV_COLUMNS)
            run.log({"points": wandb.Table(columns=columns, data=[[_csv_value(p.get(c)) for c in columns]
                                                                  for p in points])})
        run.log({f"plots/{name}": wandb.Image(str(path)) for name, path in plots.items()})
        run.summary["results_json"] = str(results.get("paths", {}).get("json", ""))
    finally:
        run.finish()
