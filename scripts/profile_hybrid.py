"""Profile a Granite-4.0-H hybrid (Mamba2 + attention): prefill per Mamba scan path, time per layer kind, state memory.

Random weights. Four measurements (--sections picks them; all by default), written to one JSON file under
--output_dir and summarized on stdout:

  prefill  no-cache forward (logits for the last token only) at each batch x context, once per scan path:
           fast (our Triton SSD scan, fms/modules/ssd_scan.py, with fla's conv and norm when installed; CUDA
           only), reference (chunked PyTorch), recurrent (ssd_step per token);
           median ms over --repeats after --warmup, and the speedups of fast over the other two.
  split    one prefill and one decode step (paged cache by default) timed per layer kind: forward hooks on the
           mixers sum the Mamba and attention time; other = total - both (embedding, MLPs, norms, LM head).
  memory   Mamba state bytes per sequence vs KV bytes per token, from model.cache_spec().
  mixer    ONE Mamba2 mixer of the variant's shape, alone, once per scan path at each batch x context: the scan
           function by itself on random inputs of the mixer's shapes, and mixer(hidden) [b, T, H] (no state);
           each timed eagerly (one call, --warmup then --repeats) and, on CUDA, as one replay of the call
           captured in a CUDA graph (no launch overhead: GPU time only); speedups of fast over the other two.
           The whole-model prefill at batch 1 is bound by the host's launches; this is the scan kernels' figure.
           Needs no model: with --sections mixer alone the 40-layer model is not built.

    python scripts/profile_hybrid.py                                  # CUDA: 4.0-h-1b bf16, contexts 512..16384
    python scripts/profile_hybrid.py --device cpu --variant h-micro-test --dtype fp32
    python scripts/profile_hybrid.py --sections mixer --batch_sizes 1,8 --context_lengths 1024,4096,16384 \
        --max_recurrent_context 2048                                  # the Mamba mixer and its scan alone
"""

import argparse
import dataclasses
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F

from fms.models import get_config, get_model, list_variants
from fms.modules.attention import MultiHeadAttention, attention_op_names, get_attention_op
from fms.modules.mamba_layer import MambaLayer
from fms.cache.paged import SUPPORTED_PAGE_SIZES
from fms.modules.ssm import Mamba2Config, Mamba2Mixer, select_ssd_scan, ssd_scan_reference, use_ssd_scan
from fms.utils import benchmarking as bench

ARCHITECTURE = "granite_hybrid"
SECTIONS = ("prefill", "split", "memory", "mixer")
MODEL_SECTIONS = ("prefill", "split", "memory")  # the sections that build the whole model
PATHS = ("fast", "reference", "recurrent")
SCAN_OF_PATH = {"fast": "triton", "reference": "reference", "recurrent": "recurrent"}
KINDS = ("mamba", "attention")
MIXER_FIGURES = ("scan", "scan_graph", "mixer", "mixer_graph")  # eager and CUDA-graphed, for the scan and the mixer
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
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
     "of the path's scan function (select_ssd_scan under use_ssd_scan) on x [b,T,nh,P] and B, C [b,T,G,N] randn "
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


# ---------------------------------------------------------------------------------------------
# arguments
# ---------------------------------------------------------------------------------------------
def _int_list(text: str) -> list[int]:
    return [int(part) for part in str(text).replace(",", " ").split()]


def hybrid_variants() -> list[str]:
    return [v for v in list_variants(ARCHITECTURE) if "mamba" in get_config(ARCHITECTURE, v).layer_types]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--variant", default="4.0-h-1b", help="a granite_hybrid variant with Mamba layers")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--device", default=None, choices=["cuda", "cpu"], help="default: cuda if available")
    p.add_argument("--context_lengths", default=None,
                   help="comma list; default 512,...,16384 on CUDA, 32,64 on the CPU")
    p.add_argument("--batch_sizes", default="1", help="comma list")
    p.add_argument("--paths", default=",".join(PATHS), help=f"comma list of Mamba scan paths from {PATHS}")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of measurements from {SECTIONS}")
    p.add_argument("--max_recurrent_context", type=int, default=4096,
                   help="the recurrent path only runs up to this context (it is slow)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before them")
    p.add_argument("--attn_name", default="paged", help="attention op of the decode step's cache")
    p.add_argument("--prefill_attn_name", default="sdpa", help="attention op of the no-cache prefill")
    p.add_argument("--page_size", type=int, default=16, choices=SUPPORTED_PAGE_SIZES)
    p.add_argument("--no_split", action="store_true",
                   help="skip the per-layer-kind split (as leaving split out of --sections)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output_dir", default="results/profile_hybrid")
    p.add_argument("--run_name", default=None, help="JSON file name without .json (default: variant-dtype-time)")
    return p


