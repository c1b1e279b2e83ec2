"""The Mamba2 SSD scan as benchmarks call it: seeded inputs of a mixer's shapes, one call per scan path, errors.

Also the scan sweep (run_ssd_scan_bench): our Triton kernel over its block sizes against fla's
chunk_simple_gla and the chunked PyTorch reference, each call replayed from a CUDA graph.
"""

import dataclasses
import itertools
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from fms.bench.results import run_metadata, write_json
from fms.bench.switches import SCAN_OF_PATH, scan_of_path
from fms.bench.timing import Clock, time_graph
from fms.models import get_config
from fms.modules.ssm import Mamba2Config, check_ssd_scan_available, select_ssd_scan, ssd_scan_reference

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PATHS = tuple(SCAN_OF_PATH)  # fast, reference, recurrent


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
    """One call of the path's scan as a mixer configured for the path picks it (select_ssd_scan), on inputs."""
    scan = select_ssd_scan(device, scan_of_path(path))
    return lambda: scan(*inputs, chunk_size, None, True)


def rel_err(out, ref) -> float | None:
    """max over (y, final state) of ||out - ref|| / ||ref||."""
    errs = []
    for a, b in zip(out, ref):
        if a is None or b is None:
            continue
        a, b = a.float(), b.float()
        norm = b.norm().item()
        errs.append((a - b).norm().item() / norm if norm else (a - b).norm().item())
    return max(errs) if errs else None


def path_unavailable(path: str, device: torch.device) -> str | None:
    """Why a scan path cannot run here, or None."""
    if path != "fast":
        return None
    if device.type != "cuda":
        return "the Triton scan runs on CUDA only"
    try:
        check_ssd_scan_available(scan_of_path(path))
    except RuntimeError as exc:
        return str(exc)
    return None




def scan_label(device: torch.device, ssd_scan: str = "auto") -> str:
    """The path a KernelConfig.ssd_scan choice (default: "auto") takes on this device."""
    scan = select_ssd_scan(device, ssd_scan)
    return "reference" if scan is ssd_scan_reference else "fast" if scan.__name__ == "ssd_scan_triton" else scan.__name__


@dataclasses.dataclass
class SsdScanBenchConfig:
    """One scan sweep: a granite_hybrid variant's Mamba shape, points, and the kernel knobs to sweep."""

    output: str
    variant: str = "4.0-h-1b"
    dtype: str = "bf16"
    batch_sizes: tuple[int, ...] = (1, 8)
    context_lengths: tuple[int, ...] = (4096, 16384)
    block_t: tuple[int, ...] = (32, 64)
    block_p: tuple[int, ...] = (16, 32, 64)
    num_segments: tuple[int, ...] = (1, 2, 4, 8)
    num_warps: tuple[int, ...] = (4,)
    defaults_only: bool = False
    repeats: int = 20
    warmup: int = 3
    seed: int = 0
    command: str = "scripts/bench_ssd_scan.py"

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        for name in ("batch_sizes", "context_lengths", "block_t", "block_p", "num_segments", "num_warps"):
            values = tuple(getattr(self, name))
            if not values or min(values) < 1:
                raise ValueError(f"{name} needs values >= 1, got {list(values)}")
            setattr(self, name, values)
        if self.repeats < 1 or self.warmup < 0:
            raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {self.repeats} and {self.warmup}")


def _record(rows: list, where: dict, name: str, fn, ref, config: SsdScanBenchConfig, clock: Clock, **knobs):
    """Time one scan call replayed from a CUDA graph and append its row (or the error it raised); its output."""
    try:
        with torch.no_grad():
            out = fn()
            times = time_graph(fn, config.warmup, config.repeats, clock)
    except Exception as exc:  # noqa: BLE001 - a variant that does not compile is a result
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        rows.append({**where, "path": name, **knobs, "error": error})
        print(f"{where} {name} {knobs}: {error}", flush=True)
        return None
    row = {**where, "path": name, **knobs, "median_ms": statistics.median(times), "times_ms": times,
           "rel_err_vs_reference": None if ref is None else rel_err(out, ref)}
    rows.append(row)
    print(f"{where} {name:9s} {knobs}: {row['median_ms']:.4f} ms err {row['rel_err_vs_reference']}", flush=True)
    return out


