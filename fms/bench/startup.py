"""Engine start-up by phase, cold and warm, each in a fresh process (`fms bench startup`, issue 19).

For each model the parent starts this module twice as a child process (`python -m fms.bench.startup
--child SPEC`): "cold" with fresh, empty TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR, then "warm"
with the same folders, which now hold the first child's FX-graph, AOT-autograd and Triton caches.
The child times its phases and prints its record as one JSON line after each phase starts and ends,
so a child killed at its timeout still reports every phase it finished and the one it was in:

    parent ── cold child (empty caches) ──► {"phases_s": {...}, "running": ...}  (last line kept)
           └─ warm child (same caches)  ──► {"phases_s": {...}, "running": ...}

Module top level imports only the standard library and fms.bench.tables: the child times its own
imports of torch and fms.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import math
import os
import random
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fms.bench.tables import markdown_table

DEFAULT_MODELS = {
    "cuda": ("llama:3.2-1b", "llama:3.1-8b", "granite_hybrid:4.0-h-1b"),
    "cpu": ("llama:micro",),
}
RUNS = ("cold", "warm")
# the child's phases, in order; each record's phases_s holds the finished ones
PHASES = ("process_start", "import", "get_model", "engine", "first_generate")
PHASE_LABELS = {"process_start": "process start (interpreter)", "import": "import torch + fms",
                "get_model": "get_model (random weights)", "engine": "LLMEngine(model)",
                "first_generate": "first generate()"}
CACHE_ENV = {"TORCHINDUCTOR_CACHE_DIR": "inductor", "TRITON_CACHE_DIR": "triton"}  # variable -> folder name
# the other variables that change what a warm start finds; the child reports those that are set
REPORTED_ENV = (*CACHE_ENV, "TORCHINDUCTOR_FX_GRAPH_CACHE", "TORCHINDUCTOR_AUTOGRAD_CACHE",
                "TORCHINDUCTOR_FORCE_DISABLE_CACHES", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS")
RECORD_PREFIX = "FMS_STARTUP "  # marks the child's record lines among anything else on its stdout
STACK_SIGNAL = signal.SIGUSR1  # at its timeout the child is asked where it is, then killed
STACK_WAIT_S = 5.0
GB = 1e9


@dataclass(frozen=True)
class StartupTarget:
    """A bound from issue 19: the phases' sum in one run of one model on one device type is at most limit_s."""

    model: str
    run: str
    phases: tuple[str, ...]
    limit_s: float
    device_type: str = "cuda"


TARGETS = (
    StartupTarget("llama:3.1-8b", "cold", ("get_model",), 10.0),
    StartupTarget("llama:3.1-8b", "warm", ("get_model",), 10.0),
    StartupTarget("llama:3.1-8b", "cold", ("engine",), 45.0),
    StartupTarget("llama:3.1-8b", "warm", ("engine",), 15.0),
    StartupTarget("granite_hybrid:4.0-h-1b", "cold", ("get_model", "engine"), 30.0),
)


def parse_model(spec: str) -> tuple[str, str]:
    """("llama", "3.1-8b") from "llama:3.1-8b"."""
    architecture, sep, variant = str(spec).partition(":")
    if not sep or not architecture or not variant:
        raise ValueError(f"models: {spec!r} is not ARCHITECTURE:VARIANT (e.g. llama:3.2-1b, granite_hybrid:4.0-h-1b)")
    return architecture, variant