def resolve_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    args = parser.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is available (use --device cpu)")
    args.torch_device = torch.device(args.device)

    allowed = hybrid_variants()
    if args.variant not in allowed:
        parser.error(f"--variant: {args.variant!r} is not a granite_hybrid variant with Mamba layers; "
                     f"allowed: {', '.join(allowed)}")
    config = get_config(ARCHITECTURE, args.variant)
    args.max_position_embeddings = config.max_position_embeddings

    try:
        args.batch_sizes = _int_list(args.batch_sizes)
        explicit = args.context_lengths is not None
        args.context_lengths = _int_list(args.context_lengths) if explicit else list(DEFAULT_CONTEXTS[args.device])
    except ValueError as exc:
        parser.error(f"--batch_sizes / --context_lengths take comma-separated integers: {exc}")
    if not args.batch_sizes or not args.context_lengths:
        parser.error("--batch_sizes and --context_lengths need at least one value each")
    bad = [b for b in args.batch_sizes if b < 1]
    if bad:
        parser.error(f"--batch_sizes must all be >= 1, got {bad}")
    bad = [c for c in args.context_lengths if c < 2]
    if bad:
        parser.error(f"--context_lengths must all be >= 2 (one token takes the decode step, not a scan), got {bad}")
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.max_recurrent_context < 0:
        parser.error(f"--max_recurrent_context must be >= 0, got {args.max_recurrent_context}")

    args.sections = [x.strip() for x in args.sections.split(",") if x.strip()]
    bad = [x for x in args.sections if x not in SECTIONS]
    if bad or not args.sections:
        parser.error(f"--sections: unknown section(s) {bad}; allowed: {', '.join(SECTIONS)}")
    if args.no_split:
        args.sections = [x for x in args.sections if x != "split"]
        if not args.sections:
            parser.error("--no_split leaves no section to run")

    # the decode measurement appends warmup + 2 * repeats tokens (unhooked, then hooked) after the prompt
    args.decode_steps = args.warmup + 2 * args.repeats
    extra = args.decode_steps if "split" in args.sections else 0
    limit = args.max_position_embeddings
    too_long = sorted(c for c in args.context_lengths if c + extra > limit)
    if too_long:
        if explicit:
            plus = f" (+ {extra} decode steps)" if extra else ""
            parser.error(f"--context_lengths: {too_long[-1]}{plus} is longer than "
                         f"{args.variant}'s max_position_embeddings ({limit})")
        print(f"note: default contexts {too_long} do not fit {args.variant}'s {limit} positions; skipping them")
        args.context_lengths = [c for c in args.context_lengths if c not in too_long]
        if not args.context_lengths:
            parser.error(f"no default context fits {args.variant}; give --context_lengths")

    args.paths = [x.strip() for x in args.paths.split(",") if x.strip()]
    bad = [x for x in args.paths if x not in PATHS]
    if bad or not args.paths:
        parser.error(f"--paths: unknown path(s) {bad}; allowed: {', '.join(PATHS)}")
    for name in ("attn_name", "prefill_attn_name"):
        if getattr(args, name) not in attention_op_names():
            parser.error(f"--{name}: unknown attention op {getattr(args, name)!r}; "
                         f"registered: {', '.join(attention_op_names())}")
    return args


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------
class Clock:
    """Marks on the device timeline: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.is_cuda = device.type == "cuda"

    def mark(self):
        if self.is_cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def ms(self, start, end) -> float:
        """Elapsed ms between two marks; call after sync()."""
        return start.elapsed_time(end) if self.is_cuda else (end - start) * 1e3

    def sync(self) -> None:
        bench.synchronize(self.device)

    def timed(self, fn) -> tuple[float, object]:
        """(ms, result) of one call of fn, with the device idle before and after."""
        self.sync()
        start = self.mark()
        out = fn()
        end = self.mark()
        self.sync()
        return self.ms(start, end), out


class KindTimer:
    """Forward pre/post hooks on every mixer that sum its time per kind (mamba / attention) while enabled."""

    def __init__(self, model, clock: Clock):
        self.clock = clock
        self.enabled = False
        self.spans: list = []
        self._open: dict = {}
        self._handles = []
        for layer in model.layers:
            kind = self.kind_of(layer.mixer)
            if kind is None:
                continue
            self._handles.append(layer.mixer.register_forward_pre_hook(self._start))
            self._handles.append(layer.mixer.register_forward_hook(lambda m, a, o, kind=kind: self._stop(m, kind)))

    @staticmethod
    def kind_of(mixer) -> str | None:
        if isinstance(mixer, MambaLayer):
            return "mamba"
        if isinstance(mixer, MultiHeadAttention):
            return "attention"
        return None

    def _start(self, module, args):
        if self.enabled:
            self._open[module] = self.clock.mark()

    def _stop(self, module, kind):
        if self.enabled:
            self.spans.append((kind, self._open.pop(module), self.clock.mark()))

    def collect(self) -> dict[str, float]:
        """ms per kind since the last collect (call after sync)."""
        totals = dict.fromkeys(KINDS, 0.0)
        for kind, start, end in self.spans:
            totals[kind] += self.clock.ms(start, end)
        self.spans = []
        return totals

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _median(values):
    return statistics.median(values) if values else None


def split_row(runs: list[dict]) -> dict:
    """Medians over runs of {total, mamba, attention}; other is the median of each run's remainder."""
    total = _median([r["total"] for r in runs])
    row = {"total_ms": total}
    for kind in KINDS:
        row[f"{kind}_ms"] = _median([r[kind] for r in runs])
    row["other_ms"] = _median([r["total"] - r["mamba"] - r["attention"] for r in runs])
    for kind in (*KINDS, "other"):
        row[f"{kind}_share"] = row[f"{kind}_ms"] / total if total else None
    return row


