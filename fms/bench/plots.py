"""PNG plots of a static benchmark: latency, throughput, ms/token and memory per backend, the mixed workload."""

from pathlib import Path


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


