"""Profile a Granite-4.0-H hybrid (Mamba2 + attention): prefill per Mamba scan path, time per layer kind, state memory.

Random weights. Three measurements, each written to one JSON file under --output_dir and summarized on stdout:

  prefill  no-cache forward (logits for the last token only) at each batch x context, once per scan path:
           fast (fla's Triton scan, CUDA only), reference (chunked PyTorch), recurrent (ssd_step per token);
           median ms over --repeats after --warmup, and the speedups of fast over the other two.
  split    one prefill and one decode step (paged cache by default) timed per layer kind: forward hooks on the
           mixers sum the Mamba and attention time; other = total - both (embedding, MLPs, norms, LM head).
  memory   Mamba state bytes per sequence vs KV bytes per token, from model.cache_spec().

    python scripts/profile_hybrid.py                                  # CUDA: 4.0-h-1b bf16, contexts 512..16384
    python scripts/profile_hybrid.py --device cpu --variant h-micro-test --dtype fp32
"""

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from fms.models import get_config, get_model, list_variants
from fms.modules.attention import MultiHeadAttention, attention_op_names, get_attention_op
from fms.modules.mamba_layer import MambaLayer
from fms.modules.paged_cache import SUPPORTED_PAGE_SIZES
from fms.modules.ssm import select_ssd_scan, ssd_scan_reference, use_ssd_scan
from fms.utils import benchmarking as bench

