"""Engine start-up by phase, cold and warm, each in a fresh process (`fms bench startup`, issue 19).

For each model the parent starts this module twice as a child process (`python -m fms.bench.startup
--child SPEC`): "cold" with fresh, empty TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR, then "warm"
with the same folders, which now hold the first child's FX-graph, AOT-autograd and Triton caches.
The child times its phases and prints its record as one JSON line after each phase starts and ends,
so a child killed at its timeout still reports every phase it finished and the one it was in:

    parent ── cold child (empty caches) ──► {"phases_s": {...}, "running": ...}  (last line kept)
           └─ warm child (same caches)  ──► {"phases_s": {...}, "running": ...}

With checkpoint=True (`--checkpoint`) the children time get_model("hf_pretrained") on a HF checkpoint of the
model's shape instead of drawing random weights. A writer process (`--write-checkpoint SPEC`, untimed, so
that the parent never holds a CUDA context) writes it once per model before the runs: the same random
weights the random mode draws, as config.json + safetensors shards named and cut as HF writes them. Before
the cold child the parent asks the kernel to drop the files from its page cache (no root needed; advisory)
and, before each child, measures how much of them is cached, so that each record says whether its load
read the disk or memory.

Module top level imports only the standard library and torch-free fms.bench modules: the child times its own
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
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fms.bench.processes import run_in_session
from fms.bench.recompiles import RecompileLog
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
CHECKPOINT_LABEL = "get_model (checkpoint load)"  # the get_model phase's label with checkpoint=True
CACHE_ENV = {"TORCHINDUCTOR_CACHE_DIR": "inductor", "TRITON_CACHE_DIR": "triton"}  # variable -> folder name
# the other variables that change what a warm start finds; the child reports those that are set
REPORTED_ENV = (*CACHE_ENV, "TORCHINDUCTOR_FX_GRAPH_CACHE", "TORCHINDUCTOR_AUTOGRAD_CACHE",
                "TORCHINDUCTOR_FORCE_DISABLE_CACHES", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS")
RECORD_PREFIX = "FMS_STARTUP "  # marks the child's record lines among anything else on its stdout
STACK_SIGNAL = signal.SIGUSR1  # at its timeout the child is asked where it is, then killed
STACK_WAIT_S = 5.0
GB = 1e9
CHECKPOINT_MARKER = "fms-startup-checkpoint.json"  # written last: what the folder holds (model, dtype, seed, files)
MAX_SHARD_BYTES = 5 * 10**9  # transformers' save_pretrained default max_shard_size for years ("5GB")
PAGE_CACHE_NOTE = (
    "checkpoint mode: before the cold child the parent fsyncs the checkpoint's files and asks the kernel to drop "
    "them from the page cache (posix_fadvise DONTNEED, no root needed; advisory: tmpfs or pages mapped by another "
    "process stay), so the cold load reads the disk where that worked; the warm child finds the files the cold "
    "child read still cached. checkpoint_page_cache.resident_fraction_at_start in each run says which it was "
    "(measured with mincore just before the child started; null where it could not be measured)."
)


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
    checkpoint: bool = False  # time get_model("hf_pretrained") on a checkpoint written before the runs
    checkpoint_dir: Path | None = None  # keep the checkpoints, a folder per model; default: temporary ones, removed
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
        if not isinstance(self.checkpoint, bool):
            raise ValueError(f"checkpoint must be a bool, got {self.checkpoint!r}")
        if self.checkpoint_dir is not None:
            if not self.checkpoint:
                raise ValueError(f"checkpoint_dir ({self.checkpoint_dir}) is where checkpoint mode keeps its "
                                 "checkpoints; give checkpoint=True (--checkpoint) with it")
            self.checkpoint_dir = Path(self.checkpoint_dir).absolute()
            if self.checkpoint_dir.exists() and not self.checkpoint_dir.is_dir():
                raise ValueError(f"checkpoint_dir {self.checkpoint_dir} is a file; give a folder (created if absent)")
            for model in self.models:
                self.kept_checkpoint(model)  # a model's folder holding anything else is refused here
        if not isinstance(self.engine_options, dict):
            raise ValueError(f"engine_options must be a dict of EngineConfig fields, got {self.engine_options!r}")
        try:
            EngineConfig.from_kwargs(**self.engine_options)
        except TypeError as exc:  # an unknown option name
            raise ValueError(str(exc)) from None
        self.output = Path(self.output)

    @property
    def checkpoint_dtype(self) -> str:
        """The dtype the checkpoint is written in and loaded as: get_model's default where dtype is None."""
        import torch

        from fms.models import resolve_dtype

        default = torch.bfloat16 if torch.device(self.device).type == "cuda" else torch.float32
        return str(resolve_dtype(self.dtype) or default).removeprefix("torch.")

    def checkpoint_folder(self, model: str) -> Path:
        return self.checkpoint_dir / model.replace(":", "-")

    def kept_checkpoint(self, model: str) -> dict | None:
        """What an earlier run left in checkpoint_dir for this model (reused: not written again), or None where
        its folder is absent or empty. A folder holding anything else is refused, never overwritten."""
        folder = self.checkpoint_folder(model)
        if not folder.exists():
            return None
        if not folder.is_dir():
            raise ValueError(f"checkpoint_dir: {folder} is a file; the checkpoint of {model} needs a folder there")
        if not any(folder.iterdir()):
            return None
        wanted = {"model": model, "dtype": self.checkpoint_dtype, "seed": self.seed}
        try:
            kept = json.loads((folder / CHECKPOINT_MARKER).read_text())
        except (OSError, ValueError):
            kept = None
        if not isinstance(kept, dict) or {k: kept.get(k) for k in wanted} != wanted:
            found = "no " + CHECKPOINT_MARKER if not isinstance(kept, dict) else \
                ", ".join(f"{k}={kept.get(k)!r}" for k in wanted)
            raise ValueError(f"checkpoint_dir: {folder} holds files, but not the checkpoint this benchmark writes "
                             f"for {model} (dtype {wanted['dtype']}, seed {self.seed}; found {found}); remove "
                             "the folder or give another checkpoint_dir")
        changed = sorted(name for name, size in kept.get("files", {}).items()
                         if not (folder / name).is_file() or (folder / name).stat().st_size != size)
        if changed or not kept.get("files"):
            raise ValueError(f"checkpoint_dir: the checkpoint in {folder} is incomplete: {changed or 'no files'} "
                             "missing or changed since it was written; remove the folder")
        return kept

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