# ---------------------------------------------------------------------------------------------
# measurements
# ---------------------------------------------------------------------------------------------
def random_ids(batch: int, context: int, vocab: int, seed: int, device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + batch * 7919 + context)
    return torch.randint(0, vocab, (batch, context), generator=generator).to(device)


def prefill_fn(model, ids: torch.Tensor):
    last = torch.full((ids.shape[0],), ids.shape[1] - 1, device=ids.device)
    return lambda: model(ids, logits_positions=last)


def path_unavailable(path: str, device: torch.device) -> str | None:
    """Why a scan path cannot run here, or None."""
    if path != "fast":
        return None
    if device.type != "cuda":
        return "the Triton scan runs on CUDA only"
    try:
        with use_ssd_scan(SCAN_OF_PATH[path]):
            pass
    except RuntimeError as exc:
        return str(exc)
    return None


def measure_prefill(model, args, clock: Clock, skipped: list) -> list[dict]:
    rows = []
    unavailable = _unavailable_paths("prefill", args, skipped)
    for batch in args.batch_sizes:
        for context in args.context_lengths:
            ids = random_ids(batch, context, model.config.vocab_size, args.seed, args.torch_device)
            run = prefill_fn(model, ids)
            for path in args.paths:
                if unavailable[path]:
                    continue
                where = {"path": path, "batch_size": batch, "context_len": context}
                if _over_recurrent_cap("prefill", where, args, skipped):
                    continue
                try:
                    with use_ssd_scan(SCAN_OF_PATH[path]):
                        for _ in range(args.warmup):
                            run()
                        bench.reset_peak_memory(args.torch_device)
                        times = [clock.timed(run)[0] for _ in range(args.repeats)]
                except torch.cuda.OutOfMemoryError as exc:
                    reason = f"out of GPU memory ({str(exc).splitlines()[0][:200]})"
                    print(f"prefill {path} batch {batch} context {context}: {reason}")
                    skipped.append({"section": "prefill", **where, "reason": reason})
                    bench.release_memory(args.torch_device)
                    continue
                ms = statistics.median(times)
                row = {**where, "median_ms": ms, "times_ms": times, "tokens_per_s": batch * context / ms * 1e3,
                       "peak_gpu_mem_allocated_gb": bench.peak_memory_gb(args.torch_device)[0]}
                rows.append(row)
                print(f"prefill {path:9s} batch {batch:3d} context {context:6d}: {ms:10.2f} ms", flush=True)
            del ids, run
            bench.release_memory(args.torch_device)
    return rows


def _unavailable_paths(section: str, args, skipped: list) -> dict[str, str | None]:
    """path -> why it cannot run here (recorded in skipped once), or None."""
    unavailable = {p: path_unavailable(p, args.torch_device) for p in args.paths}
    for path, reason in unavailable.items():
        if reason:
            print(f"{section}: skipping the {path} path: {reason}")
            skipped.append({"section": section, "path": path, "reason": reason})
    return unavailable