ARCHITECTURE = "granite_hybrid"
PATHS = ("fast", "reference", "recurrent")
SCAN_OF_PATH = {"fast": "fla", "reference": "reference", "recurrent": "recurrent"}
KINDS = ("mamba", "attention")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULT_CONTEXTS = {"cuda": [512, 1024, 2048, 4096, 8192, 16384], "cpu": [32, 64]}
NOTES = [
    "prefill: model(input_ids) with no cache and logits for the last token only (as a serving prefill)",
    "times are the device timeline: CUDA events on a GPU, perf_counter on the CPU; medians over repeats",
    ("split: hooks record an event before and after each mixer; other_ms = total_ms - mamba_ms - attention_ms. "
     "The hooked run's total is total_ms; unhooked_total_ms is the same step without hooks"),
    ("decode: one forward of one new token per row after a prefill of context_len tokens (cache bookkeeping "
     "before the forward is not timed)"),
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
    p.add_argument("--max_recurrent_context", type=int, default=4096,
                   help="the recurrent path only runs up to this context (it is slow)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before them")
    p.add_argument("--attn_name", default="paged", help="attention op of the decode step's cache")
    p.add_argument("--prefill_attn_name", default="sdpa", help="attention op of the no-cache prefill")
    p.add_argument("--page_size", type=int, default=16, choices=SUPPORTED_PAGE_SIZES)
    p.add_argument("--no_split", action="store_true", help="skip the per-layer-kind split")
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

    # the decode measurement appends warmup + 2 * repeats tokens (unhooked, then hooked) after the prompt
    args.decode_steps = args.warmup + 2 * args.repeats
    limit = args.max_position_embeddings
    too_long = sorted(c for c in args.context_lengths if c + args.decode_steps > limit)
    if too_long:
        if explicit:
            parser.error(f"--context_lengths: {too_long[-1]} (+ {args.decode_steps} decode steps) is longer than "
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
        return "fla's Triton scan runs on CUDA only"
    try:
        with use_ssd_scan("fla"):
            pass
    except RuntimeError as exc:
        return str(exc)
    return None


def measure_prefill(model, args, clock: Clock, skipped: list) -> list[dict]:
    rows = []
    unavailable = {p: path_unavailable(p, args.torch_device) for p in args.paths}
    for path, reason in unavailable.items():
        if reason:
            print(f"prefill: skipping the {path} path: {reason}")
            skipped.append({"section": "prefill", "path": path, "reason": reason})
    for batch in args.batch_sizes:
        for context in args.context_lengths:
            ids = random_ids(batch, context, model.config.vocab_size, args.seed, args.torch_device)
            run = prefill_fn(model, ids)
            for path in args.paths:
                if unavailable[path]:
                    continue
                where = {"path": path, "batch_size": batch, "context_len": context}
                if path == "recurrent" and context > args.max_recurrent_context:
                    skipped.append({"section": "prefill", **where,
                                    "reason": f"context > --max_recurrent_context ({args.max_recurrent_context})"})
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


def speedups(prefill: list[dict], args) -> list[dict]:
    ms = {(r["path"], r["batch_size"], r["context_len"]): r["median_ms"] for r in prefill}
    out = []
    for batch in args.batch_sizes:
        for context in args.context_lengths:
            slow_over_fast = {}
            for slow, fast in (("reference", "fast"), ("recurrent", "fast"), ("recurrent", "reference")):
                a, b = ms.get((slow, batch, context)), ms.get((fast, batch, context))
                slow_over_fast[f"{fast}_vs_{slow}"] = a / b if a is not None and b else None
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
# report
# ---------------------------------------------------------------------------------------------
def tables(results: dict, args) -> str:
    ms = {(r["path"], r["batch_size"], r["context_len"]): r["median_ms"] for r in results["prefill"]}
    out = []
    rows = [[s["batch_size"], s["context_len"], *(ms.get((p, s["batch_size"], s["context_len"])) for p in PATHS),
             s["fast_vs_reference"], s["fast_vs_recurrent"], s["reference_vs_recurrent"]]
            for s in results["speedups"]]
    out.append("## prefill ms (median)\n" + bench.markdown_table(
        ["batch", "context", "fast", "reference", "recurrent", "fast/ref x", "fast/recurrent x", "ref/recurrent x"],
        rows))
    split_rows = []
    for phase in ("prefill", "decode"):
        for r in results["split"][phase]:
            split_rows.append([phase, r["batch_size"], r["context_len"], r["unhooked_total_ms"], r["total_ms"],
                               *(f"{r[f'{k}_ms']:.2f} ({r[f'{k}_share']:.0%})" for k in (*KINDS, "other"))])
    if split_rows:
        scan = results["model"]["default_scan"]
        out.append(f"## time per layer kind (scan: {scan}; decode cache: {args.attn_name})\n" + bench.markdown_table(
            ["phase", "batch", "context", "ms", "hooked ms", "mamba ms", "attention ms", "other ms"], split_rows))
    m = results["memory"]
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


def _where(entry: dict) -> str:
    parts = [entry["section"], entry.get("path")]
    if "batch_size" in entry:
        parts.append(f"batch {entry['batch_size']} context {entry['context_len']}")
    return " ".join(p for p in parts if p)


def _scan_label(device: torch.device) -> str:
    scan = select_ssd_scan(device)
    return "reference" if scan is ssd_scan_reference else "fast" if scan.__name__ == "_ssd_scan_fla" else scan.__name__


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = resolve_args(build_parser(), argv)
    device = args.torch_device
    command = " ".join(shlex.quote(a) for a in ["scripts/profile_hybrid.py", *argv])
    torch.manual_seed(args.seed)
    model = get_model(ARCHITECTURE, args.variant, device_type=device.type, data_type=DTYPES[args.dtype],
                      attn_name=args.prefill_attn_name, seed=args.seed)
    clock = Clock(device)
    print(f"{ARCHITECTURE} {args.variant} ({args.dtype}, random weights) on {bench.device_name(device)}; "
          f"contexts {args.context_lengths}, batches {args.batch_sizes}, repeats {args.repeats}, "
          f"warmup {args.warmup}", flush=True)

    skipped: list = []
    with torch.no_grad():
        prefill = measure_prefill(model, args, clock, skipped)
        split = {"prefill": [], "decode": []} if args.no_split else measure_split(model, args, clock, skipped)
    spec = model.cache_spec()
    config = {k: v for k, v in vars(args).items() if k != "torch_device"}
    results = {
        "meta": bench.run_metadata(command, device),
        "config": {**config, "architecture": ARCHITECTURE},
        "model": {"variant": args.variant, "dtype": args.dtype,
                  "num_parameters": sum(p.numel() for p in model.parameters()),
                  "num_layers": spec.num_layers, "mamba_layers": list(spec.state_spec.layers),
                  "attention_layers": list(spec.attention_layers),
                  "max_position_embeddings": model.config.max_position_embeddings,
                  "default_scan": _scan_label(device)},
        "prefill": prefill,
        "speedups": speedups(prefill, args),
        "split": split,
        "memory": memory_figures(model, args),
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
