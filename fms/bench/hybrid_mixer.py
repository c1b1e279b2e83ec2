"""The hybrid profile's mixer section: one Mamba2 mixer and its scan alone, per scan path, eager and CUDA-graphed."""

import statistics

import torch

from fms.bench.hybrid_sections import SPEEDUP_PAIRS, over_recurrent_cap, ratio, unavailable_paths
from fms.bench.ssd import DTYPES, PATHS, mixer_input, rel_err, scan_fn, scan_inputs
from fms.bench.switches import scan_path
from fms.bench.tables import markdown_table
from fms.bench.timing import Clock, graph_failure, first_line, peak_memory_gb, release_memory, reset_peak_memory
from fms.bench.timing import time_eager, time_graph
from fms.modules.mamba_layer import MambaLayer
from fms.modules.ssm import Mamba2Mixer

MIXER_FIGURES = ("scan", "scan_graph", "mixer", "mixer_graph")  # eager and CUDA-graphed, for the scan and the mixer


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


def time_figure(figure: str, fn, args, clock: Clock) -> tuple[list[float] | None, object, str | None]:
    """(times, the eager call's output or None, None), or (None, None, why it could not be timed).

    Off CUDA a graphed figure is (None, None, None): the section records that once.
    """
    graphed = figure.endswith("_graph")
    if graphed and not clock.is_cuda:
        return None, None, None
    try:
        if graphed:
            return time_graph(fn, args.warmup, args.repeats, clock), None, None
        times, out = time_eager(fn, args.warmup, args.repeats, clock)
        return times, out, None
    except torch.cuda.OutOfMemoryError as exc:
        reason = f"out of GPU memory ({str(exc).splitlines()[0][:200]})"
    except Exception as exc:  # noqa: BLE001 - a capture that fails is a result to record, not a crash
        if not graphed:
            raise
        reason = graph_failure(exc)
        try:
            clock.sync()
        except Exception as sync_exc:  # noqa: BLE001
            reason += f"; the device then reported {first_line(sync_exc)}"
    release_memory(clock.device)
    return None, None, reason


def measure_mixer(mixer: Mamba2Mixer, args, clock: Clock, skipped: list) -> list[dict]:
    device = args.torch_device
    dtype = DTYPES[args.dtype]
    config = mixer.config
    graphs = device.type == "cuda"
    if not graphs:
        skipped.append({"section": "mixer", "figure": "scan_graph, mixer_graph",
                        "reason": "CUDA graphs need a CUDA device; only the eager figures are timed"})
    unavailable = unavailable_paths("mixer", args, skipped)
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
                if over_recurrent_cap("mixer", where, args, skipped):
                    continue
                row = dict(where)
                reset_peak_memory(device)
                with scan_path(mixer, path):
                    calls = {"scan": scan_fn(path, device, inputs, config.chunk_size),
                             "mixer": lambda hidden=hidden: mixer(hidden)}
                    for figure in MIXER_FIGURES:
                        times, out, reason = time_figure(figure, calls[figure.removesuffix("_graph")], args, clock)
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
                                else rel_err(out, reference_out))
                            if path == "reference":
                                reference_out = out
                        out = None
                row["peak_gpu_mem_allocated_gb"] = peak_memory_gb(device)[0]
                rows.append(row)
                print(f"mixer   {path:9s} batch {batch:3d} context {context:6d}: scan {_ms(row['scan_ms'])} "
                      f"(graphed {_ms(row['scan_graph_ms'])}), mixer {_ms(row['mixer_ms'])} "
                      f"(graphed {_ms(row['mixer_graph_ms'])})", flush=True)
                release_memory(device)
            del inputs, hidden, reference_out
            release_memory(device)
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
                    entry[f"{figure}_{fast}_vs_{slow}"] = ratio(by.get((slow, batch, context), {}).get(f"{figure}_ms"),
                                                                 by.get((fast, batch, context), {}).get(f"{figure}_ms"))
            out.append(entry)
    return out


def mixer_tables(results: dict, args) -> str:
    clock = "CUDA events" if args.device == "cuda" else "perf_counter"
    rank = {p: i for i, p in enumerate(PATHS)}
    rows = [[r["batch_size"], r["context_len"], r["path"], r["scan_ms"], r["scan_graph_ms"], r["mixer_ms"],
             r["mixer_graph_ms"], _sig(r["mixer_tokens_per_s"]), _sig(r["mixer_graph_tokens_per_s"]),
             None if r["scan_rel_err_vs_reference"] is None else f"{r['scan_rel_err_vs_reference']:.1e}"]
            for r in sorted(results["mixer"], key=lambda r: (r["batch_size"], r["context_len"], rank[r["path"]]))]
    times = (f"## one Mamba2 mixer ({results['model']['mixer']}): ms per call (median; eager: {clock} around one "
             "call; graphed: one CUDA-graph replay)\n" + markdown_table(
                 ["batch", "context", "path", "scan ms", "scan graphed ms", "mixer ms", "mixer graphed ms",
                  "mixer tok/s", "mixer graphed tok/s", "scan rel err vs ref"], rows))
    labels = {"scan": "scan", "scan_graph": "scan graphed", "mixer": "mixer", "mixer_graph": "mixer graphed"}
    rows = [[s["batch_size"], s["context_len"], labels[f], s[f"{f}_fast_vs_reference"], s[f"{f}_fast_vs_recurrent"],
             s[f"{f}_reference_vs_recurrent"]]
            for s in results["mixer_speedups"] for f in MIXER_FIGURES
            if any(s[f"{f}_{k}"] is not None for k in ("fast_vs_reference", "fast_vs_recurrent",
                                                         "reference_vs_recurrent"))]
    speed = "## mixer speedups (ratio of median ms)\n" + (markdown_table(
        ["batch", "context", "figure", "fast/ref x", "fast/recurrent x", "ref/recurrent x"], rows)
        if rows else "none: fewer than two paths were timed at any point")
    return times + "\n\n" + speed


def _sig(v) -> str | None:
    return None if v is None else f"{v:.3g}"