def _over_recurrent_cap(section: str, where: dict, args, skipped: list) -> bool:
    """True (and recorded in skipped) for the token-by-token path past --max_recurrent_context."""
    if where["path"] != "recurrent" or where["context_len"] <= args.max_recurrent_context:
        return False
    skipped.append({"section": section, **where,
                    "reason": f"context > --max_recurrent_context ({args.max_recurrent_context})"})
    return True


SPEEDUP_PAIRS = (("reference", "fast"), ("recurrent", "fast"), ("recurrent", "reference"))  # (slow, fast)


def _ratio(slow_ms, fast_ms) -> float | None:
    return slow_ms / fast_ms if slow_ms is not None and fast_ms else None


def speedups(prefill: list[dict], args) -> list[dict]:
    ms = {(r["path"], r["batch_size"], r["context_len"]): r["median_ms"] for r in prefill}
    out = []
    for batch in args.batch_sizes:
        for context in args.context_lengths:
            slow_over_fast = {f"{fast}_vs_{slow}": _ratio(ms.get((slow, batch, context)),
                                                          ms.get((fast, batch, context)))
                              for slow, fast in SPEEDUP_PAIRS}
            out.append({"batch_size": batch, "context_len": context, **slow_over_fast})
    return out


def measure_split_prefill(model, args, clock: Clock, timer: KindTimer, batch: int, context: int) -> dict:
    ids = random_ids(batch, context, model.config.vocab_size, args.seed, args.torch_device)
    run = prefill_fn(model, ids)
    for _ in range(args.warmup):
        run()
    unhooked = [clock.timed(run)[0] for _ in range(args.repeats)]
    runs = []
    timer.enabled = True
    try:
        for _ in range(args.repeats):
            total, _ = clock.timed(run)
            runs.append({"total": total, **timer.collect()})
    finally:
        timer.enabled = False
        timer.collect()
    return {"scan": _scan_label(args.torch_device), "unhooked_total_ms": statistics.median(unhooked),
            **split_row(runs)}


def measure_split_decode(model, args, clock: Clock, timer: KindTimer, batch: int, context: int) -> dict:
    """Prefill context tokens into a fresh cache, then time single-token decode forwards."""
    op = get_attention_op(args.attn_name)
    cache = op.create_cache(model.cache_spec(), max_batch_size=batch, max_seq_len=context + args.decode_steps,
                            **bench.cache_options(op.name, args.page_size))
    seq_ids = list(range(batch))
    for seq_id in seq_ids:
        cache.add(seq_id)
    try:
        ids = random_ids(batch, context, model.config.vocab_size, args.seed, args.torch_device)
        meta = cache.prepare(seq_ids, [context] * batch)
        last = torch.full((batch,), context - 1, device=args.torch_device)
        tokens = model(ids, attn_name=op.name, logits_positions=last, cache=cache, meta=meta)[:, -1].argmax(-1)
        unhooked, runs = [], []
        for step in range(args.decode_steps):
            meta = cache.prepare(seq_ids, [1] * batch)
            hooked = step >= args.warmup + args.repeats
            timer.enabled = hooked
            ms, logits = clock.timed(lambda tokens=tokens, meta=meta: model(tokens[:, None], attn_name=op.name,
                                                                            cache=cache, meta=meta))
            timer.enabled = False
            kinds = timer.collect()
            tokens = logits[:, -1].argmax(-1)
            if hooked:
                runs.append({"total": ms, **kinds})
            elif step >= args.warmup:
                unhooked.append(ms)
    finally:
        timer.enabled = False
        for seq_id in cache.sequences:
            cache.free(seq_id)
    return {"attn_name": op.name, "unhooked_total_ms": statistics.median(unhooked), **split_row(runs)}


def measure_split(model, args, clock: Clock, skipped: list) -> dict:
    timer = KindTimer(model, clock)
    out = {"prefill": [], "decode": []}
    try:
        for batch in args.batch_sizes:
            for context in args.context_lengths:
                for phase, fn in (("prefill", measure_split_prefill), ("decode", measure_split_decode)):
                    where = {"batch_size": batch, "context_len": context}
                    try:
                        row = fn(model, args, clock, timer, batch, context)
                    except torch.cuda.OutOfMemoryError as exc:
                        reason = f"out of GPU memory ({str(exc).splitlines()[0][:200]})"
                        print(f"split {phase} batch {batch} context {context}: {reason}")
                        skipped.append({"section": f"split_{phase}", **where, "reason": reason})
                        bench.release_memory(args.torch_device)
                        continue
                    out[phase].append({**where, **row})
                    print(f"split   {phase:9s} batch {batch:3d} context {context:6d}: {row['total_ms']:10.2f} ms "
                          f"(mamba {row['mamba_share']:.0%}, attention {row['attention_share']:.0%})", flush=True)
                    bench.release_memory(args.torch_device)
    finally:
        timer.remove()
    return out


