"""Server throughput at saturation against the offline engine on the same workload (issue 18: >= 90% on the GPU).

One workload (seeded random token-id prompts, fixed output lengths, EOS ignored, all requests at t=0) runs
twice: through LLMEngine.generate() in this process, then through `fms serve` in a child process driven by
`fms bench serve`'s client (streaming /v1/completions). Each side gets an untimed warm-up first, then `repeats`
timed runs. Each timed run sends its own prompts (seeds seed, seed + 2, seed + 3, ...; the warm-up's is seed + 1),
the same list on both sides, so no run is served from the prefix cache of the one before, and the ratio is taken
per run over the same prompts: the headline is the median of those ratios. With fresh_prompts=False every run
resends the first run's prompts (runs 2 on then hit the prefix cache, and how much depends on how requests
arrive) and the headline is the fastest server run over the fastest offline run, as before session 24.
The report holds the command, device, commit, both throughputs and their ratio, per timed run the client's and
the engine's mean TTFT and both engines' steps and phase seconds, and the server's CPU time by thread. The
command line is scripts/bench_server_vs_offline.py.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import random
import shlex
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fms.bench.processes import child_pids, thread_cpu_s
from fms.entrypoints.bench_serve import BenchRequest, _commit, new_session, open_connections, run_load, summarize
from fms.entrypoints.heap import frozen_heap
from fms.serving import trace as step_trace

TARGET_RATIO = 0.9
PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding `fms`: the child server imports it from here


@dataclass
class ServerVsOfflineConfig:
    """The benchmark's settings (the script's flags). model: a local HF checkpoint folder instead of random weights
    (architecture/variant); engine_args: extra `fms serve` engine flags for both sides; engine_process: pass
    --engine-process / --no-engine-process to fms serve (None: its default); port None: a free one; fresh_prompts:
    each timed run its own prompts (see the module's docstring)."""

    architecture: str = "llama"
    variant: str = "micro"
    model: str | None = None
    num_prompts: int = 8
    prompt_range: str = "16,32"
    output_len: int = 8
    warmup_prompts: int = 2
    seed: int = 0
    repeats: int = 2
    fresh_prompts: bool = True
    fresh_connections: bool = False
    idle_before_run_s: float = 0.0
    port: int | None = None
    server_timeout: float = 1200.0
    engine_args: str = ""
    engine_process: bool | None = None
    output: Path = Path("results/server_vs_offline.json")
    command: str = ""
    tokenizer_dir: str | None = field(default=None, repr=False)  # a placeholder tokenizer made once per run

    def __post_init__(self):
        for name, low in (("num_prompts", 1), ("output_len", 1), ("repeats", 1), ("warmup_prompts", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        lo, _, hi = str(self.prompt_range).partition(",")
        try:
            lo, hi = int(lo), int(hi or lo)
        except ValueError:
            lo = hi = 0
        if not 1 <= lo <= hi:
            raise ValueError(f"prompt_range must be LO,HI with 1 <= LO <= HI, got {self.prompt_range!r}")
        for name in ("fresh_prompts", "fresh_connections"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.port is not None and not 1 <= self.port <= 65535:
            raise ValueError(f"port must be in [1, 65535] or None (a free one), got {self.port!r}")
        if not (isinstance(self.idle_before_run_s, (int, float)) and 0 <= self.idle_before_run_s <= 60):
            raise ValueError(f"idle_before_run_s must be in [0, 60] seconds, got {self.idle_before_run_s!r}")
        if not self.server_timeout > 0:
            raise ValueError(f"server_timeout must be > 0 seconds, got {self.server_timeout!r}")
        self.output = Path(self.output)


def workload(num: int, prompt_range: str, output_len: int, vocab_size: int, seed: int) -> list[BenchRequest]:
    lo, _, hi = prompt_range.partition(",")
    lo, hi = int(lo), int(hi or lo)
    rng = random.Random(seed)
    requests = []
    for _ in range(num):
        n = rng.randint(lo, hi)
        requests.append(BenchRequest([rng.randrange(4, vocab_size) for _ in range(n)], n, output_len))
    return requests


def write_placeholder_tokenizer(folder: str, vocab_size: int) -> None:
    """folder/tokenizer.json: a word-level tokenizer with one placeholder word ("t<id>") per id."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(os.path.join(folder, "tokenizer.json"))


def _placeholder_tokenizer(architecture: str, variant: str) -> str:
    """A placeholder tokenizer for the model's whole vocabulary, in a temporary folder (once per run).

    Random weights sample any of the model's ids (128,256 for Llama 3), which the shipped
    2,048-token tokenizer cannot decode; both sides get this one so that text is built the same way."""
    import tempfile

    from fms.models.registry import get_config

    folder = tempfile.mkdtemp(prefix="fms-bench-tokenizer-")
    write_placeholder_tokenizer(folder, get_config(architecture, variant).vocab_size)
    return folder


def _engine_args(config: "ServerVsOfflineConfig"):
    """The engine flags as `fms serve` parses them, and the same parsed for the offline side."""
    from fms.entrypoints.cli import serve_parser

    extra = shlex.split(config.engine_args)
    if "--tokenizer" not in extra and not config.model:
        if config.tokenizer_dir is None:
            config.tokenizer_dir = _placeholder_tokenizer(config.architecture, config.variant)
        extra += ["--tokenizer", config.tokenizer_dir]
    model = [config.model] if config.model else ["--architecture", config.architecture, "--variant", config.variant]
    flags = [*model, "--seed", str(config.seed), *extra]
    return flags, serve_parser().parse_args(flags)


def run_offline(config: "ServerVsOfflineConfig", workloads, warmup) -> dict:
    """The engine in this process: one timed run per workload (config.repeats of them), after the warm-up."""
    from fms.entrypoints.engine_args import build_engine
    from fms.serving import SamplingParams

    _, parsed = _engine_args(config)
    engine, _ = build_engine(parsed)
    trace_path = _trace_path(config, "offline")
    engine.trace = step_trace.StepTrace(trace_path)  # this engine's timeline (fms.serving.trace)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    def run(batch, idle_s=0.0):
        params = [SamplingParams(max_tokens=r.output_len, ignore_eos=True) for r in batch]
        sync()
        time.sleep(idle_s)
        start = time.perf_counter()
        outs = engine.generate([r.prompt for r in batch], params, use_tqdm=False)
        sync()
        return outs, start, time.perf_counter()

    longest = max(r.prompt_len + r.output_len for requests in (warmup, *workloads) for r in requests)
    if longest > engine.max_model_len:  # the engine would reject those requests and the ratio would compare nothing
        raise ValueError(f"the workload's longest request ({longest} tokens: prompt + output_len) exceeds the model "
                         f"length of {engine.max_model_len}; lower --prompt-range / --output-len or raise "
                         "--max-model-len in --engine-args")
    run(warmup)
    durations, engine_runs, output_tokens, windows = [], [], [], []
    with frozen_heap():  # as the server's processes run (fms.entrypoints.heap); thawed so the engine can be freed
        for requests in workloads:
            before = _engine_part(engine.stats())
            outs, start, end = run(requests, config.idle_before_run_s)
            durations.append(end - start)
            windows.append((start, end))
            output_tokens.append(sum(len(o.token_ids) for o in outs))
            engine_runs.append(_engine_delta(before, _engine_part(engine.stats())))
    engine.trace.close()
    events = step_trace.read(trace_path)
    best = min(range(len(durations)), key=durations.__getitem__)
    duration, num_out = durations[best], output_tokens[best]
    num_in = sum(r.prompt_len for r in workloads[best])
    result = {"duration_s": duration, "total_input_tokens": num_in, "total_output_tokens": num_out,
              "output_throughput": num_out / duration, "request_throughput": len(workloads[best]) / duration,
              "total_token_throughput": (num_in + num_out) / duration, "durations_s": durations,
              "output_throughput_per_run": [n / d for n, d in zip(output_tokens, durations)],
              "engine_per_run": engine_runs, "engine": engine.stats(),
              "timeline_per_run": [step_trace.summarize(events, start, end) for start, end in windows]}
    engine = outs = None  # free the pool before the server sizes its own
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the server's pool sizes itself from free memory
    return result


def _trace_path(config: "ServerVsOfflineConfig", side: str) -> str:
    """A new file for one side's engine timeline (FMS_STEP_TRACE), beside the report."""
    path = config.output.with_name(f"{config.output.stem}_{side}_trace.txt")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    return str(path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _process_cpu_s(pid: int) -> dict:
    """CPU seconds per thread of the server process and, per child process, of all its threads."""
    return {"threads": thread_cpu_s(pid),
            "children": {child: sum((thread_cpu_s(child) or {}).values()) for child in child_pids(pid)}}


def _server_cpu(pid: int, before: dict, after: dict, num_tokens: int) -> dict | None:
    """The server's CPU time over the timed runs: its main thread (the asyncio event loop: HTTP, SSE, JSON,
    detokenizing), its other threads (with --no-engine-process the engine thread and torch's; else the reader
    of the engine process's messages) and the engine process (every thread). Without an engine process the
    event loop's Python work and the engine thread's share one GIL and do not run at the same time, so the
    loop's share is host overhead the offline engine does not pay (except where it overlaps GPU waits)."""
    threads_before, threads_after = before["threads"], after["threads"]
    if threads_before is None or threads_after is None:
        return None
    loop = threads_after.get(pid, 0.0) - threads_before.get(pid, 0.0)
    other = sum(v - threads_before.get(t, 0.0) for t, v in threads_after.items() if t != pid)
    children = after["children"]
    engine = sum(v - before["children"].get(c, 0.0) for c, v in children.items()) if children else None
    return {"event_loop_cpu_s": loop, "other_threads_cpu_s": other, "engine_process_cpu_s": engine,
            "event_loop_cpu_us_per_output_token": 1e6 * loop / max(num_tokens, 1)}


ENGINE_COUNTS = ("num_steps", "num_decode_windows", "num_batched_tokens")
PHASES = ("schedule", "execute", "update")  # engine.stats()["time_s"]; execute holds the decode windows' launch + wait


def _engine_part(stats: dict) -> dict:
    """The engine's cumulative step counts and phase seconds (what both sides can report the same way)."""
    return {**{k: stats.get(k, 0) for k in ENGINE_COUNTS}, "time_s": dict(stats.get("time_s") or {})}


def _engine_delta(before: dict, after: dict) -> dict:
    """One timed run's share of the engine's totals: steps, windows, tokens, seconds per phase."""
    delta = {k: after[k] - before[k] for k in ENGINE_COUNTS}
    delta["time_s"] = {phase: after["time_s"][phase] - before["time_s"].get(phase, 0.0) for phase in after["time_s"]}
    return delta


def _server_totals(url: str, settle_s: float = 0.15, timeout_s: float = 5.0) -> tuple[float, float, dict]:
    """From the server's /metrics, once the engine is idle and two scrapes settle_s apart agree (its statistics
    reach the HTTP process as a snapshot every 50 ms): the fms:time_to_first_token_seconds histogram's sum and
    count over every label set, and the engine's totals as _engine_part gives them (fms:engine_*)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    names = {f"fms:engine_{k[4:]}_total": k for k in ENGINE_COUNTS}  # num_steps -> fms:engine_steps_total

    def scrape() -> tuple[tuple[float, float, dict], float]:
        with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
            text = r.read().decode()
        ttft_sum = ttft_count = running = 0.0
        totals = {**{k: 0 for k in ENGINE_COUNTS}, "time_s": {}}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in names:
                    totals[names[sample.name]] += int(sample.value)
                elif sample.name == "fms:engine_time_seconds_total":
                    phase = sample.labels["phase"]
                    totals["time_s"][phase] = totals["time_s"].get(phase, 0.0) + sample.value
                elif sample.name == "fms:num_requests_running":
                    running += sample.value
                elif sample.name == "fms:time_to_first_token_seconds_sum":
                    ttft_sum += sample.value
                elif sample.name == "fms:time_to_first_token_seconds_count":
                    ttft_count += sample.value
        return (ttft_sum, ttft_count, totals), running

    deadline = time.monotonic() + timeout_s
    last, _ = scrape()
    while time.monotonic() < deadline:
        time.sleep(settle_s)
        current, running = scrape()
        if current == last and running == 0:
            return current
        last = current
    return last


def run_server(config: "ServerVsOfflineConfig", workloads, warmup) -> dict:
    """`fms serve` in a child process, driven by the bench client: one timed run per workload, after the warm-up."""
    import urllib.request

    port = config.port or _free_port()
    flags, _ = _engine_args(config)
    command = [sys.executable, "-m", "fms.entrypoints.cli", "serve", *flags, "--port", str(port),
               "--max-waiting", str(max(1024, *map(len, workloads))), "--log-level", "warning"]
    if config.engine_process is not None:
        command.append("--engine-process" if config.engine_process else "--no-engine-process")
    trace_path = _trace_path(config, "server")
    env = {**os.environ, "PYTHONPATH": str(PACKAGE_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           step_trace.ENV: trace_path}
    proc = subprocess.Popen(command, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + config.server_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"fms serve exited with {proc.returncode} before it was ready")
            if time.monotonic() > deadline:
                raise RuntimeError(f"fms serve was not ready after {config.server_timeout} s")
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        with urllib.request.urlopen(url + "/v1/models", timeout=10) as r:
            model = json.loads(r.read())["data"][0]["id"]
        runs, engine_ttft_ms, engine_runs, windows = [], [], [], []
        cpu = {}

        async def client():  # one event loop and, unless fresh_connections, one session for every run
            async with new_session() as shared:
                session = None if config.fresh_connections else shared
                await run_load(url, model, warmup, float("inf"), None, config.seed, progress=False, session=session)
                cpu["before"] = _process_cpu_s(proc.pid)
                for requests in workloads:
                    ttft_sum, ttft_count, engine_before = _server_totals(url)  # blocking: nothing else is running
                    if session is not None:  # open before the clock starts (uvicorn drops idle ones after 5 s)
                        await open_connections(session, url, len(requests))
                    await asyncio.sleep(config.idle_before_run_s)
                    window = {}
                    with frozen_heap():  # the client's collections must not pause its burst (fms.entrypoints.heap)
                        runs.append(await run_load(url, model, requests, float("inf"), None, config.seed,
                                                   progress=False, window=window, session=session))
                    windows.append((window["start"], window["end"]))
                    ttft_sum_after, ttft_count_after, engine_after = _server_totals(url)
                    engine_runs.append(_engine_delta(engine_before, engine_after))
                    count = ttft_count_after - ttft_count
                    engine_ttft_ms.append(1e3 * (ttft_sum_after - ttft_sum) / count if count else None)

        asyncio.run(client())
        cpu_before, cpu_after = cpu["before"], _process_cpu_s(proc.pid)
        summaries = [summarize(r, d) for r, d in runs]  # per timed run
        summary = dict(min(summaries, key=lambda s: s["duration_s"]))
        num_tokens = sum(sum(r.output_len for r in results_) for results_, _ in runs)
        summary["server_cpu"] = _server_cpu(proc.pid, cpu_before, cpu_after, num_tokens)
        summary["durations_s"] = [d for _, d in runs]
        summary["output_throughput_per_run"] = [s["output_throughput"] for s in summaries]
        # where the first token's wait is spent: the client's mean TTFT (from sending) against the engine's
        # (fms:time_to_first_token_seconds, from the request's arrival at the engine), per timed run
        summary["client_mean_ttft_ms"] = [s["mean_ttft_ms"] for s in summaries]
        # when the server had admitted each request (its response headers came), from the run's start: the burst's
        # admission spread, which the offline engine (every request at t=0) does not pay
        summary["admitted_ms_per_run"] = [{k: s[k] for k in ("p50_admitted_ms", "max_admitted_ms")}
                                          for s in summaries]
        summary["engine_mean_ttft_ms"] = engine_ttft_ms
        # the engine's steps and phase seconds per timed run, as the offline side records them (engine_per_run)
        summary["engine_per_run"] = engine_runs
        events = step_trace.read(trace_path)  # the engine flushes each line as it writes it
        summary["timeline_per_run"] = [step_trace.summarize(events, start, end) for start, end in windows]
        summary["server_command"] = " ".join(shlex.quote(c) for c in command)
        return summary
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()


def run_server_vs_offline(config: ServerVsOfflineConfig) -> dict:
    """Both sides on one workload; prints a summary, writes config.output and returns the report."""
    from fms.models import get_config

    if config.model:
        vocab_size = json.loads((Path(config.model) / "config.json").read_text())["vocab_size"]
    else:
        vocab_size = get_config(config.architecture, config.variant).vocab_size
    seeds = [config.seed + (1 + r if r and config.fresh_prompts else 0) for r in range(config.repeats)]
    workloads = [workload(config.num_prompts, config.prompt_range, config.output_len, vocab_size, seed)
                 for seed in seeds]
    warmup = workload(config.warmup_prompts, config.prompt_range, min(config.output_len, 32), vocab_size, config.seed + 1)
    offline = run_offline(config, workloads, warmup)
    print(f"offline engine: {offline['output_throughput']:.1f} output tok/s (fastest run)", flush=True)
    server = run_server(config, workloads, warmup)
    print(f"server:         {server['output_throughput']:.1f} output tok/s (fastest run; "
          f"{server['completed']} completed, {server['failed']} failed)", flush=True)
    per_run = [s / o for s, o in zip(server["output_throughput_per_run"], offline["output_throughput_per_run"])]
    fastest = server["output_throughput"] / offline["output_throughput"]
    ratio = statistics.median(per_run) if config.fresh_prompts else fastest
    report = {
        "command": config.command,
        "commit": _commit(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "model": config.model or f"{config.architecture}/{config.variant} (random weights)",
        "workload": {"num_prompts": config.num_prompts, "prompt_range": config.prompt_range,
                     "output_len": config.output_len, "seed": config.seed, "arrivals": "all at t=0",
                     "fresh_prompts": config.fresh_prompts, "seeds_per_run": seeds,
                     "client_connections": "fresh per run" if config.fresh_connections
                     else "opened before each timed run", "idle_before_run_s": config.idle_before_run_s},
        "offline": offline, "server": server, "server_over_offline": ratio,
        "ratio_method": "median over runs of server / offline on the same prompts" if config.fresh_prompts
        else "fastest server run / fastest offline run (every run the same prompts)",
        "server_over_offline_per_run": per_run, "fastest_over_fastest": fastest,
        "target": TARGET_RATIO, "meets_target": ratio >= TARGET_RATIO,
    }
    print(f"server / offline = {ratio:.3f} (target >= {TARGET_RATIO}; {report['ratio_method']}); per run "
          + ", ".join(f"{r:.3f}" for r in per_run) + f"; fastest / fastest {fastest:.3f}")
    print("mean TTFT per timed run, client / engine (ms): " + ", ".join(
        f"{c:.0f} / {e:.0f}" if e is not None else f"{c:.0f} / -"
        for c, e in zip(server["client_mean_ttft_ms"], server["engine_mean_ttft_ms"])))
    print("requests admitted (response headers) per timed run, p50 / last (ms from the run's start): " + ", ".join(
        f"{a['p50_admitted_ms']:.0f} / {a['max_admitted_ms']:.0f}" for a in server["admitted_ms_per_run"]))
    for side in ("offline", "server"):
        print(f"engine per timed run, {side}: " + ", ".join(
            f"{r['num_steps']} steps, " + " / ".join(f"{r['time_s'].get(p, 0.0):.3f}" for p in PHASES) + " s"
            for r in report[side]["engine_per_run"]) + f" ({' / '.join(PHASES)})")
    for side in ("offline", "server"):
        print(f"timeline per timed run, {side} (ms from the run's start): " + "; ".join(
            (f"adds {t['first_add_ms']:.0f}-{t['last_add_ms']:.0f}, " if t["num_adds"] else "")
            + f"steps {t['first_step_start_ms']:.0f}-{t['last_step_end_ms']:.0f} (busy {t['busy_ms']:.0f}, idle "
            f"{t['idle_between_steps_ms']:.0f}), tail {t['tail_ms']:.0f}" for t in report[side]["timeline_per_run"]))
    if server.get("server_cpu"):
        cpu = server["server_cpu"]
        engine_s = cpu["engine_process_cpu_s"]
        engine = "" if engine_s is None else f"; engine process {engine_s:.2f} CPU s"
        print(f"server event loop: {cpu['event_loop_cpu_s']:.2f} CPU s ({cpu['event_loop_cpu_us_per_output_token']:.0f} "
              f"us per output token); other threads {cpu['other_threads_cpu_s']:.2f} CPU s{engine}")
    config.output.parent.mkdir(parents=True, exist_ok=True)
    config.output.write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {config.output}")
    return report
