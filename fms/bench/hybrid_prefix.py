"""Prefix caching on a Granite-4.0-H hybrid: a shared system prompt, caching on vs off (and the hit rate an
attention-only model of the same shape gets on the same workload).

Workload (the issue's): num_requests requests share a system prompt of system_tokens random tokens, each
followed by 64-256 unique tokens (uniform, seeded) and max_new_tokens new tokens, EOS ignored, all arriving
at t=0 (TTFT includes queueing). Weights are random (seeded): the numbers measure the engine, not a model.
The engine runs the same requests with prefix caching off, then on (a fresh engine each, after an untimed
warm-up on another system prompt whose pages are dropped); greedy tokens on vs off are compared.

Reported per run: TTFT p50/p90, output tok/s, the hit rate (prompt tokens served from cache / prompt
tokens), and for caching on the checkpoint memory: bytes per checkpoint (whole pages of the pool), KV
bytes per page, and checkpoint bytes per cached page (at the end of the run, before anything is freed).
On CPU the defaults shrink to the tiny "h-nano" shape (8 requests, 64-token system prompt): it checks the
benchmark end to end; its numbers are not a performance measurement.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fms.bench.results import run_metadata, write_json
from fms.bench.serving import percentiles_ms, reset_engine
from fms.bench.timing import release_memory, synchronize
from fms.cache.state import CheckpointLayout
from fms.models import get_model
from fms.runtime.sampling_params import SamplingParams
from fms.serving import LLMEngine


@dataclass
class HybridPrefixBenchConfig:
    """None fields take the device's default: CUDA the issue's workload on 4.0-h-1b, CPU a tiny demo."""

    results_dir: Path = Path("results")
    device: str = "cpu"
    variant: str | None = None  # granite_hybrid variant (default 4.0-h-1b on CUDA, h-nano on CPU)
    num_requests: int | None = None
    system_tokens: int | None = None
    unique_range: tuple[int, int] | None = None
    max_new_tokens: int | None = None
    page_size: int = 16
    max_num_batched_tokens: int | None = None
    attention_only_reference: bool = True  # also run the workload on an all-attention model of the same shape
    compile: bool = True  # torch.compile the engine's decode step and prefill (False: CUDA graphs only)
    seed: int = 0
    command: str = ""

    def __post_init__(self):
        cuda = torch.device(self.device).type == "cuda"
        defaults = dict(variant="4.0-h-1b", num_requests=64, system_tokens=1024, unique_range=(64, 256),
                        max_new_tokens=128) if cuda else dict(
            variant="h-nano", num_requests=8, system_tokens=64, unique_range=(8, 24), max_new_tokens=8)
        for name, value in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        for name in ("num_requests", "system_tokens", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        low, high = self.unique_range
        if not 1 <= low <= high:
            raise ValueError(f"unique_range must be (low, high) with 1 <= low <= high, got {self.unique_range!r}")


def workload(config: HybridPrefixBenchConfig, vocab_size: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    system = torch.randint(1, vocab_size, (config.system_tokens,), generator=g).tolist()
    low, high = config.unique_range
    lengths = torch.randint(low, high + 1, (config.num_requests,), generator=g).tolist()
    return [system + torch.randint(1, vocab_size, (n,), generator=g).tolist() for n in lengths]


def _engine(model, config: HybridPrefixBenchConfig, caching: bool, prompts) -> LLMEngine:
    longest = max(len(p) for p in prompts) + config.max_new_tokens
    options = dict(page_size=config.page_size, enable_prefix_caching=caching, max_model_len=longest + config.page_size)
    if not config.compile:
        options.update(compile_decode=False, compile_prefill=False)
    if config.max_num_batched_tokens:
        options["max_num_batched_tokens"] = config.max_num_batched_tokens
    if model.embedding.weight.device.type != "cuda":  # CPU: a pool for every request at once, plus room to cache
        options["num_pages"] = 2 * sum(-(-(len(p) + config.max_new_tokens) // config.page_size) for p in prompts)
    return LLMEngine(model, **options)


def run_once(model, config: HybridPrefixBenchConfig, caching: bool, prompts, device) -> tuple[dict, list]:
    engine = _engine(model, config, caching, prompts)
    params = SamplingParams(max_new_tokens=config.max_new_tokens, ignore_eos=True)
    if device.type == "cuda":  # untimed: compiles and warms kernels; another system prompt, dropped after
        warm = workload(config, model.config.vocab_size, config.seed + 9973)[: min(8, len(prompts))]
        engine.generate(warm, SamplingParams(max_new_tokens=4, ignore_eos=True), use_tqdm=False)
    reset_engine(engine)
    synchronize(device)
    start = time.perf_counter()
    outs = engine.generate(prompts, params, use_tqdm=device.type == "cuda")
    synchronize(device)
    duration = time.perf_counter() - start
    stats = engine.stats()
    num_out = sum(len(o.token_ids) for o in outs)
    row = {
        "prefix_caching": caching,
        "duration_s": duration,
        "output_tokens_per_s": num_out / duration,
        **percentiles_ms([o.time_to_first_token for o in outs], "ttft"),
        "prefix_cache_hit_rate": stats["prefix_cache_hit_rate"],
        "prefix_cache_hit_tokens": stats["prefix_cache_hit_tokens"],
        "prompt_tokens": sum(len(p) for p in prompts),
        "num_preemptions": stats["num_preemptions"],
        "num_output_tokens": num_out,
    }
    if caching and engine.kv.checkpoints is not None:
        layout = CheckpointLayout.for_spec(model.cache_spec(), config.page_size)
        num_cached_pages = engine.prefix_cache.num_cached_pages  # K/V pages in the cache (held or not)
        row.update({
            "num_cached_checkpoints": stats["num_cached_checkpoints"],
            "checkpoint_bytes": stats["checkpoint_bytes"],
            "num_cached_kv_pages": num_cached_pages,
            "checkpoint_bytes_per_cached_page": stats["checkpoint_bytes"] / max(num_cached_pages, 1),
            "checkpoint_interval_pages": stats["checkpoint_interval_pages"],
            "pages_per_checkpoint": layout.num_pages,
            "bytes_per_checkpoint": layout.bytes,
            "state_bytes_per_checkpoint": layout.state_spec.bytes_per_sequence,
            "kv_bytes_per_page": layout.page_bytes,
        })
    row["engine_stats"] = stats
    del engine  # its pool took a fraction of free GPU memory: give it back before the next engine sizes its own
    release_memory(device)
    return row, [o.token_ids for o in outs]


def run_hybrid_prefix_benchmark(config: HybridPrefixBenchConfig) -> dict:
    device = torch.device(config.device)
    if device.type != "cuda":
        print("CPU run: the tiny h-nano shape; it checks the benchmark end to end, not performance.")
    model = get_model("granite_hybrid", config.variant, device_type=device.type, seed=config.seed,
                      **({} if device.type == "cuda" else dict(embedding_multiplier=1.0, init_std=0.3)))
    prompts = workload(config, model.config.vocab_size, config.seed)
    rows, tokens = [], {}
    for caching in (False, True):
        row, tokens[caching] = run_once(model, config, caching, prompts, device)
        row["system"] = f"granite_hybrid {config.variant}, prefix caching {'on' if caching else 'off'}"
        rows.append(row)
    same = sum(a == b for a, b in zip(tokens[True], tokens[False]))
    rows[1]["greedy_tokens_equal_caching_off"] = f"{same}/{len(prompts)}"
    if config.attention_only_reference:
        layers = ("attention",) * model.config.num_layers
        del model
        release_memory(device)
        attention = get_model("granite_hybrid", config.variant, device_type=device.type, seed=config.seed,
                              layer_types=layers,
                              **({} if device.type == "cuda" else dict(embedding_multiplier=1.0, init_std=0.3)))
        row, _ = run_once(attention, config, True, prompts, device)
        row["system"] = f"granite_hybrid {config.variant}, all layers attention, prefix caching on"
        rows.append(row)
        rows[1]["hit_rate_vs_attention_only"] = rows[1]["prefix_cache_hit_rate"] / max(row["prefix_cache_hit_rate"],
                                                                                       1e-12)
    results = {
        "metadata": run_metadata(config.command, device),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
        "results": rows,
        "cpu_demo": device.type != "cuda",
    }
    path = write_json(Path(config.results_dir) / "hybrid_prefix_cache.json", results)
    for row in rows:
        print(summary_line(row))
    print(f"wrote {path}")
    return results


def summary_line(row: dict) -> str:
    line = (f"{row['system']}: TTFT p50 {row['ttft_p50_ms']:.1f} ms, p90 {row['ttft_p90_ms']:.1f} ms, "
            f"{row['output_tokens_per_s']:.1f} output tok/s, hit rate {row['prefix_cache_hit_rate']:.1%}")
    if "checkpoint_bytes_per_cached_page" in row:
        line += (f", checkpoints {row['num_cached_checkpoints']} x {_size(row['bytes_per_checkpoint'])} "
                 f"({row['pages_per_checkpoint']} pages of {_size(row['kv_bytes_per_page'])}), "
                 f"{_size(row['checkpoint_bytes_per_cached_page'])} per cached page")
    if "hit_rate_vs_attention_only" in row:
        line += f", {row['hit_rate_vs_attention_only']:.1%} of attention-only's hit rate"
    return line


def _size(num_bytes: float) -> str:
    return f"{num_bytes / 1e6:.1f} MB" if num_bytes >= 1e6 else f"{num_bytes / 1e3:.1f} kB"
