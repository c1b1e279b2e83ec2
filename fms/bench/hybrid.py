"""The Granite-4.0-H hybrid profile: its config, the run over the sections it asks for, and the report."""

import dataclasses
import time
from pathlib import Path

import torch

from fms.bench.hybrid_mixer import measure_mixer, mixer_speedups, mixer_tables, mixer_under_test
from fms.bench.hybrid_sections import KINDS, measure_prefill, measure_split, memory_figures, speedups
from fms.bench.results import device_name, run_metadata, write_json
from fms.bench.ssd import DTYPES, PATHS, scan_label
from fms.bench.tables import markdown_table
from fms.bench.timing import Clock, checked_device_type
from fms.cache.paged import SUPPORTED_PAGE_SIZES
from fms.models import get_config, get_model, list_variants
from fms.modules.attention import attention_op_names

ARCHITECTURE = "granite_hybrid"
SECTIONS = ("prefill", "split", "memory", "mixer")
MODEL_SECTIONS = ("prefill", "split", "memory")  # the sections that build the whole model
DEFAULT_CONTEXTS = {"cuda": [512, 1024, 2048, 4096, 8192, 16384], "cpu": [32, 64]}
NOTES = [
    "prefill: model(input_ids) with no cache and logits for the last token only (as a serving prefill)",
    "times are the device timeline: CUDA events on a GPU, perf_counter on the CPU; medians over repeats",
    ("split: hooks record an event before and after each mixer; other_ms = total_ms - mamba_ms - attention_ms. "
     "The hooked run's total is total_ms; unhooked_total_ms is the same step without hooks"),
    ("decode: one forward of one new token per row after a prefill of context_len tokens (cache bookkeeping "
     "before the forward is not timed)"),
    ("mixer: one Mamba2Mixer of the variant's shape in the model dtype (the built model's first Mamba layer, or "
     "a standalone one with the same random init when the model is not built), per scan path. scan_ms: one call "
     "of the path's scan function (select_ssd_scan(device, ssd_scan)) on x [b,T,nh,P] and B, C [b,T,G,N] randn "
     "in the model dtype, dt [b,T,nh] = softplus(randn) fp32, A [nh] fp32 = -logspace(-2, 0) over the heads, "
     "the config's chunk_size, no initial state, final state returned; it includes the path's own casts and "
     "layout changes. mixer_ms: one mixer(hidden [b,T,H] randn) forward, no state, no valid_lens (in_proj, causal "
     "conv, dt, scan, D skip, gated norm, out_proj). Eager figures: device time of one call after --warmup calls "
     "(CUDA events, so launch gaps count where the host is slower than the GPU; perf_counter on the CPU). "
     "*_graph_ms: the same call captured once in a CUDA graph (after warm-up on a side stream) and replayed: CUDA "
     "events around one replay, GPU time without launch overhead. All medians over --repeats. "
     "scan_rel_err_vs_reference: ||out - ref|| / ||ref|| (the larger over y and the final state) against the "
     "reference path's output of the same timed call on the same inputs (the reference runs first; its output is "
     "held while the others run, and counts in their peak_gpu_mem_allocated_gb)"),
]




def hybrid_variants() -> list[str]:
    return [v for v in list_variants(ARCHITECTURE) if "mamba" in get_config(ARCHITECTURE, v).layer_types]