def _sweep_point(rows, config, mamba, batch: int, context: int, clock: Clock, num_sms: int) -> None:
    from fms.modules.ssm import _fla_available, _ssd_scan_fla
    from fms.triton import ssd_scan
    from fms.triton.support import cdiv

    where = {"batch_size": batch, "context_len": context}
    inputs = scan_inputs(mamba, batch, context, DTYPES[config.dtype], clock.device, config.seed)
    chunk = mamba.chunk_size
    ref = _record(rows, where, "reference", lambda: ssd_scan_reference(*inputs, chunk, None, True), None, config,
                  clock)
    if _fla_available():
        _record(rows, where, "fla", lambda: _ssd_scan_fla(*inputs, chunk, None, True), ref, config, clock)
    variants = itertools.product(config.block_t, config.block_p, config.num_segments, config.num_warps)
    for block_t, block_p, segments, warps in ([] if config.defaults_only else variants):
        if block_p > mamba.head_dim:
            continue
        knobs = {"block_t": block_t, "block_p": block_p, "num_segments": segments, "num_warps": warps}
        _record(rows, where, "triton", lambda: ssd_scan.ssd_scan_triton(*inputs, chunk, None, True, **knobs), ref,
                config, clock, **knobs)
    block_p = ssd_scan.choose_block_p(batch, mamba.num_heads, mamba.head_dim, num_sms, True)
    segments = ssd_scan.choose_num_segments(batch * mamba.num_heads * cdiv(mamba.head_dim, block_p), context, num_sms)
    _record(rows, where, "default", lambda: ssd_scan.ssd_scan_triton(*inputs, chunk, None, True), ref, config, clock,
            block_p=block_p, num_segments=segments)


def _summary(rows: list[dict], config: SsdScanBenchConfig) -> list[dict]:
    summary = []
    for batch, context in itertools.product(config.batch_sizes, config.context_lengths):
        here = [r for r in rows if r["batch_size"] == batch and r["context_len"] == context and "median_ms" in r]
        by = {r["path"]: r for r in here if r["path"] != "triton"}
        best = min((r for r in here if r["path"] == "triton"), key=lambda r: r["median_ms"], default=None)
        ref_ms = by.get("reference", {}).get("median_ms")
        entry = {"batch_size": batch, "context_len": context, "reference_ms": ref_ms,
                 "fla_ms": by.get("fla", {}).get("median_ms"), "default_ms": by.get("default", {}).get("median_ms"),
                 "best_ms": best and best["median_ms"],
                 "best": best and {k: best[k] for k in ("block_t", "block_p", "num_segments", "num_warps")}}
        for name in ("fla", "default", "best"):
            ms = entry[f"{name}_ms"]
            entry[f"{name}_vs_reference"] = ref_ms / ms if ref_ms and ms else None
        summary.append(entry)
    return summary


def run_ssd_scan_bench(config: SsdScanBenchConfig) -> dict:
    """Every point and variant timed on the GPU; writes config.output and prints the summary table."""
    from fms.triton.support import sm_count

    if not torch.cuda.is_available():
        raise RuntimeError("the SSD scan sweep times CUDA kernels; no CUDA device here")
    device = torch.device("cuda")
    clock = Clock(device)
    mamba = get_config("granite_hybrid", config.variant).mamba_config()
    rows: list[dict] = []
    for batch, context in itertools.product(config.batch_sizes, config.context_lengths):
        _sweep_point(rows, config, mamba, batch, context, clock, sm_count(device))
        torch.cuda.empty_cache()
    summary = _summary(rows, config)
    result = {"meta": run_metadata(config.command, device),
              "config": {**dataclasses.asdict(config), "mamba": dataclasses.asdict(mamba)},
              "notes": ["times: one scan call captured in a CUDA graph, CUDA events around each replay, median",
                        "rel_err_vs_reference: ||out - ref|| / ||ref||, max over y and the final state; the reference "
                        "is the chunked PyTorch scan in fp32 on the same inputs"],
              "rows": rows, "summary": summary}
    write_json(Path(config.output), result)
    print("\nbatch context  reference   fla    default  best   | default/ref best/ref fla/ref  best config")
    for e in summary:
        f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        print(f"{e['batch_size']:5d} {e['context_len']:7d} {f(e['reference_ms']):>9} {f(e['fla_ms']):>7} "
              f"{f(e['default_ms']):>7} {f(e['best_ms']):>7} | {f(e['default_vs_reference']):>8} "
              f"{f(e['best_vs_reference']):>8} {f(e['fla_vs_reference']):>7}  {e['best']}")
    return result