# -- the checkpoint and the page cache -------------------------------------------------------------------
def write_hf_checkpoint(model, architecture: str, folder: Path, max_shard_bytes: int = MAX_SHARD_BYTES) -> dict:
    """model's weights as a HF checkpoint in folder: config.json, then the tensors under HF's names (each
    parameter cut by our checkpoint rules, the inverse of loading) in safetensors files of at most
    max_shard_bytes, filled in order as save_pretrained fills them: one model.safetensors, or
    model-0000i-of-0000n.safetensors and model.safetensors.index.json. Returns {file name: bytes}."""
    from safetensors.torch import save_file

    from fms.bench.hf_peer import hf_config_dict
    from fms.utils.serialization import hf_tensors

    tensors = hf_tensors(model, architecture)  # HF name -> a view of our parameter (a tied head once)
    shards, size = [[]], 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    folder.mkdir(parents=True, exist_ok=True)
    hf = hf_config_dict(architecture, model.config)
    hf.update(eos_token_id=model.config.eos_token_id, pad_token_id=model.config.pad_token_id,  # the peer drops them
              torch_dtype=str(next(iter(tensors.values())).dtype).removeprefix("torch."))
    (folder / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    for file, shard in zip(names, shards):
        # copies on the CPU: safetensors refuses views that share memory (q, k, v of one fused parameter)
        save_file({n: tensors[n].detach().to("cpu", copy=True) for n in shard}, str(folder / file),
                  metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": {n: file for file, shard in zip(names, shards) for n in shard}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    written = ["config.json", *names, *(["model.safetensors.index.json"] if len(shards) > 1 else [])]
    return {name: (folder / name).stat().st_size for name in written}


def safetensors_bytes(files: dict[str, int]) -> int:
    """What a load reads: the bytes of the safetensors files (headers included)."""
    return sum(size for name, size in files.items() if name.endswith(".safetensors"))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def evict_page_cache(paths: list[Path]) -> bool:
    """Ask the kernel to drop these files' pages from its page cache: fsync (dirty pages cannot be dropped),
    then POSIX_FADV_DONTNEED, which needs no root. Advisory: pages on tmpfs or mapped by a running process
    stay; page_cache_fraction says what happened. False where the call is not available or failed."""
    if not hasattr(os, "posix_fadvise"):
        return False
    try:
        for path in paths:
            _fsync(path)
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    except OSError:
        return False
    return True


def page_cache_fraction(paths: list[Path]) -> float | None:
    """Fraction of these files' pages in the OS page cache (mincore over a read-only mapping, which reads
    nothing), or None where it cannot be measured (not Linux, no libc)."""
    import ctypes
    import mmap

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long)
        libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
        libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    except (OSError, AttributeError):
        return None
    page = mmap.PAGESIZE
    low_bit = bytes(i & 1 for i in range(256))  # mincore sets bit 0 of a page's byte when it is resident
    resident = total = 0
    for path in paths:
        size = os.path.getsize(path)
        if not size:
            continue
        num_pages = (size + page - 1) // page
        vec = (ctypes.c_ubyte * num_pages)()
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                return None
            try:
                if libc.mincore(addr, size, vec) != 0:
                    return None
            finally:
                libc.munmap(addr, size)
        finally:
            os.close(fd)
        resident += bytes(vec).translate(low_bit).count(1)
        total += num_pages
    return resident / total if total else None


def _write_checkpoint_child(spec: dict) -> int:
    """The writer process: the random weights the random mode draws, written as a HF checkpoint, then fsynced;
    the marker last, so that a folder with a marker holds a whole checkpoint."""
    start = time.perf_counter()
    import torch

    from fms.bench.timing import synchronize
    from fms.models import get_model

    device = torch.device(spec["device"])
    architecture, variant = parse_model(spec["model"])
    model = get_model(architecture, variant, device_type=device.type, data_type=spec["dtype"], seed=spec["seed"],
                      init_on_device=True)
    synchronize(device)
    built = time.perf_counter()
    folder = Path(spec["folder"])
    files = write_hf_checkpoint(model, architecture, folder, spec["max_shard_bytes"])
    for name in files:
        _fsync(folder / name)  # write_s: until the files are on disk
    marker = {"model": spec["model"], "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
              "seed": spec["seed"], "files": files, "safetensors_bytes": safetensors_bytes(files),
              "build_s": built - start, "write_s": time.perf_counter() - built}
    (folder / CHECKPOINT_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    _emit(marker)
    return 0


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


def build_model(spec: dict, device):
    """The child's timed get_model: from the spec's checkpoint folder, or random weights drawn on the device."""
    from fms.models import get_model

    if spec.get("checkpoint"):
        return get_model("hf_pretrained", model_path=spec["checkpoint"]["path"], device_type=device.type,
                         data_type=spec["dtype"])
    architecture, variant = parse_model(spec["model"])
    return get_model(architecture, variant, device_type=device.type, data_type=spec["dtype"], seed=spec["seed"],
                     init_on_device=True)


def _time_weight_reads(synchronize) -> list[float]:
    """Seconds of each load_hf_checkpoint call from here on (until the device is idle), appended to the list
    returned: the part of get_model that reads the files into the model, without building it or starting CUDA."""
    from fms.utils import serialization

    seconds, load = [], serialization.load_hf_checkpoint

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return load(*args, **kwargs)
        finally:
            synchronize()
            seconds.append(time.perf_counter() - start)

    serialization.load_hf_checkpoint = timed
    return seconds


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
    from fms.models import get_model  # noqa: F401  (timed here, as an import; build_model calls it)
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

    checkpoint = spec.get("checkpoint")
    record["weights"] = "checkpoint" if checkpoint else "random"
    read_s = _time_weight_reads(synchronize) if checkpoint else None
    start = phases.start("get_model")
    model = build_model(spec, device)
    synchronize()
    end = time.perf_counter()
    if checkpoint:
        record["checkpoint_bytes"] = checkpoint["bytes"]
        record["load_gb_per_s"] = checkpoint["bytes"] / (end - start) / GB
        record["weights_read_s"] = sum(read_s)
        record["weights_read_gb_per_s"] = checkpoint["bytes"] / sum(read_s) / GB
    peak_memory()
    record["device_name"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    phases.done("get_model", start, end)

    start = phases.start("engine")
    recompiles = RecompileLog().start()  # until the first generate() has run
    engine = LLMEngine(model, config=EngineConfig(**spec["engine_options"]))
    synchronize()
    record["dynamo"] = recompiles.snapshot()
    record["engine_phases_s"] = dict(engine.startup_s)
    record["graph_capture_s"] = engine.runner.decoder.capture_times()
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
    recompiles.stop()
    record["dynamo_with_first_generate"] = recompiles.snapshot()
    record["compile_cache_counters"] = _compile_cache_counters()
    peak_memory()
    record["done"] = True
    phases.done("first_generate", start)
    return 0


# -- the parent -------------------------------------------------------------------------------------------
def _child_spec(config: StartupBenchConfig, model: str, run: str, checkpoint: dict | None = None) -> dict:
    spec = {"model": model, "run": run, "device": config.device, "dtype": config.dtype, "seed": config.seed,
            "engine_options": config.engine_options, "prompt_len": config.prompt_len, "max_tokens": config.max_tokens}
    if checkpoint is not None:
        spec["checkpoint"] = {"path": checkpoint["path"], "bytes": checkpoint["bytes"]}
    return spec


def _child_env(extra: dict[str, str]) -> dict[str, str]:
    import fms

    env = {**os.environ, **extra}
    repo = str(Path(fms.__file__).resolve().parents[1])  # the child imports this checkout of fms
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p)
    return env


def prepare_checkpoint(config: StartupBenchConfig, model: str, folder: Path, workdir: Path) -> dict:
    """The model's checkpoint in folder, kept from an earlier run (checkpoint_dir) or written now by a writer
    process (its own session, killed past config.timeout_s): where it is, its files and bytes, how it ended."""
    kept = config.kept_checkpoint(model) if config.checkpoint_dir is not None else None
    result = {"path": str(folder), "kept_after_run": config.checkpoint_dir is not None, "written_now": kept is None}
    if kept is None:
        spec = {"model": model, "device": config.device, "dtype": config.dtype, "seed": config.seed,
                "folder": str(folder), "max_shard_bytes": MAX_SHARD_BYTES}
        out_path, err_path = workdir / "writer.stdout", workdir / "writer.stderr"
        spawn = time.time()
        with out_path.open("w") as out, err_path.open("w") as err:
            status, _ = run_in_session([sys.executable, "-m", "fms.bench.startup", "--write-checkpoint",
                                        json.dumps(spec)], config.timeout_s, stdout=out, stderr=err,
                                       env=_child_env({}))
        kept = _last_record(out_path.read_text())
        result.update(status=status if kept is not None else "failed", wall_s=time.time() - spawn)
        if result["status"] != "ok":
            return {**result, "stderr_tail": err_path.read_text()[-3000:]}
    return {**result, "status": "ok", "bytes": kept["safetensors_bytes"],
            **{k: kept[k] for k in ("dtype", "seed", "files", "build_s", "write_s")}}


def _checkpoint_paths(checkpoint: dict) -> list[Path]:
    return [Path(checkpoint["path"]) / name for name in checkpoint["files"] if name.endswith(".safetensors")]


def _page_cache_at_start(run: str, checkpoint: dict) -> dict:
    """Before a child: drop the checkpoint from the page cache for a cold run, then measure what is cached."""
    paths = _checkpoint_paths(checkpoint)
    dropped = evict_page_cache(paths) if run == "cold" else None  # None: not asked (warm)
    return {"dropped_before_start": dropped, "resident_fraction_at_start": page_cache_fraction(paths)}


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


def run_child(config: StartupBenchConfig, model: str, run: str, cache_dirs: dict[str, str], workdir: Path,
              checkpoint: dict | None = None) -> dict:
    """One fresh process: its last record, how it ended (ok / timed_out / failed) and its wall time."""
    env = _child_env(cache_dirs)
    out_path, err_path, stack_path = (workdir / f"{run}.{kind}" for kind in ("stdout", "stderr", "stack"))
    spawn = time.time()
    with out_path.open("w") as out, err_path.open("w") as err:
        spec = json.dumps({**_child_spec(config, model, run, checkpoint), "spawn_time": spawn,
                           "stack_file": str(stack_path)})
        def ask_for_stack(proc):  # at the timeout: faulthandler writes where each thread is, even inside C code
            proc.send_signal(STACK_SIGNAL)
            deadline = time.time() + STACK_WAIT_S
            while time.time() < deadline and proc.poll() is None and not _has_dump(stack_path):
                time.sleep(0.05)

        status, returncode = run_in_session([sys.executable, "-m", "fms.bench.startup", "--child", spec],
                                            config.timeout_s, stdout=out, stderr=err, env=env,
                                            before_kill=ask_for_stack)
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
            label = CHECKPOINT_LABEL if phase == "get_model" and "checkpoint" in row else PHASE_LABELS[phase]
            table.append(["", label, *cells(lambda r: r.get("phases_s", {}).get(f"{phase}_s"))])
            if phase == "get_model" and "checkpoint" in row:
                table.append(["", "  load GB/s", *cells(lambda r: r.get("load_gb_per_s"))])
                table.append(["", "  weights read s", *cells(lambda r: r.get("weights_read_s"))])
                table.append(["", "  weights read GB/s", *cells(lambda r: r.get("weights_read_gb_per_s"))])
                table.append(["", "  checkpoint page-cached at start",
                              *cells(lambda r: r.get("checkpoint_page_cache", {}).get("resident_fraction_at_start"))])
            if phase == "engine":
                names = list(dict.fromkeys(n for r in runs.values() for n in r.get("engine_phases_s", {})))
                for name in names:
                    table.append(["", f"  {name}", *cells(lambda r: r.get("engine_phases_s", {}).get(name))])
        table.append(["", "total", *cells(lambda r: r.get("total_s"))])
        if any("peak_gpu_memory_gb" in r for r in runs.values()):
            table.append(["", "peak GPU GB (allocated)",
                          *cells(lambda r: r.get("peak_gpu_memory_gb", {}).get("allocated"))])
        table.append(["", "peak host GB", *cells(lambda r: r.get("peak_rss_gb"))])
        table.append(["", "compile-cache files found", *cells(lambda r: _files_found(r))])
        table.append(["", "dynamo graphs / recompiles (engine)", *cells(_dynamo_cell)])
    return markdown_table(["model", "phase", *(f"{run} s" for run in RUNS)], table)


def _dynamo_cell(run: dict):
    dynamo = run.get("dynamo")
    return None if dynamo is None else f"{dynamo['graphs_traced']} / {len(dynamo['recompiles'])}"


def _status(run: dict):
    running = run.get("running")
    return f"{run['status']} in {PHASE_LABELS[running]}" if running and "status" in run else run.get("status")


def _files_found(run: dict):
    counts = [c for c in run.get("cache_files_at_start", {}).values() if c is not None]
    return sum(counts) if counts else None


def _checkpoint_line(checkpoint: dict) -> str:
    if checkpoint["status"] != "ok":
        return f"writer {checkpoint['status']} after {checkpoint['wall_s']:.1f} s"
    how = (f"written in {checkpoint['build_s']:.1f} s (build) + {checkpoint['write_s']:.1f} s (write)"
           if checkpoint["written_now"] else "kept from an earlier run")
    num_files = sum(name.endswith(".safetensors") for name in checkpoint["files"])
    return f"{checkpoint['bytes'] / GB:.2f} GB in {num_files} safetensors file(s), {checkpoint['dtype']}, {how}"


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
        "weights": "checkpoint" if config.checkpoint else "random",  # what the timed get_model did
        **({"page_cache_note": PAGE_CACHE_NOTE} if config.checkpoint else {}),
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
            checkpoint = None
            if config.checkpoint:
                folder = (config.checkpoint_folder(model) if config.checkpoint_dir is not None else
                          Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fms-startup-checkpoint-")))
                          / model.replace(":", "-"))
                print(f"{model}: checkpoint in {folder} ...", flush=True)
                row["checkpoint"] = checkpoint = prepare_checkpoint(config, model, folder, root)
                print(f"{model}: checkpoint {_checkpoint_line(checkpoint)}", flush=True)
                write_json(config.output, results)
            for run in config.runs:
                cold = row["runs"].get("cold")
                if checkpoint is not None and checkpoint["status"] != "ok":
                    row["runs"][run] = {"status": "skipped", "reason": f"the checkpoint writer {checkpoint['status']}"}
                elif run == "warm" and cold is not None and cold["status"] != "ok":
                    row["runs"]["warm"] = {"status": "skipped", "reason": f"the cold run {cold['status']}"}
                else:
                    page_cache = None if checkpoint is None else _page_cache_at_start(run, checkpoint)
                    print(f"{model}: {run} start ...", flush=True)
                    row["runs"][run] = result = run_child(config, model, run, cache_dirs, root, checkpoint)
                    if page_cache is not None:
                        result["checkpoint_page_cache"] = page_cache
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
    if len(argv) != 2 or argv[0] not in ("--child", "--write-checkpoint"):
        print("usage: python -m fms.bench.startup --child SPEC_JSON | --write-checkpoint SPEC_JSON "
              "(started by `fms bench startup`)", file=sys.stderr)
        return 2
    return (_child if argv[0] == "--child" else _write_checkpoint_child)(json.loads(argv[1]))


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
