"""The hybrid profile's model sections: no-cache prefill per scan path, time per layer kind (hooks), state memory."""

import statistics

import torch

from fms.bench.ssd import path_unavailable, scan_label
from fms.bench.switches import scan_path
from fms.bench.timing import Clock, peak_memory_gb, release_memory, reset_peak_memory
from fms.modules.attention import MultiHeadAttention, get_attention_op
from fms.modules.mamba_layer import MambaLayer

KINDS = ("mamba", "attention")
SPEEDUP_PAIRS = (("reference", "fast"), ("recurrent", "fast"), ("recurrent", "reference"))  # (slow, fast)


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


def split_row(runs: list[dict]) -> dict:
    """Medians over runs of {total, mamba, attention}; other is the median of each run's remainder."""
    total = statistics.median([r["total"] for r in runs])
    row = {"total_ms": total}
    for kind in KINDS:
        row[f"{kind}_ms"] = statistics.median([r[kind] for r in runs])
    row["other_ms"] = statistics.median([r["total"] - r["mamba"] - r["attention"] for r in runs])
    for kind in (*KINDS, "other"):
        row[f"{kind}_share"] = row[f"{kind}_ms"] / total if total else None
    return row



def random_ids(batch: int, context: int, vocab: int, seed: int, device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + batch * 7919 + context)
    return torch.randint(0, vocab, (batch, context), generator=generator).to(device)


def prefill_fn(model, ids: torch.Tensor):
    last = torch.full((ids.shape[0],), ids.shape[1] - 1, device=ids.device)
    return lambda: model(ids, logits_positions=last)


def measure_prefill(model, args, clock: Clock, skipped: list) -> list[dict]:
    rows = []
    unavailable = unavailable_paths("prefill", args, skipped)
    for batch in args.batch_sizes:
        for context in args.context_lengths:
            ids = random_ids(batch, context, model.config.vocab_size, args.seed, args.torch_device)
            run = prefill_fn(model, ids)
            for path in args.paths:
                if unavailable[path]:
                    continue
                where = {"path": path, "batch_size": batch, "context_len": context}
                if over_recurrent_cap("prefill", where, args, skipped):
                    continue
                try:
                    with scan_path(model, path):
                        for _ in range(args.warmup):
                            run()
                        reset_peak_memory(args.torch_device)
                        times = [clock.timed(run)[0] for _ in range(args.repeats)]
                except torch.cuda.OutOfMemoryError as exc:
                    reason = f"out of GPU memory ({str(exc).splitlines()[0][:200]})"
                    print(f"prefill {path} batch {batch} context {context}: {reason}")
                    skipped.append({"section": "prefill", **where, "reason": reason})
                    release_memory(args.torch_device)
                    continue
                ms = statistics.median(times)
                row = {**where, "median_ms": ms, "times_ms": times, "tokens_per_s": batch * context / ms * 1e3,
                       "peak_gpu_mem_allocated_gb": peak_memory_gb(args.torch_device)[0]}
                rows.append(row)
                print(f"prefill {path:9s} batch {batch:3d} context {context:6d}: {ms:10.2f} ms", flush=True)
            del ids, run
            release_memory(args.torch_device)
    return rows


def unavailable_paths(section: str, args, skipped: list) -> dict[str, str | None]:
    """path -> why it cannot run here (recorded in skipped once), or None."""
    unavailable = {p: path_unavailable(p, args.torch_device) for p in args.paths}
    for path, reason in unavailable.items():
        if reason:
            print(f"{section}: skipping the {path} path: {reason}")
            skipped.append({"section": section, "path": path, "reason": reason})
    return unavailable


def over_recurrent_cap(section: str, where: dict, args, skipped: list) -> bool:
    """True (and recorded in skipped) for the token-by-token path past --max_recurrent_context."""
    if where["path"] != "recurrent" or where["context_len"] <= args.max_recurrent_context:
        return False
    skipped.append({"section": section, **where,
                    "reason": f"context > --max_recurrent_context ({args.max_recurrent_context})"})
    return True


def ratio(slow_ms, fast_ms) -> float | None:
    return slow_ms / fast_ms if slow_ms is not None and fast_ms else None


def speedups(prefill: list[dict], args) -> list[dict]:
    ms = {(r["path"], r["batch_size"], r["context_len"]): r["median_ms"] for r in prefill}
    out = []
    for batch in args.batch_sizes:
        for context in args.context_lengths:
            slow_over_fast = {f"{fast}_vs_{slow}": ratio(ms.get((slow, batch, context)),
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
    return {"scan": scan_label(args.torch_device, model.kernels.ssd_scan),
            "unhooked_total_ms": statistics.median(unhooked), **split_row(runs)}


def measure_split_decode(model, args, clock: Clock, timer: KindTimer, batch: int, context: int) -> dict:
    """Prefill context tokens into a fresh cache, then time single-token decode forwards."""
    op = get_attention_op(args.attn_name)
    cache = op.create_cache(model.cache_spec(), max_batch_size=batch, max_seq_len=context + args.decode_steps,
                            **op.cache_kwargs(page_size=args.page_size))
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
                        release_memory(args.torch_device)
                        continue
                    out[phase].append({**where, **row})
                    print(f"split   {phase:9s} batch {batch:3d} context {context:6d}: {row['total_ms']:10.2f} ms "
                          f"(mamba {row['mamba_share']:.0%}, attention {row['attention_share']:.0%})", flush=True)
                    release_memory(args.torch_device)
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