def memory_figures(model, args) -> dict:
    spec = model.cache_spec()
    state = spec.state_spec
    state_bytes = state.bytes_per_sequence
    kv = spec.kv_bytes_per_token
    return {
        "mamba_layers": len(state.layers),
        "attention_layers": len(spec.attention_layers),
        "mamba_state_bytes_per_sequence": state_bytes,
        "mamba_state_bytes_per_sequence_per_layer": state_bytes // len(state.layers),
        "mamba_state_dtypes": {"conv": str(state.dtype).replace("torch.", ""), "ssm": "float32"},
        "kv_bytes_per_token": kv,
        "kv_dtype": str(spec.dtype).replace("torch.", ""),
        # the context at which the attention layers' KV bytes equal the fixed Mamba state
        "context_where_kv_equals_state": state_bytes / kv if kv else None,
        # if every layer were an attention layer of the same shape
        "all_attention_kv_bytes_per_token": kv * spec.num_layers // max(len(spec.attention_layers), 1),
        "per_context": [{"context_len": c, "kv_bytes_per_sequence": c * kv, "state_bytes_per_sequence": state_bytes,
                         "total_bytes_per_sequence": c * kv + state_bytes,
                         "all_attention_kv_bytes_per_sequence":
                             c * kv * spec.num_layers // max(len(spec.attention_layers), 1)}
                        for c in args.context_lengths],
    }


# ---------------------------------------------------------------------------------------------
# mixer: one Mamba2 mixer and its scan, alone
# ---------------------------------------------------------------------------------------------
def build_mixer(config, dtype: torch.dtype, device: torch.device, seed: int) -> Mamba2Mixer:
    """One Mamba2 mixer of the variant's shape with get_model's random init for a Mamba layer, cast as the model."""
    layer = MambaLayer(config.mamba_config(), layer_idx=0)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for linear in (layer.mamba.in_proj, layer.mamba.out_proj):
            linear.weight.normal_(0.0, config.init_std, generator=generator)
            if linear.bias is not None:
                linear.bias.zero_()
        layer.reset_parameters_seeded(generator)
    return layer.mamba.to(device=device, dtype=dtype).eval().requires_grad_(False)


def mixer_under_test(model, config, args) -> tuple[Mamba2Mixer, str]:
    """The built model's first Mamba mixer when there is a model, else a standalone one (the model is not built)."""
    if model is not None:
        for i, layer in enumerate(model.layers):
            if isinstance(layer.mixer, MambaLayer):
                return layer.mixer.mamba, f"layer {i} of the built model"
    return (build_mixer(config, DTYPES[args.dtype], args.torch_device, args.seed),
            "standalone, get_model's random init for a Mamba layer")


def _generator(batch: int, context: int, seed: int, device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + batch * 7919 + context)


def scan_inputs(config: Mamba2Config, batch: int, context: int, dtype: torch.dtype, device, seed: int) -> tuple:
    """(x, dt, A, B, C) of one scan call as the mixer passes them, drawn from seed on `device` (deterministic there).

    x [b, T, nh, P], B and C [b, T, G, N]: randn in dtype; dt [b, T, nh] = softplus(randn), fp32; A [nh] fp32,
    -logspace(-2, 0): from fast-forgetting heads to heads whose state carries across chunks (dt * A ~ -0.01 per
    step), so that an agreement check covers the chunk-to-chunk carry.
    """
    device = torch.device(device)
    g = _generator(batch, context, seed, device)
    nh, P, G, N = config.num_heads, config.head_dim, config.num_groups, config.state_size

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device)

    x = randn(batch, context, nh, P).to(dtype)
    dt = F.softplus(randn(batch, context, nh))
    A = -torch.logspace(-2, 0, nh, device=device)
    B, C = randn(batch, context, G, N).to(dtype), randn(batch, context, G, N).to(dtype)
    return x, dt, A, B, C


def mixer_input(config: Mamba2Config, batch: int, context: int, dtype: torch.dtype, device, seed: int):
    """hidden [b, T, H] randn in dtype: what the layer norm hands the mixer (unit scale)."""
    device = torch.device(device)
    g = _generator(batch, context, seed + 1, device)
    return torch.randn(batch, context, config.hidden_size, generator=g, device=device).to(dtype)


