"""The static-batch benchmark run: its config, sweeps per backend, mixed workload, capacity, HF peers, results files."""

import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from fms.bench import models, plots, tables
from fms.bench.capacity import kv_capacity
from fms.bench.compiled import CompiledModel, recompile_limits
from fms.bench.hf_peer import hf_generate_batch_point, hf_generate_point, hf_twin
from fms.bench.results import device_name, run_metadata, write_csv, write_json
from fms.bench.roofline import ModelCost, limit_fields, serving_roofline, static_roofline
from fms.bench.static import CSV_COLUMNS, FIGURES, measure_mixed, measure_point, token_agreement
from fms.bench.timing import checked_device_type, release_memory
from fms.bench.wandb_log import finish_wandb, log_wandb_points, start_wandb
from fms.bench.workloads import MixedWorkload, random_prompts, sweep_points
from fms.cache.paged import SUPPORTED_PAGE_SIZES
from fms.modules.attention import attention_op_names

PROFILES = ("standard", "light")
SWEEPS = ("both", "batch", "context", "none")
PEERS = ("hf",)


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


@dataclass
class StaticBenchConfig:
    """One static-batch benchmark run. None means the profile's default for the device; checked on creation."""

    architecture: str = "llama"
    variant: str | None = None
    model_path: str | None = None
    tokenizer: str | None = None
    dtype: str = "auto"
    device_type: str | None = None
    compile: bool = False
    compile_scope: str = "all"
    compile_backend: str = "inductor"
    decode_window: int | None = None
    cuda_graphs: bool = False
    seed: int = 0
    backends: tuple[str, ...] = ("sdpa", "paged")
    profile: str = "standard"
    sweep: str = "both"
    batch_sizes: list[int] | None = None
    context_lengths: list[int] | None = None
    base_context: int | None = None
    base_batch: int = 1
    max_new_tokens: int | None = None
    page_size: int = 16
    repeats: int | None = None
    warmup: int = 1
    mixed: bool = False
    mixed_requests: int | None = None
    mixed_prompt_range: tuple[int, int] | None = None
    mixed_output_range: tuple[int, int] | None = None
    memory_budget_gb: float | None = None
    results_dir: str = "results"
    run_name: str | None = None
    wandb: bool = False
    wandb_project: str = "fms-inference-benchmark"
    peers: tuple[str, ...] = ()
    progress: bool = True
    command: str = "scripts/benchmark_inference.py"
    candidates: list = field(default_factory=list, init=False)

    def __post_init__(self):
        def bad(message):
            raise ValueError(message)

        self.device_type = checked_device_type(self.device_type)
        if self.architecture not in models.ARCHITECTURES:
            bad(f"architecture must be one of {', '.join(models.ARCHITECTURES)}, got {self.architecture!r}")
        for name, value, allowed in (("profile", self.profile, PROFILES), ("sweep", self.sweep, SWEEPS),
                                     ("compile_scope", self.compile_scope, ("all", "decode")),
                                     ("dtype", self.dtype, ("auto", "bf16", "fp16", "fp32"))):
            if value not in allowed:
                bad(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        self.backends = tuple(self.backends)
        if not self.backends:
            bad("attn_name is empty; give one or more of " + ", ".join(attention_op_names()))
        for b in self.backends:
            if b not in attention_op_names():
                bad(f"attn_name: unknown attention backend {b!r}; registered: {', '.join(attention_op_names())}")
        if len(set(self.backends)) != len(self.backends):
            bad(f"attn_name lists a backend twice: {','.join(self.backends)}")
        if self.page_size not in SUPPORTED_PAGE_SIZES:
            bad(f"page_size must be one of {SUPPORTED_PAGE_SIZES}, got {self.page_size}")
        explicit_contexts = self.context_lengths is not None or self.base_context is not None
        for key, value in profile_defaults(self.profile, self.device).items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        for name in ("batch_sizes", "context_lengths"):
            wrong = [v for v in getattr(self, name) if v < 1]
            if wrong:
                bad(f"{name} must all be >= 1, got {wrong}")
        for name in ("base_context", "base_batch", "max_new_tokens", "repeats", "mixed_requests"):
            if getattr(self, name) < 1:
                bad(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            bad(f"warmup must be >= 0, got {self.warmup}")
        if self.decode_window is not None and self.decode_window < 1:
            bad(f"decode_window must be >= 1, got {self.decode_window}")
        if self.cuda_graphs and self.decode_window is None:
            bad("cuda_graphs applies to decode windows: give decode_window too")
        if self.cuda_graphs and self.device_type != "cuda":
            bad("cuda_graphs needs device_type cuda")
        if self.memory_budget_gb <= 0:
            bad(f"memory_budget_gb must be > 0, got {self.memory_budget_gb}")
        MixedWorkload(self.mixed_requests, tuple(self.mixed_prompt_range), tuple(self.mixed_output_range))
        unknown = [p for p in self.peers if p not in PEERS]
        if unknown:
            bad(f"peers: unknown peer {unknown}; allowed: {', '.join(PEERS)}")
        self.candidates = models.model_candidates(self.architecture, self.variant, self.model_path, self.device)
        try:
            config = models.candidate_config(self.candidates[0], self.model_path)
        except FileNotFoundError as exc:
            bad(str(exc))
        self._fit_lengths(config.max_position_embeddings, explicit_contexts)

    @property
    def device(self) -> torch.device:
        return torch.device(self.device_type)

    @property
    def workload(self) -> MixedWorkload:
        return MixedWorkload(self.mixed_requests, tuple(self.mixed_prompt_range), tuple(self.mixed_output_range),
                             self.seed)

    @property
    def decode(self) -> dict | None:
        """Generator options of the timed runs, or None for per-token generate()."""
        if self.decode_window is None:
            return None
        return {"decode_window": self.decode_window, "cuda_graphs": self.cuda_graphs, "compile_decode": self.compile}

    def _fit_lengths(self, limit: int, explicit: bool) -> None:
        """Explicit lengths that do not fit the model are an error; profile defaults are clipped to fit."""
        new = self.max_new_tokens
        too_long = sorted({c for c in [*self.context_lengths, self.base_context] if c + new > limit})
        if too_long:
            if explicit or new >= limit:
                raise ValueError(f"context {too_long[-1]} + max_new_tokens {new} = {too_long[-1] + new} tokens is "
                                 f"longer than the model's max_position_embeddings ({limit})")
            fit = limit - new
            print(f"note: the profile's contexts {too_long} + {new} new tokens exceed the model's {limit} "
                  f"positions; measuring {fit} instead")
            self.context_lengths = sorted({min(c, fit) for c in self.context_lengths})
            self.base_context = min(self.base_context, fit)
        if self.mixed and self.workload.max_len > limit:
            raise ValueError(f"mixed: prompt {self.mixed_prompt_range[1]} + output {self.mixed_output_range[1]} "
                             f"tokens is longer than the model's max_position_embeddings ({limit})")


def _progress(iterable, config: StaticBenchConfig, **kwargs):
    if not config.progress:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, file=sys.stderr, dynamic_ncols=True, **kwargs)


def run_sweeps(model, compiled: CompiledModel, config: StaticBenchConfig, cost: ModelCost, wandb_run,
               reference_outputs: dict) -> list[dict]:
    if config.sweep == "none":
        return []
    batch_sizes = config.batch_sizes if config.sweep in ("both", "batch") else []
    contexts = config.context_lengths if config.sweep in ("both", "context") else []
    rows = []
    bar = _progress(sweep_points(batch_sizes, config.base_context, contexts, config.base_batch), config,
                    desc="points", unit="point")
    for point in bar:
        where = f"batch {point.batch_size} context {point.context_len}"
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(where)
        point_rows = compiled.run(lambda: measure_point(
            compiled.target, point, config.backends, config.max_new_tokens, repeats=config.repeats,
            warmup=config.warmup, seed=config.seed, page_size=config.page_size, device=config.device,
            decode=config.decode), where)
        roofline = static_roofline(cost, point.batch_size, point.context_len, config.max_new_tokens)
        for r in point_rows:
            r["compiled"] = compiled.active
            r.update(limit_fields(roofline, r["output_tokens_per_s"]))
        reference_outputs[(point.batch_size, point.context_len)] = point_rows[0].pop("outputs", None)
        for r in point_rows[1:]:
            r.pop("outputs", None)
        log_wandb_points(wandb_run, point_rows, "points")
        rows += point_rows
    return rows


def run_mixed(model, config: StaticBenchConfig, cost: ModelCost, wandb_run) -> dict:
    w = config.workload
    print(f"\nmixed workload: {w.num_requests} requests, prompts {w.prompt_range[0]}-{w.prompt_range[1]} tokens, "
          f"outputs {w.output_range[0]}-{w.output_range[1]} tokens (seed {w.seed}), one static batch per backend")
    runs = measure_mixed(model, w, config.backends, repeats=config.repeats, warmup=config.warmup,
                         page_size=config.page_size, device=config.device)
    lengths = w.lengths()
    roofline = serving_roofline(cost, [p for p, _ in lengths], [o for _, o in lengths], len(lengths))
    for r in runs:
        r.update(limit_fields(roofline, r["output_tokens_per_s"]))
    log_wandb_points(wandb_run, runs, "mixed")
    verify = config.device.type == "cuda" or config.memory_budget_gb <= 1.0
    capacity = []
    for backend in config.backends:
        try:
            capacity.append(kv_capacity(model, w, backend, config.memory_budget_gb, config.page_size, verify=verify))
        except Exception as exc:  # noqa: BLE001 - a capacity search failure must not lose the measurements
            print(f"capacity search for {backend} failed: {type(exc).__name__}: {exc}")
    return {"workload": {"num_requests": w.num_requests, "prompt_range": list(w.prompt_range),
                         "output_range": list(w.output_range), "seed": w.seed},
            "note": "paged pool sized to the workload (sum of ceil((prompt+output)/page_size) pages); contiguous "
                    "cache holds max(prompt)+max(output) tokens per row. Largest batch is computed from the "
                    "per-row / per-page bytes measured on real caches"
                    + (", and checked by allocating it" if verify else ""),
            "runs": runs, "capacity": capacity}


def run_peers(model, arch: str, config: StaticBenchConfig, reference_outputs: dict) -> list[dict]:
    try:
        hf_model = hf_twin(model, arch)
    except ImportError:
        print("peers hf: transformers is not installed; skipping the HF peers (pip install transformers)")
        return []
    except Exception as exc:  # noqa: BLE001
        print(f"peers hf: could not build the HF model from ours ({type(exc).__name__}: {exc}); skipping")
        return []
    if config.device.type != "cuda":
        print("peers hf: note HF continuous batching (generate_batch) is slow on the CPU")
    peers = []
    for batch_size, context_len in _progress(list(reference_outputs), config, desc="hf peers", unit="point"):
        prompts = random_prompts(batch_size, context_len, model.config.vocab_size, config.seed)
        for name, fn in (("hf_generate", hf_generate_point), ("hf_generate_batch", hf_generate_batch_point)):
            row = {"peer": name, "batch_size": batch_size, "context_len": context_len,
                   "max_new_tokens": config.max_new_tokens}
            try:
                result = fn(hf_model, prompts, config.max_new_tokens, repeats=config.repeats, warmup=config.warmup,
                            device=config.device)
                ref = reference_outputs[(batch_size, context_len)]
                outs = result.pop("outputs")
                row.update(result)
                row["tokens_match_fms"] = None if ref is None else token_agreement(outs, ref)
                if name == "hf_generate":
                    row["attn_implementation"] = "sdpa"
            except Exception as exc:  # noqa: BLE001 - a peer failing is reported, never fatal
                row["error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
                print(f"peers hf: {name} failed at batch {batch_size} context {context_len}: {row['error']}")
            peers.append(row)
    del hf_model
    release_memory(config.device)
    return peers


PEER_COLUMNS = ("peer", "batch_size", "context_len", "max_new_tokens", "e2e_latency_ms", "output_tokens_per_s",
                "requests_per_s", "peak_gpu_mem_allocated_gb", "attn_implementation", "manager_reused",
                "tokens_match_fms", "error")


def write_results(results_dir: Path, results: dict) -> dict[str, Path]:
    """results.json (everything), points.csv (one row per point and backend), mixed.csv / peers.csv if any."""
    paths = {"json": write_json(results_dir / "results.json", results), "csv": results_dir / "points.csv"}
    write_csv(paths["csv"], results["points"], CSV_COLUMNS)
    if results.get("mixed"):
        paths["mixed_csv"] = results_dir / "mixed.csv"
        write_csv(paths["mixed_csv"], results["mixed"]["runs"], list(results["mixed"]["runs"][0]))
    if results.get("peers"):
        paths["peers_csv"] = results_dir / "peers.csv"
        write_csv(paths["peers_csv"], results["peers"], PEER_COLUMNS)
    return paths


def report_text(results: dict, config: StaticBenchConfig) -> str:
    model, points, mixed, peers = results["model"], results["points"], results["mixed"], results["peers"]
    parts = [f"# {model['architecture']} {model['variant']} on {results['meta']['device']}\n\n`{config.command}`"]
    if points:
        parts.append("## all points\n" + tables.points_table(points))
        parts.append("## side by side\n" + tables.side_by_side_tables(points, config.backends))
    if mixed:
        parts.append("## mixed-length workload\n" + mixed["note"] + "\n\n" + tables.mixed_tables(mixed))
    if peers:
        parts.append("## HF transformers peers (same weights, same prompts)\n= fms: share of tokens before the first "
                     "difference from our first backend's (random weights give near-tied logits, so < 1 is "
                     "expected in bf16)\n\n" + tables.peers_table(peers))
    return "\n\n".join(parts) + "\n"


def run_static_benchmark(config: StaticBenchConfig) -> dict:
    """Build the model, run every section the config asks for, write results.json, CSVs, tables.md and plots."""
    torch.manual_seed(config.seed)
    device = config.device
    dtype = None if config.dtype == "auto" else config.dtype
    model, arch, variant = models.build_first(config.candidates, config.model_path, device, dtype,
                                              config.backends[0], config.seed)
    model_info = models.describe_model(model, arch, variant, config.model_path, config.seed)
    cost = ModelCost.of(model)
    if device.type == "cpu" and config.model_path is None:
        print(f"no GPU: running the small built-in model {arch} {variant} with random weights on the CPU")
    else:
        print(f"model: {arch} {variant} ({model_info['weights']} weights, {model_info['dtype']}) on "
              f"{device_name(device)}")
    print(f"backends: {', '.join(config.backends)} | max_new_tokens {config.max_new_tokens} | repeats "
          f"{config.repeats} | warmup {config.warmup} | page_size {config.page_size}")
    if device.type == "cuda" and config.profile == "standard" and \
            torch.cuda.get_device_properties(device).total_memory < 16 * 2**30:
        print("note: this GPU has < 16 GB; --profile light (make bench-llama-t4) may fit better")
    if config.compile and config.warmup == 0:
        print("note: compile with warmup 0: the timed runs include dynamo's compilation")
    # with decode windows, compile compiles the window step (the Generator's runner), not the forward
    compiled = CompiledModel(model, config.compile and config.decode is None, config.compile_backend,
                             config.compile_scope)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_name = config.run_name or f"{arch}-{variant}-{'_'.join(config.backends)}-{stamp}".replace("/", "_")
    results_dir = Path(config.results_dir) / run_name
    recorded = {k: v for k, v in asdict(config).items() if k != "candidates"}
    wandb_run = start_wandb({**recorded, **model_info}, results_dir, run_name, config.wandb_project) \
        if config.wandb else None

    reference_outputs: dict = {}
    with recompile_limits(device.type == "cuda" or config.compile):
        points = run_sweeps(model, compiled, config, cost, wandb_run, reference_outputs)
        release_memory(device)
        mixed = compiled.run(lambda: run_mixed(compiled.target, config, cost, wandb_run), "mixed workload") \
            if config.mixed else None
    if mixed:
        mixed["compiled"] = compiled.active
    release_memory(device)
    recorded["compile"] = compiled.summary()
    if config.decode is not None:
        recorded["compile"]["decode_windows"] = {
            **config.decode,
            "note": ("timed runs go through one Generator per backend and point (cache, CUDA graphs); the window "
                     "step is compiled by DecodeWindowRunner (dynamic=True) when compile_decode, prefill eager. "
                     "Every backend's Generator stays allocated for the point, so peak GPU memory includes all of "
                     "their caches; compare KV bytes, not peak memory, between backends"),
        }
    if compiled.requested:
        print(f"compile: graphs {compiled.graphs}, graph breaks {sum(recorded['compile']['graph_breaks'].values())}"
              + (f"; fell back to eager at {compiled.fell_back_at}" if not compiled.active else ""))
    peers = run_peers(model, arch, config, reference_outputs) if config.peers else []
    log_wandb_points(wandb_run, [{**p, "backend": p["peer"]} for p in peers], "peers")

    results = {"meta": run_metadata(config.command, device), "model": model_info, "config": recorded,
               "figures": list(FIGURES), "points": points, "mixed": mixed, "peers": peers}
    paths = write_results(results_dir, results)
    plot_paths = plots.plot_results(results, results_dir)
    results["paths"] = {**{k: str(v) for k, v in paths.items()}, "plots": {k: str(v) for k, v in plot_paths.items()}}
    write_json(paths["json"], results)
    text = report_text(results, config)
    print("\n" + text)
    (results_dir / "tables.md").write_text(text)
    _decode_sample(config.tokenizer, points)
    finish_wandb(wandb_run, results, plot_paths, CSV_COLUMNS)
    print(f"results: {paths['json']}  {paths['csv']}  plots: {', '.join(p.name for p in plot_paths.values())}")
    if any(p.get("matches_generate") is False for p in points):
        print("note: at some points the timed loop's tokens differ from generate()'s (generate_agreement = "
              "share of tokens before the first difference). Same steps, so this is numerics: random weights give "
              "near-tied logits, and in bf16 a kernel choice that depends on memory alignment can flip a greedy "
              "pick. With fp32 on the CPU they match exactly.")
    return results


def _decode_sample(tokenizer_path: str | None, points: list[dict]) -> None:
    if not tokenizer_path or not points:
        return
    try:
        from fms.utils.tokenizers import get_tokenizer

        text = get_tokenizer(tokenizer_path).decode(points[0]["sample_output"])
        print(f"sample output ({points[0]['backend']}, first row, random prompt): {text!r}")
    except Exception as exc:  # noqa: BLE001 - decoding is cosmetic
        print(f"tokenizer: could not decode a sample ({type(exc).__name__}: {exc})")