@dataclasses.dataclass
class HybridProfileConfig:
    """One hybrid profile run; context_lengths None: the device's defaults (clipped to the model's positions)."""

    variant: str = "4.0-h-1b"
    dtype: str = "bf16"
    device: str | None = None
    context_lengths: list[int] | None = None
    batch_sizes: list[int] = dataclasses.field(default_factory=lambda: [1])
    paths: list[str] = dataclasses.field(default_factory=lambda: list(PATHS))
    sections: list[str] = dataclasses.field(default_factory=lambda: list(SECTIONS))
    no_split: bool = False
    max_recurrent_context: int = 4096
    repeats: int = 5
    warmup: int = 1
    attn_name: str = "paged"
    prefill_attn_name: str = "sdpa"
    page_size: int = 16
    seed: int = 0
    output_dir: str = "results/profile_hybrid"
    run_name: str | None = None
    command: str = "scripts/profile_hybrid.py"

    def __post_init__(self):
        def bad(message):
            raise ValueError(message)

        self.device = checked_device_type(self.device, "device")
        if self.dtype not in DTYPES:
            bad(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        allowed = hybrid_variants()
        if self.variant not in allowed:
            bad(f"variant: {self.variant!r} is not a granite_hybrid variant with Mamba layers; "
                f"allowed: {', '.join(allowed)}")
        explicit = self.context_lengths is not None
        if not explicit:
            self.context_lengths = list(DEFAULT_CONTEXTS[self.device])
        if not self.batch_sizes or not self.context_lengths:
            bad("batch_sizes and context_lengths need at least one value each")
        if min(self.batch_sizes) < 1:
            bad(f"batch_sizes must all be >= 1, got {[b for b in self.batch_sizes if b < 1]}")
        if min(self.context_lengths) < 2:
            bad(f"context_lengths must all be >= 2 (one token takes the decode step, not a scan), got "
                f"{[c for c in self.context_lengths if c < 2]}")
        for name, low in (("repeats", 1), ("warmup", 0), ("max_recurrent_context", 0)):
            if getattr(self, name) < low:
                bad(f"{name} must be >= {low}, got {getattr(self, name)}")
        unknown = [x for x in self.sections if x not in SECTIONS]
        if unknown or not self.sections:
            bad(f"sections: unknown section(s) {unknown}; allowed: {', '.join(SECTIONS)}")
        if self.no_split:
            self.sections = [x for x in self.sections if x != "split"]
            if not self.sections:
                bad("no_split leaves no section to run")
        unknown = [x for x in self.paths if x not in PATHS]
        if unknown or not self.paths:
            bad(f"paths: unknown path(s) {unknown}; allowed: {', '.join(PATHS)}")
        for name in ("attn_name", "prefill_attn_name"):
            if getattr(self, name) not in attention_op_names():
                bad(f"{name}: unknown attention op {getattr(self, name)!r}; "
                    f"registered: {', '.join(attention_op_names())}")
        if self.page_size not in SUPPORTED_PAGE_SIZES:
            bad(f"page_size must be one of {SUPPORTED_PAGE_SIZES}, got {self.page_size}")
        self._fit_contexts(get_config(ARCHITECTURE, self.variant).max_position_embeddings, explicit)

    def _fit_contexts(self, limit: int, explicit: bool) -> None:
        extra = self.decode_steps if "split" in self.sections else 0
        too_long = sorted(c for c in self.context_lengths if c + extra > limit)
        if not too_long:
            return
        if explicit:
            plus = f" (+ {extra} decode steps)" if extra else ""
            raise ValueError(f"context_lengths: {too_long[-1]}{plus} is longer than {self.variant}'s "
                             f"max_position_embeddings ({limit})")
        print(f"note: default contexts {too_long} do not fit {self.variant}'s {limit} positions; skipping them")
        self.context_lengths = [c for c in self.context_lengths if c not in too_long]
        if not self.context_lengths:
            raise ValueError(f"no default context fits {self.variant}; give context_lengths")

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def decode_steps(self) -> int:
        """The split decode measurement appends warmup + 2 * repeats tokens (unhooked, then hooked)."""
        return self.warmup + 2 * self.repeats


def tables(results: dict, args) -> str:
    ms = {(r["path"], r["batch_size"], r["context_len"]): r["median_ms"] for r in results["prefill"]}
    out = []
    if "prefill" in args.sections:
        rows = [[s["batch_size"], s["context_len"], *(ms.get((p, s["batch_size"], s["context_len"])) for p in PATHS),
                 s["fast_vs_reference"], s["fast_vs_recurrent"], s["reference_vs_recurrent"]]
                for s in results["speedups"]]
        out.append("## prefill ms (median)\n" + markdown_table(
            ["batch", "context", "fast", "reference", "recurrent", "fast/ref x", "fast/recurrent x",
             "ref/recurrent x"], rows))
    split_rows = []
    for phase in ("prefill", "decode"):
        for r in results["split"][phase]:
            split_rows.append([phase, r["batch_size"], r["context_len"], r["unhooked_total_ms"], r["total_ms"],
                               *(f"{r[f'{k}_ms']:.2f} ({r[f'{k}_share']:.0%})" for k in (*KINDS, "other"))])
    if split_rows:
        scan = results["model"]["default_scan"]
        out.append(f"## time per layer kind (scan: {scan}; decode cache: {args.attn_name})\n" + markdown_table(
            ["phase", "batch", "context", "ms", "hooked ms", "mamba ms", "attention ms", "other ms"], split_rows))
    if "mixer" in args.sections:
        out.append(mixer_tables(results, args))
    m = results["memory"]
    if m is not None:
        out.append(
            "## decode-state memory per sequence\n"
            f"{m['mamba_layers']} Mamba layers hold {m['mamba_state_bytes_per_sequence'] / 1e6:.2f} MB of state "
            f"(fixed); {m['attention_layers']} attention layers hold {m['kv_bytes_per_token']} KV bytes per token "
            f"(equal at {m['context_where_kv_equals_state']:.0f} tokens)\n\n"
            + markdown_table(["context", "KV MB", "Mamba state MB", "total MB", "all-attention KV MB"],
                                   [[r["context_len"], r["kv_bytes_per_sequence"] / 1e6,
                                     r["state_bytes_per_sequence"] / 1e6, r["total_bytes_per_sequence"] / 1e6,
                                     r["all_attention_kv_bytes_per_sequence"] / 1e6] for r in m["per_context"]]))
    if results["skipped"]:
        out.append("skipped:\n" + "\n".join(f"- {_where(s)}: {s['reason']}" for s in results["skipped"]))
    return "\n\n".join(out)



def _where(entry: dict) -> str:
    parts = [entry["section"], entry.get("path")]
    if "batch_size" in entry:
        parts.append(f"batch {entry['batch_size']} context {entry['context_len']}")
    parts.append(entry.get("figure"))
    return " ".join(p for p in parts if p)




def run_hybrid_profile(config: HybridProfileConfig) -> dict:
    """Run the sections the config asks for, write <output_dir>/<run_name>.json and print the report."""
    args = config
    device = args.torch_device
    torch.manual_seed(args.seed)
    model_config = get_config(ARCHITECTURE, args.variant)
    model = None
    if any(s in args.sections for s in MODEL_SECTIONS):
        model = get_model(ARCHITECTURE, args.variant, device_type=device.type, data_type=DTYPES[args.dtype],
                          attn_name=args.prefill_attn_name, seed=args.seed)
    clock = Clock(device)
    print(f"{ARCHITECTURE} {args.variant} ({args.dtype}, random weights) on {device_name(device)}; "
          f"sections {args.sections}, contexts {args.context_lengths}, batches {args.batch_sizes}, "
          f"repeats {args.repeats}, warmup {args.warmup}", flush=True)

    skipped: list = []
    mixer_rows, mixer_source = [], None
    with torch.no_grad():
        prefill = measure_prefill(model, args, clock, skipped) if "prefill" in args.sections else []
        split = (measure_split(model, args, clock, skipped) if "split" in args.sections
                 else {"prefill": [], "decode": []})
        if "mixer" in args.sections:
            mixer, mixer_source = mixer_under_test(model, model_config, args)
            mixer_rows = measure_mixer(mixer, args, clock, skipped)
            del mixer
    layer_types = model_config.layer_types
    results = {
        "meta": run_metadata(args.command, device),
        "config": {**dataclasses.asdict(args), "architecture": ARCHITECTURE},
        "model": {"variant": args.variant, "dtype": args.dtype,
                  # None when only the mixer section ran (the whole model was not built)
                  "num_parameters": None if model is None else sum(p.numel() for p in model.parameters()),
                  "num_layers": model_config.num_layers,
                  "mamba_layers": [i for i, t in enumerate(layer_types) if t == "mamba"],
                  "attention_layers": [i for i, t in enumerate(layer_types) if t == "attention"],
                  "max_position_embeddings": model_config.max_position_embeddings,
                  "default_scan": scan_label(device),
                  "mamba_config": dataclasses.asdict(model_config.mamba_config()),
                  "mixer": mixer_source},
        "prefill": prefill,
        "speedups": speedups(prefill, args) if "prefill" in args.sections else [],
        "split": split,
        "memory": memory_figures(model, args) if "memory" in args.sections else None,
        "mixer": mixer_rows,
        "mixer_speedups": mixer_speedups(mixer_rows, args) if "mixer" in args.sections else [],
        "skipped": skipped,
        "notes": NOTES,
    }
    name = args.run_name or f"{args.variant}-{args.dtype}-{device.type}-{time.strftime('%Y%m%d-%H%M%S')}"
    path = Path(args.output_dir) / f"{name}.json"
    results["path"] = str(path)
    write_json(path, results)
    print(f"\n# {ARCHITECTURE} {args.variant} {args.dtype} on {results['meta']['device']}\n\n`{args.command}`\n\n"
          + tables(results, args) + f"\n\nresults: {path}")
    return results