def scan_fn(path: str, device: torch.device, inputs: tuple, chunk_size: int):
    """One call of the path's scan as the mixer picks it (select_ssd_scan under use_ssd_scan), on inputs."""
    with use_ssd_scan(SCAN_OF_PATH[path]):
        scan = select_ssd_scan(device)
    return lambda: scan(*inputs, chunk_size, None, True)


def time_eager(fn, args, clock: Clock) -> tuple[list[float], object]:
    """--warmup untimed calls, then the device time of each of --repeats calls; (times, last call's output)."""
    for _ in range(args.warmup):
        fn()
    times, out = [], None
    for _ in range(args.repeats):
        out = None  # free the previous output before the next call
        ms, out = clock.timed(fn)
        times.append(ms)
    return times, out


def time_graph(fn, args, clock: Clock) -> list[float]:
    """fn captured once in a CUDA graph (warmed up on a side stream first, as in the PyTorch docs), then --warmup
    untimed replays and the device time of each of --repeats replays: the call's GPU time without its launches."""
    caller_stream = torch.cuda.current_stream()
    side = torch.cuda.Stream()
    side.wait_stream(caller_stream)
    with torch.cuda.stream(side):
        for _ in range(max(args.warmup, 1)):
            fn()
    caller_stream.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            out = fn()  # lives in the graph's memory pool; replays rewrite it
    finally:
        # a failed capture_end leaves torch.cuda.graph's capture stream current
        torch.cuda.set_stream(caller_stream)
    for _ in range(args.warmup):
        graph.replay()
    times = [clock.timed(graph.replay)[0] for _ in range(args.repeats)]
    del out, graph
    return times


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200] if lines else ''}"


def _graph_failure(exc: BaseException) -> str:
    """The capture's own error: a failed capture often surfaces as capture_end's error about an earlier one."""
    root = exc
    while root.__context__ is not None and root.__context__ is not root:
        root = root.__context__
    reason = f"CUDA graph capture failed: {_first_line(root)}"
    return reason if root is exc else f"{reason} (then {_first_line(exc)})"


def _rel_err(out, ref) -> float | None:
    """max over (y, final state) of ||out - ref|| / ||ref||."""
    errs = []
    for a, b in zip(out, ref):
        if a is None or b is None:
            continue
        a, b = a.float(), b.float()
        norm = b.norm().item()
        errs.append((a - b).norm().item() / norm if norm else (a - b).norm().item())
    return max(errs) if errs else None


def _time_figure(figure: str, fn, args, clock: Clock) -> tuple[list[float] | None, object, str | None]:
    """(times, the eager call's output or None, None), or (None, None, why it could not be timed).

    Off CUDA a graphed figure is (None, None, None): the section records that once.
    """
    graphed = figure.endswith("_graph")
    if graphed and not clock.is_cuda:
        return None, None, None
    try:
        if graphed:
            return time_graph(fn, args, clock), None, None
        times, out = time_eager(fn, args, clock)
        return times, out, None
    except torch.cuda.OutOfMemoryError as exc:
        reason = f"out of GPU memory ({str(exc).splitlines()[0][:200]})"
    except Exception as exc:  # noqa: BLE001 - a capture that fails is a result to record, not a crash
        if not graphed:
            raise
        reason = _graph_failure(exc)
        try:
            clock.sync()
        except Exception as sync_exc:  # noqa: BLE001
            reason += f"; the device then reported {_first_line(sync_exc)}"
    bench.release_memory(clock.device)
    return None, None, reason


