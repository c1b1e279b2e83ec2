"""Where an LLMEngine run spends its time: torch.profiler tables, engine phase timers, graphed decode-step times."""

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fms.bench.results import run_metadata, write_json
from fms.bench.timing import synchronize
from fms.bench.workloads import MixedWorkload
from fms.models import get_model
from fms.runtime.sampling_params import SamplingParams
from fms.serving import LLMEngine


@dataclass
class ServingProfileConfig:
    """One profiled serving run; variant None: 3.2-1b on CUDA, micro on CPU."""

    results_dir: Path = Path("results/profile_serving")
    architecture: str = "llama"
    variant: str | None = None
    device: str = "cpu"
    num_requests: int = 32
    prompt_range: tuple[int, int] = (64, 512)
    output_len: int = 64
    max_num_seqs: int | None = None
    max_decode_steps: int | None = None
    num_pages: int | None = None
    step_batch_sizes: tuple[int, ...] = (1, 8, 32, 128)
    kernel_batch_sizes: tuple[int, ...] = (1, 128)
    top: int = 20
    command: str = "scripts/profile_serving.py"

    def __post_init__(self):
        is_cuda = torch.device(self.device).type == "cuda"
        self.variant = self.variant or ("3.2-1b" if is_cuda else "micro")
        for name in ("num_requests", "output_len", "top"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        MixedWorkload(self.num_requests, tuple(self.prompt_range), (self.output_len, self.output_len))


def _table(prof, key: str, top: int) -> list[dict]:
    rows = []
    for e in prof.key_averages():
        rows.append({"name": e.key[:90], "count": e.count,
                     "self_device_ms": getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) / 1e3,
                     "self_cpu_ms": e.self_cpu_time_total / 1e3})
    rows.sort(key=lambda r: -r[key])
    return rows[:top]


def _graph_bucket(dec, batch_size: int) -> int | None:
    """The captured decode-graph batch size that holds batch_size; None without graphs or past the largest."""
    return next((s for s in dec.batch_sizes if s >= batch_size), None) if dec.use_graphs else None


def step_times(engine, batch_sizes) -> list[dict]:
    """Median device ms of one decode step per batch size: replays of the runner's graphs on idle rows."""
    dec = engine.runner.decoder
    out = []
    for b in batch_sizes:
        size = _graph_bucket(dec, b)
        if size is None:
            continue
        graph = dec.idle_graph(size)
        times = []
        for _ in range(20):
            dec.step_index.zero_()  # each replay writes out_tokens[step_index]
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        out.append({"batch_size": size, "graph_step_ms": sorted(times)[len(times) // 2],
                    "note": "idle rows: every row reads one scratch token, so this is the weight-bound floor"})
    return out


def _step_kernels(engine, activities, top: int, batch_size: int) -> list[dict]:
    """The kernels inside one decode-step graph of the bucket that holds batch_size, per step (10 replays)."""
    dec = engine.runner.decoder
    size = _graph_bucket(dec, batch_size)
    if size is None:
        return []
    graph = dec.idle_graph(size)
    with torch.profiler.profile(activities=activities) as step_prof:
        for _ in range(10):
            dec.step_index.zero_()
            graph.replay()
        torch.cuda.synchronize()
    rows = _table(step_prof, "self_device_ms", top)
    for r in rows:
        r["per_step_us"] = r["self_device_ms"] * 100  # 10 replays
        r["graph_batch_size"] = size
    return rows


def print_profile(results: dict) -> None:
    for batch_size, rows in results["step_kernels"].items():
        if rows:
            total = sum(r["per_step_us"] for r in rows)
            title = f"decode step kernel, graph of batch {rows[0]['graph_batch_size']} (idle rows)"
            print(f"{title:<92}{'count':>7}{'us/step':>10}")
            for r in rows:
                print(f"{r['name']:<92}{r['count']:>7}{r['per_step_us']:>10.1f}")
            print(f"{'  these rows in all':<92}{'':>7}{total:>10.1f}")
    print(f"{'kernel (self device ms)':<92}{'count':>7}{'ms':>10}")
    for r in results["kernels"]:
        print(f"{r['name']:<92}{r['count']:>7}{r['self_device_ms']:>10.2f}")
    print(f"\n{'host op (self CPU ms)':<92}{'count':>7}{'ms':>10}")
    for r in results["host_ops"]:
        print(f"{r['name']:<92}{r['count']:>7}{r['self_cpu_ms']:>10.2f}")
    print("\nengine phases (s):", {k: round(v, 3) for k, v in results["engine_stats"]["time_s"].items()})
    for s in results["decode_step_ms"]:
        print(f"decode step, batch {s['batch_size']}: {s['graph_step_ms']:.3f} ms (graph replay)")


def profile_serving(config: ServingProfileConfig) -> dict:
    """Profile one serving run after a warm-up; print the tables and write profile.json."""
    device = torch.device(config.device)
    is_cuda = device.type == "cuda"
    model = get_model(config.architecture, config.variant, device_type=device.type, data_type=None)
    workload = MixedWorkload(config.num_requests, tuple(config.prompt_range), (config.output_len, config.output_len))
    prompts, _ = workload.prompts(model.config.vocab_size)
    steps = {} if config.max_decode_steps is None else {"max_decode_steps": config.max_decode_steps}
    engine = LLMEngine(model, max_num_seqs=config.max_num_seqs or (128 if is_cuda else 8),
                       num_pages=config.num_pages or (None if is_cuda else 256), **steps)
    engine.generate(prompts[:8], SamplingParams(max_new_tokens=4, ignore_eos=True), use_tqdm=False)  # warm-up
    if engine.prefix_cache is not None:
        engine.prefix_cache.clear()
    engine.reset_stats()
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if is_cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        engine.generate(prompts, SamplingParams(max_new_tokens=config.output_len, ignore_eos=True), use_tqdm=False)
        synchronize(device)
    graphed = is_cuda and engine.runner.decoder.use_graphs
    results = {"metadata": run_metadata(config.command, device), "config": asdict(config),
               "variant": config.variant, "num_requests": config.num_requests, "output_len": config.output_len,
               "kernels": _table(prof, "self_device_ms", config.top) if is_cuda else [],
               "host_ops": _table(prof, "self_cpu_ms", config.top),
               "step_kernels": {str(b): _step_kernels(engine, activities, config.top, b) if graphed else []
                                for b in config.kernel_batch_sizes},
               "engine_stats": engine.stats(),
               "decode_step_ms": step_times(engine, config.step_batch_sizes) if is_cuda else []}
    print_profile(results)
    write_json(Path(config.results_dir) / "profile.json", results)
    return results