@dataclass
class StartupBenchConfig:
    """One start-up benchmark. None fields take the device's default; engine_options are EngineConfig fields."""

    models: tuple[str, ...] | None = None  # ARCHITECTURE:VARIANT; default DEFAULT_MODELS[device type]
    device: str | None = None  # default: cuda when available
    dtype: str | None = None  # default: get_model's (bf16 on CUDA, fp32 on CPU)
    seed: int = 0
    engine_options: dict = field(default_factory=dict)
    timeout_s: float = 600.0  # per child process
    prompt_len: int = 16  # the first generate(): one request of this many tokens ...
    max_tokens: int = 8  # ... and this many new ones
    runs: tuple[str, ...] = RUNS  # ("warm",) alone measures on the folders an earlier cold run filled in cache_dir
    cache_dir: Path | None = None  # kept compile caches, a folder per model; default: temporary ones, removed
    output: Path = Path("results/startup.json")
    command: str = "fms bench startup"

    def __post_init__(self):
        import torch

        from fms.models import get_config, resolve_dtype
        from fms.serving.config import EngineConfig

        if self.device is None:
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            device_type = torch.device(self.device).type
        except RuntimeError:
            device_type = None
        if device_type not in DEFAULT_MODELS:
            raise ValueError(f"device must be cuda or cpu (optionally cuda:N), got {self.device!r}")
        if device_type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} asked for, but torch finds no CUDA device; use --device cpu")
        self.models = tuple(DEFAULT_MODELS[device_type] if self.models is None else self.models)
        if not self.models:
            raise ValueError("models must name at least one ARCHITECTURE:VARIANT, got none")
        repeated = sorted({m for m in self.models if self.models.count(m) > 1})
        if repeated:
            raise ValueError(f"models: {repeated} given more than once")
        for spec in self.models:
            architecture, variant = parse_model(spec)
            try:
                get_config(architecture, variant)
            except ValueError as exc:  # an unknown architecture or variant, with the allowed ones
                raise ValueError(f"models: {spec!r}: {exc}") from None
        resolve_dtype(self.dtype)  # names the allowed dtypes
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        if isinstance(self.timeout_s, bool) or not isinstance(self.timeout_s, (int, float)) \
                or not math.isfinite(self.timeout_s) or self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be a number of seconds > 0, got {self.timeout_s!r}")
        for name in ("prompt_len", "max_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.runs = tuple(self.runs)
        if self.runs not in (RUNS, RUNS[:1], RUNS[1:]):
            raise ValueError(f"runs must be cold, warm or cold,warm (in that order), got {','.join(self.runs)!r}")
        if self.runs == ("warm",) and self.cache_dir is None:
            raise ValueError("runs=warm alone needs cache_dir: the folder an earlier cold run of the same models "
                             "filled (without it the caches start empty, which is a cold run)")
        self.cache_dir = None if self.cache_dir is None else Path(self.cache_dir).absolute()  # the children's env
        if not isinstance(self.engine_options, dict):
            raise ValueError(f"engine_options must be a dict of EngineConfig fields, got {self.engine_options!r}")
        try:
            EngineConfig.from_kwargs(**self.engine_options)
        except TypeError as exc:  # an unknown option name
            raise ValueError(str(exc)) from None
        self.output = Path(self.output)

    def model_cache_dirs(self, model: str, root: Path | None = None) -> dict[str, str]:
        """{TORCHINDUCTOR_CACHE_DIR: folder, TRITON_CACHE_DIR: folder} of one model, under root or cache_dir."""
        base = root if root is not None else self.cache_dir / model.replace(":", "-")
        return {name: str(base / folder) for name, folder in CACHE_ENV.items()}

    def check_cache_dir(self) -> None:
        """A kept cache folder must be empty for a cold run and hold files for a warm run alone."""
        if self.cache_dir is None:
            return
        for model in self.models:
            for folder in self.model_cache_dirs(model).values():
                count = _count_files(folder) or 0
                if "cold" in self.runs and count:
                    raise ValueError(f"a cold run needs empty compile caches, but {folder} holds {count} files; "
                                     f"remove it or give another cache_dir")
                if self.runs == ("warm",) and not count and folder.endswith(CACHE_ENV["TORCHINDUCTOR_CACHE_DIR"]):
                    raise ValueError(f"runs=warm alone needs the caches of a cold run, but {folder} holds no "
                                     f"files; run cold with the same cache_dir first")


# -- the child process ----------------------------------------------------------------------------------
def _count_files(folder: str | None) -> int | None:
    if not folder or not os.path.isdir(folder):
        return None
    return sum(len(files) for _, _, files in os.walk(folder))


def _emit(record: dict) -> None:
    print(RECORD_PREFIX + json.dumps(record), flush=True)


class _Phases:
    """Times phases into record["phases_s"]; prints the record when a phase starts and when it ends."""

    def __init__(self, record: dict):
        self.record = record

    def start(self, name: str) -> float:
        self.record["running"] = name
        _emit(self.record)
        return time.perf_counter()

    def done(self, name: str, start: float, end: float | None = None) -> None:
        self.record["phases_s"][f"{name}_s"] = (time.perf_counter() if end is None else end) - start
        self.record["running"] = None
        _emit(self.record)


def _compile_cache_counters() -> dict:
    """Inductor's and AOT-autograd's cache hit / miss counters: what a warm start found."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return {}
    return {f"{group}.{name}": count for group in ("inductor", "aot_autograd")
            for name, count in counters[group].items() if "cache" in name}


def _child(spec: dict) -> int:
    entry = time.time()  # first, so that process_start is the interpreter's own start-up
    stack_file = open(spec["stack_file"], "w")  # noqa: SIM115 - open until the process ends
    faulthandler.register(STACK_SIGNAL, file=stack_file, all_threads=True)
    record = {"run": spec["run"], "model": spec["model"], "pid": os.getpid(),
              "env": {k: os.environ[k] for k in REPORTED_ENV if k in os.environ},
              "cache_files_at_start": {k: _count_files(os.environ.get(k)) for k in CACHE_ENV},
              "phases_s": {}, "running": None, "done": False}
    phases = _Phases(record)
    phases.done("process_start", spec["spawn_time"], entry)

    start = phases.start("import")
    import torch

    from fms.bench.timing import peak_memory_gb
    from fms.bench.timing import synchronize as synchronize_device
    from fms.models import get_model
    from fms.serving import EngineConfig, LLMEngine, SamplingParams
    phases.done("import", start)

    device = torch.device(spec["device"])

    def synchronize():
        synchronize_device(device)

    def peak_memory():
        if device.type == "cuda":
            allocated, reserved = peak_memory_gb(device)
            record["peak_gpu_memory_gb"] = {"allocated": allocated, "reserved": reserved}
        record["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB  # Linux: KiB

    architecture, variant = parse_model(spec["model"])
    start = phases.start("get_model")
    model = get_model(architecture, variant, device_type=device.type, data_type=spec["dtype"], seed=spec["seed"],
                      init_on_device=True)
    synchronize()
    peak_memory()
    record["device_name"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    phases.done("get_model", start)

    start = phases.start("engine")
    engine = LLMEngine(model, config=EngineConfig(**spec["engine_options"]))
    synchronize()
    record["engine_phases_s"] = dict(engine.startup_s)
    record["graph_capture_s"] = {f"{bs}/{mode}": s for (bs, mode), s in engine.runner.decoder.capture_s.items()}
    record["engine_config"] = asdict(engine.config)
    record["compile_cache_counters"] = _compile_cache_counters()
    peak_memory()
    phases.done("engine", start)

    prompt = random.Random(spec["seed"]).choices(range(model.config.vocab_size), k=spec["prompt_len"])
    start = phases.start("first_generate")
    outputs = engine.generate([prompt], SamplingParams(max_tokens=spec["max_tokens"], ignore_eos=True),
                              use_tqdm=False)
    synchronize()
    record["num_output_tokens"] = len(outputs[0].token_ids)
    record["compile_cache_counters"] = _compile_cache_counters()
    peak_memory()
    record["done"] = True
    phases.done("first_generate", start)
    return 0


# -- the parent -------------------------------------------------------------------------------------------
def _child_spec(config: StartupBenchConfig, model: str, run: str) -> dict:
    return {"model": model, "run": run, "device": config.device, "dtype": config.dtype, "seed": config.seed,
            "engine_options": config.engine_options, "prompt_len": config.prompt_len,
            "max_tokens": config.max_tokens}


_FRAME = re.compile(r'File "(?P<path>.+)", line (?P<line>\d+) in (?P<func>.+)')


def _stack_at_timeout(dump: str) -> list[str]:
    """From faulthandler's dump: the main thread's fms frames, outermost first, then its 3 innermost frames."""
    threads = [block for block in dump.split("\n\n") if "fms/bench/startup.py" in block]
    frames = [m for m in map(_FRAME.search, threads[0].splitlines() if threads else []) if m]
    frames.reverse()  # faulthandler lists the most recent call first

    def short(m) -> str:
        path = m["path"]
        for anchor, keep in (("/fms/", "fms/"), ("site-packages/", "")):
            if anchor in path:
                path = keep + path.split(anchor)[-1]
                break
        return f"{path}:{m['line']} {m['func']}"

    return [short(m) for m in frames[:-3] if "/fms/" in m["path"]] + [short(m) for m in frames[-3:]]


def _last_record(stdout: str) -> dict | None:
    lines = [line[len(RECORD_PREFIX):] for line in stdout.splitlines() if line.startswith(RECORD_PREFIX)]
    return json.loads(lines[-1]) if lines else None


def run_child(config: StartupBenchConfig, model: str, run: str, cache_dirs: dict[str, str], workdir: Path) -> dict:
    """One fresh process: its last record, how it ended (ok / timed_out / failed) and its wall time."""
    import fms

    env = {**os.environ, **cache_dirs}
    repo = str(Path(fms.__file__).resolve().parents[1])  # the child imports this checkout of fms
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p)
    out_path, err_path, stack_path = (workdir / f"{run}.{kind}" for kind in ("stdout", "stderr", "stack"))
    spawn = time.time()
    with out_path.open("w") as out, err_path.open("w") as err:
        spec = json.dumps({**_child_spec(config, model, run), "spawn_time": spawn, "stack_file": str(stack_path)})
        # a session of its own, so that a timeout ends the child and any compile workers it started
        proc = subprocess.Popen([sys.executable, "-m", "fms.bench.startup", "--child", spec], stdout=out,
                                stderr=err, env=env, start_new_session=True)
        try:
            returncode = proc.wait(timeout=config.timeout_s)
            status = "ok" if returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            proc.send_signal(STACK_SIGNAL)  # faulthandler writes where each thread is, even inside C code
            deadline = time.time() + STACK_WAIT_S
            while time.time() < deadline and proc.poll() is None and not _has_dump(stack_path):
                time.sleep(0.05)
            os.killpg(proc.pid, signal.SIGKILL)
            returncode = proc.wait()
            status = "timed_out"
    wall_s = time.time() - spawn
    record = _last_record(out_path.read_text()) or {"phases_s": {}, "running": "process_start"}
    if status == "ok" and not record.get("done"):
        status = "failed"
    result = {"status": status, "returncode": returncode, "wall_s": wall_s, **record,
              "total_s": sum(record["phases_s"].values()),
              "cache_files_after": {k: _count_files(v) for k, v in cache_dirs.items()}}
    if status == "timed_out":
        result["stack_at_timeout"] = _stack_at_timeout(stack_path.read_text() if stack_path.exists() else "")
    if status != "ok":
        result["stderr_tail"] = err_path.read_text()[-3000:]
    return result


def _has_dump(path: Path) -> bool:
    return path.exists() and path.stat().st_size > 0


def check_targets(model: str, device_type: str, runs: dict) -> list[dict]:
    """Each of TARGETS that applies to this model and device, measured against its runs."""
    checks = []
    for target in TARGETS:
        if target.model != model or target.device_type != device_type:
            continue
        phases_s = runs.get(target.run, {}).get("phases_s", {})
        reached = all(f"{p}_s" in phases_s for p in target.phases)
        measured = sum(phases_s[f"{p}_s"] for p in target.phases) if reached else None
        checks.append({**asdict(target), "measured_s": measured,
                       "met": None if measured is None else measured <= target.limit_s})
    return checks


def startup_table(rows: list[dict]) -> str:
    """Model x phase, a column per run (seconds; '-' where a run did not reach the phase)."""
    table = []
    for row in rows:
        runs = row["runs"]

        def cells(get):
            return [get(runs.get(run, {})) for run in RUNS]

        table.append([row["model"], "status", *cells(_status)])
        for phase in PHASES:
            table.append(["", PHASE_LABELS[phase], *cells(lambda r: r.get("phases_s", {}).get(f"{phase}_s"))])
            if phase == "engine":
                names = list(dict.fromkeys(n for r in runs.values() for n in r.get("engine_phases_s", {})))
                for name in names:
                    table.append(["", f"  {name}", *cells(lambda r: r.get("engine_phases_s", {}).get(name))])
        table.append(["", "total", *cells(lambda r: r.get("total_s"))])
        if any("peak_gpu_memory_gb" in r for r in runs.values()):
            table.append(["", "peak GPU GB (allocated)",
                          *cells(lambda r: r.get("peak_gpu_memory_gb", {}).get("allocated"))])
        table.append(["", "compile-cache files found", *cells(lambda r: _files_found(r))])
    return markdown_table(["model", "phase", *(f"{run} s" for run in RUNS)], table)


def _status(run: dict):
    running = run.get("running")
    return f"{run['status']} in {PHASE_LABELS[running]}" if running and "status" in run else run.get("status")


def _files_found(run: dict):
    counts = [c for c in run.get("cache_files_at_start", {}).values() if c is not None]
    return sum(counts) if counts else None


def target_lines(rows: list[dict]) -> list[str]:
    lines = []
    for row in rows:
        for check in row["targets"]:
            what = " + ".join(check["phases"])
            verdict = {True: "met", False: "NOT met", None: "not measured"}[check["met"]]
            measured = "-" if check["measured_s"] is None else f"{check['measured_s']:.1f} s"
            lines.append(f"{row['model']} {check['run']} {what}: {measured} (target <= {check['limit_s']:g} s): "
                         f"{verdict}")
    return lines


def run_startup_benchmark(config: StartupBenchConfig) -> dict:
    """Cold then warm start of each model in fresh processes; writes config.output after every run."""
    import torch

    from fms.bench.results import git_commit, run_metadata, write_json

    device = torch.device(config.device)
    if device.type == "cpu":
        print("CPU run: a demo that checks the start-up benchmark end to end; the issue's targets are for CUDA.")
    # the full metadata comes last: asking for the GPU's name would hold a CUDA context (and its memory)
    # in this process while the children start
    results = {
        "metadata": {"command": config.command, "git_commit": git_commit(Path(__file__).resolve().parent),
                     "complete": False},
        "config": {k: v for k, v in asdict(config).items() if k not in ("output", "command")},
        "default_engine": not config.engine_options,  # the targets are about the default (compiled) engine
        "phases": list(PHASES),
        "targets": [asdict(t) for t in TARGETS],
        "models": [],
    }
    config.check_cache_dir()
    for model in config.models:
        with contextlib.ExitStack() as stack:
            if config.cache_dir is None:
                root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fms-startup-")))
                cache_dirs = config.model_cache_dirs(model, root)
            else:
                cache_dirs = config.model_cache_dirs(model)
                root = Path(cache_dirs["TORCHINDUCTOR_CACHE_DIR"]).parent
            for folder in cache_dirs.values():
                os.makedirs(folder, exist_ok=True)
            row = {"model": model, "cache_dirs": cache_dirs, "runs": {}, "targets": []}
            results["models"].append(row)
            for run in config.runs:
                cold = row["runs"].get("cold")
                if run == "warm" and cold is not None and cold["status"] != "ok":
                    row["runs"]["warm"] = {"status": "skipped", "reason": f"the cold run {cold['status']}"}
                else:
                    print(f"{model}: {run} start ...", flush=True)
                    row["runs"][run] = result = run_child(config, model, run, cache_dirs, root)
                    print(f"{model}: {run} {result['status']} after {result['wall_s']:.1f} s"
                          + (f" (in {result['running']})" if result.get("running") else ""), flush=True)
                row["targets"] = check_targets(model, device.type, row["runs"])
                write_json(config.output, results)  # after every run: a later timeout loses nothing
    results["metadata"] = {**run_metadata(config.command, device), "complete": True}
    write_json(config.output, results)
    print(startup_table(results["models"]))
    for line in target_lines(results["models"]):
        print(line)
    print(f"wrote {config.output}")
    return results


def _main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "--child":
        print("usage: python -m fms.bench.startup --child SPEC_JSON (started by `fms bench startup`)",
              file=sys.stderr)
        return 2
    return _child(json.loads(argv[1]))


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