def measure_mixer(mixer: Mamba2Mixer, args, clock: Clock, skipped: list) -> list[dict]:
    device = args.torch_device
    dtype = DTYPES[args.dtype]
    config = mixer.config
    graphs = device.type == "cuda"
    if not graphs:
        skipped.append({"section": "mixer", "figure": "scan_graph, mixer_graph",
                        "reason": "CUDA graphs need a CUDA device; only the eager figures are timed"})
    unavailable = _unavailable_paths("mixer", args, skipped)
    # the reference first, so that each other path's scan output is compared with it as soon as it is timed
    order = sorted(args.paths, key=lambda p: p != "reference")
    rows = []
    for batch in args.batch_sizes:
        for context in args.context_lengths:
            inputs = scan_inputs(config, batch, context, dtype, device, args.seed)
            hidden = mixer_input(config, batch, context, dtype, device, args.seed)
            reference_out = None
            for path in order:
                if unavailable[path]:
                    continue
                where = {"path": path, "batch_size": batch, "context_len": context}
                if _over_recurrent_cap("mixer", where, args, skipped):
                    continue
                row = dict(where)
                bench.reset_peak_memory(device)
                with use_ssd_scan(SCAN_OF_PATH[path]):
                    calls = {"scan": scan_fn(path, device, inputs, config.chunk_size),
                             "mixer": lambda hidden=hidden: mixer(hidden)}
                    for figure in MIXER_FIGURES:
                        times, out, reason = _time_figure(figure, calls[figure.removesuffix("_graph")], args, clock)
                        if reason:
                            print(f"mixer {path} batch {batch} context {context} {figure}: {reason}")
                            skipped.append({"section": "mixer", **where, "figure": figure, "reason": reason})
                        ms = statistics.median(times) if times else None
                        row[f"{figure}_ms"] = ms
                        row[f"{figure}_times_ms"] = times
                        row[f"{figure}_tokens_per_s"] = batch * context / ms * 1e3 if ms else None
                        if figure == "scan":
                            row["scan_rel_err_vs_reference"] = (
                                None if path == "reference" or out is None or reference_out is None
                                else _rel_err(out, reference_out))
                            if path == "reference":
                                reference_out = out
                        out = None
                row["peak_gpu_mem_allocated_gb"] = bench.peak_memory_gb(device)[0]
                rows.append(row)
                print(f"mixer   {path:9s} batch {batch:3d} context {context:6d}: scan {_ms(row['scan_ms'])} "
                      f"(graphed {_ms(row['scan_graph_ms'])}), mixer {_ms(row['mixer_ms'])} "
                      f"(graphed {_ms(row['mixer_graph_ms'])})", flush=True)
                bench.release_memory(device)
            del inputs, hidden, reference_out
            bench.release_memory(device)
    return rows


def _ms(v) -> str:
    return "-" if v is None else f"{v:.3f} ms"


def mixer_speedups(rows: list[dict], args) -> list[dict]:
    by = {(r["path"], r["batch_size"], r["context_len"]): r for r in rows}
    out = []
    for batch in args.batch_sizes:
        for context in args.context_lengths:
            entry = {"batch_size": batch, "context_len": context}
            for figure in MIXER_FIGURES:
                for slow, fast in SPEEDUP_PAIRS:
                    entry[f"{figure}_{fast}_vs_{slow}"] = _ratio(by.get((slow, batch, context), {}).get(f"{figure}_ms"),
                                                                 by.get((fast, batch, context), {}).get(f"{figure}_ms"))
            out.append(entry)
    return out


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
def tables(results: dict, args) -> str:
    ms = {(r["path"], r["batch_size"], r["context_len"]): r["median_ms"] for r in results["prefill"]}
    out = []
    if "prefill" in args.sections:
        rows = [[s["batch_size"], s["context_len"], *(ms.get((p, s["batch_size"], s["context_len"])) for p in PATHS),
                 s["fast_vs_reference"], s["fast_vs_recurrent"], s["reference_vs_recurrent"]]
                for s in results["speedups"]]
        out.append("## prefill ms (median)\n" + bench.markdown_table(
            ["batch", "context", "fast", "reference", "recurrent", "fast/ref x", "fast/recurrent x",
             "ref/recurrent x"], rows))
    split_rows = []
    for phase in ("prefill", "decode"):
        for r in results["split"][phase]:
            split_rows.append([phase, r["batch_size"], r["context_len"], r["unhooked_total_ms"], r["total_ms"],
                               *(f"{r[f'{k}_ms']:.2f} ({r[f'{k}_share']:.0%})" for k in (*KINDS, "other"))])
    if split_rows:
        scan = results["model"]["default_scan"]
        out.append(f"## time per layer kind (scan: {scan}; decode cache: {args.attn_name})\n" + bench.markdown_table(
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
            + bench.markdown_table(["context", "KV MB", "Mamba state MB", "total MB", "all-attention KV MB"],
                                   [[r["context_len"], r["kv_bytes_per_sequence"] / 1e6,
                                     r["state_bytes_per_sequence"] / 1e6, r["total_bytes_per_sequence"] / 1e6,
                                     r["all_attention_kv_bytes_per_sequence"] / 1e6] for r in m["per_context"]]))
    if results["skipped"]:
        out.append("skipped:\n" + "\n".join(f"- {_where(s)}: {s['reason']}" for s in results["skipped"]))
    return "\n\n".join(out)


def mixer_tables(results: dict, args) -> str:
    clock = "CUDA events" if args.device == "cuda" else "perf_counter"
    rank = {p: i for i, p in enumerate(PATHS)}
    rows = [[r["batch_size"], r["context_len"], r["path"], r["scan_ms"], r["scan_graph_ms"], r["mixer_ms"],
             r["mixer_graph_ms"], _sig(r["mixer_tokens_per_s"]), _sig(r["mixer_graph_tokens_per_s"]),
             None if r["scan_rel_err_vs_reference"] is None else f"{r['scan_rel_err_vs_reference']:.1e}"]
            for r in sorted(results["mixer"], key=lambda r: (r["batch_size"], r["context_len"], rank[r["path"]]))]
    times = (f"## one Mamba2 mixer ({results['model']['mixer']}): ms per call (median; eager: {clock} around one "
             "call; graphed: one CUDA-graph replay)\n" + bench.markdown_table(
                 ["batch", "context", "path", "scan ms", "scan graphed ms", "mixer ms", "mixer graphed ms",
                  "mixer tok/s", "mixer graphed tok/s", "scan rel err vs ref"], rows))
    labels = {"scan": "scan", "scan_graph": "scan graphed", "mixer": "mixer", "mixer_graph": "mixer graphed"}
    rows = [[s["batch_size"], s["context_len"], labels[f], s[f"{f}_fast_vs_reference"], s[f"{f}_fast_vs_recurrent"],
             s[f"{f}_reference_vs_recurrent"]]
            for s in results["mixer_speedups"] for f in MIXER_FIGURES
            if any(s[f"{f}_{k}"] is not None for k in ("fast_vs_reference", "fast_vs_recurrent",
                                                         "reference_vs_recurrent"))]
    speed = "## mixer speedups (ratio of median ms)\n" + (bench.markdown_table(
        ["batch", "context", "figure", "fast/ref x", "fast/recurrent x", "ref/recurrent x"], rows)
        if rows else "none: fewer than two paths were timed at any point")
    return times + "\n\n" + speed


def _sig(v) -> str | None:
    return None if v is None else f"{v:.3g}"


def _where(entry: dict) -> str:
    parts = [entry["section"], entry.get("path")]
    if "batch_size" in entry:
        parts.append(f"batch {entry['batch_size']} context {entry['context_len']}")
    parts.append(entry.get("figure"))
    return " ".join(p for p in parts if p)


def _scan_label(device: torch.device) -> str:
    scan = select_ssd_scan(device)
    return "reference" if scan is ssd_scan_reference else "fast" if scan.__name__ == "ssd_scan_triton" else scan.__name__


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = resolve_args(build_parser(), argv)
    device = args.torch_device
    command = " ".join(shlex.quote(a) for a in ["scripts/profile_hybrid.py", *argv])
    torch.manual_seed(args.seed)
    model_config = get_config(ARCHITECTURE, args.variant)
    model = None
    if any(s in args.sections for s in MODEL_SECTIONS):
        model = get_model(ARCHITECTURE, args.variant, device_type=device.type, data_type=DTYPES[args.dtype],
                          attn_name=args.prefill_attn_name, seed=args.seed)
    clock = Clock(device)
    print(f"{ARCHITECTURE} {args.variant} ({args.dtype}, random weights) on {bench.device_name(device)}; "
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
    config = {k: v for k, v in vars(args).items() if k != "torch_device"}
    results = {
        "meta": bench.run_metadata(command, device),
        "config": {**config, "architecture": ARCHITECTURE},
        "model": {"variant": args.variant, "dtype": args.dtype,
                  # None when only the mixer section ran (the whole model was not built)
                  "num_parameters": None if model is None else sum(p.numel() for p in model.parameters()),
                  "num_layers": model_config.num_layers,
                  "mamba_layers": [i for i, t in enumerate(layer_types) if t == "mamba"],
                  "attention_layers": [i for i, t in enumerate(layer_types) if t == "attention"],
                  "max_position_embeddings": model_config.max_position_embeddings,
                  "default_scan": _scan_label(device),
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
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = args.run_name or f"{args.variant}-{args.dtype}-{device.type}-{time.strftime('%Y%m%d-%H%M%S')}"
    path = out_dir / f"{name}.json"
    results["path"] = str(path)
    path.write_text(json.dumps(bench._jsonable(results), indent=2) + "\n")
    print(f"\n# {ARCHITECTURE} {args.variant} {args.dtype} on {results['meta']['device']}\n\n`{command}`\n\n"
          + tables(results, args) + f"\n\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
