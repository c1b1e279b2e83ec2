"""Issue 19's table of targets in one command (`fms bench targets`): each row runs an existing benchmark as a
child process, reads the JSON it writes, and says whether the issue's target is met.

    row ─► job: a child command and the JSON it writes ─► read(JSON) -> measured values ─► meets(values)

    serving-1b ─┐
    batch1-1b  ─┴─► job serving-1b: one run of scripts/benchmark_serving.py feeds both rows

A target is met only if every run of its row meets it; a run that fails or times out does not. The
results JSON embeds each run's raw JSON, so results files of several invocations (device calls of 10
minutes each) merge run by run (`--from-results`) and are judged again by this module's rows. Without
CUDA the jobs run tiny stand-ins (llama micro, granite_hybrid h-nano, a few requests) and the verdicts
are "n/a (CPU)", except where the issue sets the target on the CPU too (eval-fp32).
"""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from fms.bench.hf_peer import HF_STATIC_SYSTEM
from fms.bench.processes import run_in_session
from fms.bench.results import git_commit, write_json
from fms.bench.startup import RUNS, TARGETS as STARTUP_TARGETS
from fms.bench.tables import markdown_table
from fms.runtime.compiled import check_compile_scope

REPO = Path(__file__).resolve().parents[2]  # the children run here: script paths and data paths are relative to it
STARTUP_PARENT_S = 30.0  # a start-up job's parent (imports, stack dumps, writing) inside the row's timeout
LOG_TAIL_CHARS = 3000
CPU_VERDICT = "n/a (CPU)"
CPU_NOTE = ("CPU stand-ins: tiny models and workloads (llama micro, granite_hybrid h-nano, a few requests) that check "
            "each row's benchmark end to end. The targets apply to the GPU only (n/a (CPU)), except eval-fp32, "
            "whose target the issue sets on the CPU too.")

# issue 19's targets that no benchmark checks in code (the start-up ones are fms.bench.startup.TARGETS)
SERVING_1B_MIN_TOK_S = 61_000.0  # 70% of the workload's floor on the H200
BATCH1_1B_MIN_TOK_S = 1_390.0  # 80% of the weight-read limit
SERVING_8B_MIN_PCT = 60.0  # of its floor
EVAL_MAX_PAGED_OVER_DEFAULT = 1.0  # paged per-batch time no slower than default
# Interleaved passes per mode: the ratio judged is the median of the per-repeat paged/default ratios, shown
# with its 95% interval (a pass is ~3 batches of ~15 ms on the GPU, where a single pair's ratio spreads +-15%).
EVAL_TIMING_REPEATS = 21


@dataclass(frozen=True)
class JobContext:
    """What a job's command depends on: the device, the run's own folder (absolute) and its time limit."""

    device_type: str
    run_dir: Path
    timeout_s: float
    compile_scope: str | None = None  # the engine's --compile-scope for start-up and serving jobs; None: its default


@dataclass(frozen=True)
class Job:
    """One child command (after sys.executable, run in the repository) and the JSON it writes in its run folder."""

    name: str
    argv: Callable[[JobContext], list[str]]
    output: str


@dataclass(frozen=True)
class Row:
    """One row of the issue's table: the job it reads, the measured values, the target and the verdict."""

    name: str
    what: str
    job: Job
    target: str
    read: Callable[[dict], dict]  # the job's JSON -> measured values (numbers, strings, None)
    meets: Callable[[dict], bool | None]  # one run's measured values -> met (None: nothing to judge)
    show: Callable[[dict], str]  # measured values, a number possibly a (min, max) spread -> table text
    judged_on_cpu: bool = False


# -- formatting ---------------------------------------------------------------------------------------------
def _n(value, spec: str = ",.0f") -> str:
    """A number, a (min, max) spread over runs as 'min–max', or '-'."""
    if value is None:
        return "-"
    if isinstance(value, (tuple, list)):
        return f"{value[0]:{spec}}–{value[1]:{spec}}"
    return f"{value:{spec}}"


def combine(values: list[dict]) -> dict:
    """Several runs' measured values as one: a number that differs becomes (min, max), other values joined."""
    out = {}
    for key in dict.fromkeys(k for v in values for k in v):
        seen = [v.get(key) for v in values]
        present = [x for x in seen if x is not None]
        if present and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in present):
            low, high = min(present), max(present)
            out[key] = low if low == high else (low, high)
        elif len({json.dumps(x, sort_keys=True) for x in seen}) == 1:
            out[key] = seen[0]
        else:
            out[key] = " / ".join(dict.fromkeys(str(x) for x in seen))
    return out


# -- the jobs -----------------------------------------------------------------------------------------------
def _startup_job(name: str, cuda_model: str, cpu_model: str, runs: tuple[str, ...]) -> Job:
    def argv(ctx: JobContext) -> list[str]:
        # each child's own timeout fits the row's, so the start-up benchmark records where a slow start stood
        child_timeout = max(10.0, (ctx.timeout_s - STARTUP_PARENT_S) / len(runs))
        return ["scripts/bench_startup.py", "--models", cuda_model if ctx.device_type == "cuda" else cpu_model,
                "--runs", ",".join(runs), "--device", ctx.device_type, "--timeout", f"{child_timeout:.0f}",
                *(["--compile-scope", ctx.compile_scope] if ctx.compile_scope else []),
                "--output", str(ctx.run_dir / "startup.json")]

    return Job(name, argv, "startup.json")


def _serving_job(name: str, cuda: list[str], cpu: list[str]) -> Job:
    def argv(ctx: JobContext) -> list[str]:
        return ["scripts/benchmark_serving.py", "--device", ctx.device_type, "--results_dir", str(ctx.run_dir),
                *(["--compile_scope", ctx.compile_scope] if ctx.compile_scope else []),
                *(cuda if ctx.device_type == "cuda" else cpu)]

    return Job(name, argv, "serving.json")


def _eval_argv(ctx: JobContext) -> list[str]:
    return ["scripts/eval.py", "--task", "truthfulqa_mc2", "--data", "fms/resources/eval/truthfulqa_mc.json",
            "--mode", "both", "--dtype", "fp32", "--device_type", ctx.device_type, "--no_progress",
            "--timing_repeats", str(EVAL_TIMING_REPEATS),
            "--output", str(ctx.run_dir / "eval.json")]


SERVING_WORKLOAD = ["--num_requests", "128", "--prompt_range", "64,512", "--output_range", "256,256"]
CPU_WORKLOAD = ["--num_requests", "4", "--prompt_range", "16,32", "--output_range", "8,8"]
JOBS = {job.name: job for job in (
    _startup_job("startup-8b", "llama:3.1-8b", "llama:micro", RUNS),
    _startup_job("startup-hybrid", "granite_hybrid:4.0-h-1b", "granite_hybrid:h-nano", ("cold",)),
    _serving_job("serving-1b", ["--variant", "3.2-1b", *SERVING_WORKLOAD, "--batch1_tokens", "512"],
                 ["--variant", "micro", *CPU_WORKLOAD, "--batch1_tokens", "16"]),
    _serving_job("serving-8b", ["--variant", "3.1-8b", *SERVING_WORKLOAD, "--peers", "hf"],
                 ["--variant", "micro", *CPU_WORKLOAD, "--peers", "hf"]),
    Job("eval-fp32", _eval_argv, "eval.json"),
    # HF's static generate beside (its continuous batching refuses hybrids): all 64 requests in one left-padded batch
    _serving_job("serving-hybrid", ["--architecture", "granite_hybrid", "--variant", "4.0-h-1b", "--num_requests",
                                    "64", "--prompt_range", "512,2048", "--output_range", "128,128",
                                    "--peers", "hf_generate"],
                 ["--architecture", "granite_hybrid", "--variant", "h-nano", *CPU_WORKLOAD]),
)}


# -- reading each job's JSON ----------------------------------------------------------------------------------
STARTUP_PHASES = {"get_model": "get_model", "engine": "LLMEngine"}


def _read_startup(raw: dict) -> dict:
    """One model's start-up: get_model and LLMEngine seconds per run, how each run ended, the targets' checks."""
    (model,) = raw["models"]
    values = {}
    for run, record in model["runs"].items():
        running = record.get("running")
        values[f"{run}_status"] = record["status"] + (f" in {running}" if running else "")
        for phase in STARTUP_PHASES:
            values[f"{phase}_{run}_s"] = record.get("phases_s", {}).get(f"{phase}_s")
    values["checks"] = {f"{c['run']} {'+'.join(c['phases'])}": c["met"] for c in model["targets"]}
    return values


def _meets_startup(values: dict) -> bool | None:
    checks = values["checks"]
    return all(met is True for met in checks.values()) if checks else None  # None met: the phase not reached


def _show_startup(values: dict) -> str:
    runs = [run for run in RUNS if f"{run}_status" in values]
    text = ", ".join(f"{label} " + " / ".join(_n(values.get(f"{phase}_{run}_s"), ".1f") for run in runs) + " s"
                     for phase, label in STARTUP_PHASES.items()) + f" ({' / '.join(runs)})"
    unfinished = [f"{run} {values[f'{run}_status']}" for run in runs if values[f"{run}_status"] != "ok"]
    return text + "".join(f"; {u}" for u in unfinished)


def _startup_target(model: str) -> str:
    """fms.bench.startup.TARGETS of one model as text: 'get_model <= 10 s (cold, warm); ...'."""
    grouped: dict[tuple, list[str]] = {}
    for target in STARTUP_TARGETS:
        if target.model == model:
            grouped.setdefault((target.phases, target.limit_s), []).append(target.run)
    return "; ".join(f"{' + '.join(STARTUP_PHASES.get(p, p) for p in phases)} <= {limit:g} s ({', '.join(runs)})"
                     for (phases, limit), runs in grouped.items())


def _system(raw: dict, system: str) -> dict:
    for row in raw["results"]:
        if row["system"] == system:
            return row
    raise ValueError(f"no {system!r} row in the serving JSON (rows: {[r['system'] for r in raw['results']]})")


def _read_serving(raw: dict) -> dict:
    row = _system(raw, "fms LLMEngine")
    return {"output_tok_s": row["output_tokens_per_s"], "floor_tok_s": row["limit_tok_s"],
            "pct_of_floor": row["pct_of_limit"], "ttft_p50_ms": row["ttft_p50_ms"], "tpot_p50_ms": row["tpot_p50_ms"]}


def _show_serving(values: dict) -> str:
    return (f"{_n(values['output_tok_s'])} tok/s = {_n(values['pct_of_floor'], '.1f')}% of the "
            f"{_n(values['floor_tok_s'])} tok/s floor")


def _read_batch1(raw: dict) -> dict:
    row = _system(raw, "fms LLMEngine batch-1")
    limit = row["batch1_decode_limit_tok_s"]
    return {"output_tok_s": row["output_tokens_per_s"], "weight_read_limit_tok_s": limit,
            "pct_of_limit": 100.0 * row["output_tokens_per_s"] / limit, "tpot_p50_ms": row["tpot_p50_ms"]}


def _show_batch1(values: dict) -> str:
    return (f"{_n(values['output_tok_s'])} tok/s = {_n(values['pct_of_limit'], '.0f')}% of the "
            f"{_n(values['weight_read_limit_tok_s'])} tok/s weight-read limit; TPOT p50 "
            f"{_n(values['tpot_p50_ms'], '.2f')} ms")


def _read_serving_8b(raw: dict) -> dict:
    values = _read_serving(raw)
    peers = [row for row in raw["results"] if row["system"].startswith("hf ")]
    peer = peers[0] if peers else {"system": "hf generate_batch", "error": "not run"}
    tok_s = peer.get("output_tokens_per_s")
    return {**values, "peer": peer["system"], "peer_tok_s": tok_s, "peer_error": peer.get("error"),
            "fms_over_peer": values["output_tok_s"] / tok_s if tok_s else None}


def _meets_serving_8b(values: dict) -> bool:
    return values["pct_of_floor"] >= SERVING_8B_MIN_PCT and values["peer_tok_s"] is not None


def _show_peer(values: dict) -> str:
    if values["peer_tok_s"] is None:
        return f"{values['peer']}: {str(values['peer_error'])[:120]}"
    return f"{values['peer']} {_n(values['peer_tok_s'])} tok/s (fms {_n(values['fms_over_peer'], '.1f')}x)"


def _read_eval(raw: dict) -> dict:
    per_batch = {mode: 1e3 * m["elapsed_s"] / m["num_batches"] for mode, m in raw["modes"].items()}
    paired = raw["comparison"].get("latency_ratio")  # files before session 20 have none: the median passes' ratio
    return {"default_ms_per_batch": per_batch["default"], "paged_ms_per_batch": per_batch["paged"],
            "paged_over_default": paired["median"] if paired else per_batch["paged"] / per_batch["default"],
            "paired_repeats": len(paired["runs"]) if paired else None,
            "paired_ci95": paired["ci95"] if paired else None,
            "answer_agreement": raw["comparison"]["answer_agreement"],
            # paged forks a question's context for its answers (files before session 18 have no such key)
            "paged_shared_context": raw["modes"]["paged"].get("shared_context", False),
            "input_tokens": {mode: m.get("input_tokens") for mode, m in raw["modes"].items()}}


def _show_eval(values: dict) -> str:
    ratio = f"{_n(values['paged_over_default'], '.2f')}x"
    if values.get("paired_repeats"):
        ci = values.get("paired_ci95")
        ratio = (f"median of {values['paired_repeats']} interleaved pairs {values['paged_over_default']:.3f}x"
                 + (f", 95% interval {ci[0]:.3f}-{ci[1]:.3f}" if ci else ""))
    text = (f"paged {_n(values['paged_ms_per_batch'], '.1f')} against default "
            f"{_n(values['default_ms_per_batch'], '.1f')} ms per batch ({ratio}); "
            f"answers agree {_n(values['answer_agreement'], '.0%')}")
    if values.get("paged_shared_context"):
        tokens = values["input_tokens"]
        text += f"; paged shared each question's context ({tokens['paged']} against {tokens['default']} input tokens)"
    return text


def _read_serving_hybrid(raw: dict) -> dict:
    row = _system(raw, "fms LLMEngine")
    peers = [r for r in raw["results"] if r["system"] == HF_STATIC_SYSTEM]
    peer = peers[0] if peers else {}
    tok_s = peer.get("output_tokens_per_s")
    return {"output_tok_s": row["output_tokens_per_s"], "ttft_p50_ms": row["ttft_p50_ms"],
            "tpot_p50_ms": row["tpot_p50_ms"], "hf_static_tok_s": tok_s,
            "fms_over_hf_static": row["output_tokens_per_s"] / tok_s if tok_s else None,
            "hf_static_batch_size": peer.get("hf_batch_size"), "hf_static_error": peer.get("error")}


def _show_serving_hybrid(values: dict) -> str:
    if values["hf_static_tok_s"] is not None:
        peer = f"HF static generate {_n(values['hf_static_tok_s'])} tok/s"
    elif values.get("hf_static_error"):
        peer = f"HF static generate: failed: {str(values['hf_static_error'])[:120]}"
    else:
        peer = "HF static generate: not run (add --peers hf_generate)"
    ratio = f" ({_n(values['fms_over_hf_static'], '.1f')}x HF static)" if values.get("fms_over_hf_static") else ""
    return (f"{_n(values['output_tok_s'])} tok/s{ratio}, TTFT p50 {_n(values['ttft_p50_ms'], ',.0f')} ms, TPOT p50 "
            f"{_n(values['tpot_p50_ms'], '.1f')} ms; {peer}")


ROWS = (
    Row("startup-8b", "Llama-3.1-8B: get_model; LLMEngine(model) cold / warm", JOBS["startup-8b"],
        _startup_target("llama:3.1-8b"), _read_startup, _meets_startup, _show_startup),
    Row("startup-hybrid", "Granite-4.0-H-1B: get_model + LLMEngine(model), cold", JOBS["startup-hybrid"],
        _startup_target("granite_hybrid:4.0-h-1b"), _read_startup, _meets_startup, _show_startup),
    Row("serving-1b", "1B serving: 128 requests, prompts 64-512, 256 new", JOBS["serving-1b"],
        f">= {SERVING_1B_MIN_TOK_S:,.0f} output tok/s (70% of the floor)", _read_serving,
        lambda v: v["output_tok_s"] >= SERVING_1B_MIN_TOK_S, _show_serving),
    Row("batch1-1b", "batch-1 decode, 1B: 128 prompt, 512 new", JOBS["serving-1b"],
        f">= {BATCH1_1B_MIN_TOK_S:,.0f} tok/s (80% of the weight-read limit)", _read_batch1,
        lambda v: v["output_tok_s"] >= BATCH1_1B_MIN_TOK_S, _show_batch1),
    Row("serving-8b", "8B serving, same workload, HF generate_batch beside", JOBS["serving-8b"],
        f">= {SERVING_8B_MIN_PCT:g}% of its floor; HF generate_batch measured in the same run", _read_serving_8b,
        _meets_serving_8b, lambda v: f"{_show_serving(v)}; {_show_peer(v)}"),
    Row("eval-fp32", "paged in fp32: TruthfulQA-format scoring, llama micro", JOBS["eval-fp32"],
        "paged per-batch time <= default's", _read_eval,
        lambda v: v["paged_over_default"] <= EVAL_MAX_PAGED_OVER_DEFAULT, _show_eval, judged_on_cpu=True),
    Row("serving-hybrid", "Granite-4.0-H-1B serving: 64 requests, prompts 512-2048, 128 new", JOBS["serving-hybrid"],
        "measured, next to HF static generate on the same model and prompts", _read_serving_hybrid,
        lambda v: v["output_tok_s"] is not None and v["hf_static_tok_s"] is not None, _show_serving_hybrid),
)
ROW_NAMES = tuple(row.name for row in ROWS)
ROWS_BY_NAME = {row.name: row for row in ROWS}


# -- judging runs -----------------------------------------------------------------------------------------
def judge(row: Row, run: dict) -> dict:
    """One run as the row sees it: its measured values and met (None: nothing to judge, or a CPU stand-in)."""
    measured, met, error = {}, None, None
    if run.get("raw") is not None:
        try:
            measured = row.read(run["raw"])
        except (KeyError, ValueError, TypeError, ZeroDivisionError) as exc:
            error = f"could not read {run.get('raw_path')}: {type(exc).__name__}: {exc}"
    if run["status"] == "ok" and not error:
        met = row.meets(measured)
    if run["device_type"] == "cpu" and not row.judged_on_cpu:
        met = None
    return {"measured": measured, "met": met, **({"read_error": error} if error else {})}


def verdict(row: Row, runs: list[dict]) -> tuple[bool | None, str]:
    """(met, text) over every run of a row: met only if each run ran to the end and met the target."""
    if not runs:
        return None, "not run"
    unfinished = [r for r in runs if r["status"] != "ok" or r.get("read_error")]
    how = ", ".join(f"{n} {status}" for status, n in _counts(_outcome(r) for r in unfinished).items())
    if all(r["device_type"] == "cpu" for r in runs) and not row.judged_on_cpu:
        return None, CPU_VERDICT + (f": {how} (of {len(runs)} runs)" if unfinished else "")
    if unfinished:
        return False, f"NOT met: {how} (of {len(runs)} runs)"
    num_met = sum(r["met"] is True for r in runs)
    if num_met == len(runs):
        return True, "met" if len(runs) == 1 else f"met in all {len(runs)} runs"
    return False, "NOT met" if len(runs) == 1 else f"NOT met: met in {num_met} of {len(runs)} runs"


def _outcome(run: dict) -> str:
    return "unreadable" if run["status"] == "ok" else run["status"].replace("_", " ")


def _counts(items) -> dict:
    counts: dict = {}
    for item in items:
        counts[item] = counts.get(item, 0) + 1
    return counts


def summarize(runs: dict, chosen: dict[str, list[str]]) -> list[dict]:
    """Each chosen row (in ROWS order) with its runs judged; chosen: row name -> the run ids it reads."""
    rows = []
    for row in ROWS:
        if row.name not in chosen:
            continue
        judged = []
        for run_id in chosen[row.name]:
            run = runs[run_id]
            judged.append({"run": run_id, "status": run["status"], "command": run["command"],
                           "raw_path": run["raw_path"], "device": run.get("device"), "commit": run["commit"],
                           "wall_s": run["wall_s"], **judge(row, run)})
        met, text = verdict(row, [{**runs[j["run"]], **j} for j in judged])
        finished = [j["measured"] for j in judged if j["status"] == "ok" and "read_error" not in j]
        measured = combine(finished) if finished else {}
        commands = [j["command"] for j in judged if j["command"]]
        rows.append({"name": row.name, "what": row.what, "cpu_stand_in": text.startswith(CPU_VERDICT),
                     "target": row.target, "met": met, "verdict": text, "command": commands[-1] if commands else None,
                     "measured": measured, "measured_text": row.show(measured) if finished else "-", "runs": judged})
    return rows


# -- running ------------------------------------------------------------------------------------------------
@dataclass
class TargetsConfig:
    """One `fms bench targets` invocation: run rows (repeats x each job, each under timeout_s) or merge results."""

    rows: tuple[str, ...] = ROW_NAMES  # the jobs run in this order; the table keeps ROWS order
    repeats: int = 1
    timeout_s: float = 600.0  # per run
    budget_s: float | None = None  # all runs together: a run's timeout is what is left of it, if less
    output: Path | None = None  # default results/targets.json when running; a merge writes only when given
    raw_dir: Path | None = None  # default: beside output, <output stem>_raw
    device: str | None = None  # default: cuda when available
    commit: str | None = None  # recorded instead of git's answer (a copy of the tree without .git)
    compile_scope: str | None = None  # passed to the start-up and serving jobs' engines; None: the engine's default
    from_results: tuple[Path, ...] = ()
    dry_run: bool = False
    command: str = "fms bench targets"

    def __post_init__(self):
        from fms.bench.timing import checked_device_type

        self.rows = tuple(self.rows)
        check_compile_scope(self.compile_scope, optional=True)
        unknown = [name for name in self.rows if name not in ROWS_BY_NAME]
        if unknown or not self.rows:
            raise ValueError(f"rows: unknown row(s) {unknown}; allowed: {', '.join(ROW_NAMES)}")
        if isinstance(self.repeats, bool) or not isinstance(self.repeats, int) or self.repeats < 1:
            raise ValueError(f"repeats must be an int >= 1, got {self.repeats!r}")
        for name in ("timeout_s", "budget_s"):
            value = getattr(self, name)
            if name == "budget_s" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value <= 0:
                raise ValueError(f"{name} must be a number of seconds > 0, got {value!r}")
        self.from_results = tuple(Path(p) for p in self.from_results)
        missing = [str(p) for p in self.from_results if not p.is_file()]
        if missing:
            raise ValueError(f"from_results: no such file(s) {missing}")
        if self.from_results and self.dry_run:
            raise ValueError("dry_run lists the commands a run would start; from_results starts none")
        if not self.from_results:
            self.device = checked_device_type(self.device, "device")
            self.output = Path("results/targets.json") if self.output is None else Path(self.output)
            self.raw_dir = Path(self.raw_dir) if self.raw_dir is not None else \
                self.output.with_name(self.output.stem + "_raw")

    def jobs(self) -> list[Job]:
        """The jobs of the chosen rows, each once, in the order the rows were given."""
        return list(dict.fromkeys(ROWS_BY_NAME[name].job for name in self.rows))

    def rows_of(self, job: Job) -> list[str]:
        """The chosen rows that read this job, in ROWS order."""
        return [row.name for row in ROWS if row.job is job and row.name in self.rows]


def _short(arg: str) -> str:
    """'python' for this interpreter, a path inside the repository relative to it, anything else as it is."""
    if arg == sys.executable:
        return "python"
    if os.path.isabs(arg) and Path(arg).is_relative_to(REPO):
        return str(Path(arg).relative_to(REPO))
    return arg


def _display(argv: list[str]) -> str:
    return " ".join(shlex.quote(_short(a)) for a in argv)


def _next_run_dir(raw_dir: Path, job: Job) -> Path:
    k = 1
    while (raw_dir / f"{job.name}-{k}").exists():
        k += 1
    return raw_dir / f"{job.name}-{k}"


def _reported_device(raw: dict | None) -> str | None:
    """The device a child's JSON names (the serving / start-up metadata, or the eval report's device)."""
    if not raw:
        return None
    metadata = raw.get("metadata") or {}
    if metadata.get("device"):
        return metadata["device"]
    device = raw.get("device")
    if isinstance(device, dict):
        return device.get("name") or device.get("type")
    return None


def run_job(job: Job, config: TargetsConfig, commit: str, timeout_s: float) -> tuple[str, dict]:
    """One run of a job in a fresh process: its id (its folder's name) and record: how it ended, its wall time,
    its JSON (raw) and, if it failed, its log's tail."""
    run_dir = _next_run_dir(config.raw_dir, job).absolute()
    run_dir.mkdir(parents=True)
    argv = [sys.executable, *job.argv(JobContext(config.device, run_dir, timeout_s, config.compile_scope))]
    log_path = run_dir / "log.txt"
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    start = time.perf_counter()
    with log_path.open("w") as log:
        status, returncode = run_in_session(argv, timeout_s, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wall_s = time.perf_counter() - start
    raw_path = run_dir / job.output
    raw = None
    if raw_path.is_file():
        try:
            raw = json.loads(raw_path.read_text())
        except json.JSONDecodeError:
            raw = None
    run = {"job": job.name, "status": status, "returncode": returncode, "wall_s": wall_s, "timeout_s": timeout_s,
           "started": started,
           "command": _display(argv), "raw_path": _short(str(raw_path)), "log_path": _short(str(log_path)),
           "device_type": config.device, "device": _reported_device(raw), "commit": commit, "raw": raw}
    if status == "ok" and raw is None:
        status = run["status"] = "failed"
        run["error"] = f"exited 0 but wrote no readable {job.output}"
    if status != "ok":
        run["log_tail"] = log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
    return run_dir.name, run


def _skipped(job: Job, config: TargetsConfig, commit: str) -> dict:
    return {"job": job.name, "status": "skipped", "returncode": None, "wall_s": 0.0, "timeout_s": 0.0,
            "started": None, "command": None, "raw_path": None, "log_path": None, "device_type": config.device,
            "device": None, "commit": commit, "raw": None, "error": f"not started: the budget of {config.budget_s:g} s "
            "was spent"}


def _commit(config: TargetsConfig) -> str:
    return config.commit or git_commit(REPO)


def run_targets(config: TargetsConfig) -> dict:
    """Run the chosen rows' jobs (each job `repeats` times, in rounds), or merge results files; print the table."""
    if config.from_results:
        results = merge_results(config.from_results, config.rows, config.command)
        if config.output is not None:
            _write(config.output, results)
        print(report(results))
        return results
    jobs = config.jobs()
    if config.dry_run:
        for job in jobs:
            ctx = JobContext(config.device, config.raw_dir / f"{job.name}-N", config.timeout_s, config.compile_scope)
            print(f"{job.name} (rows {', '.join(config.rows_of(job))}): {_display([sys.executable, *job.argv(ctx)])}")
        return {}
    commit = _commit(config)
    if config.device == "cpu":
        print(CPU_NOTE, flush=True)
    runs: dict[str, dict] = {}
    chosen: dict[str, list[str]] = {name: [] for name in config.rows}
    results = {"metadata": {"command": config.command, "device": None, "device_type": config.device,
                            "commit": commit, "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                            "timeout_s": config.timeout_s, "budget_s": config.budget_s, "repeats": config.repeats,
                            "compile_scope": config.compile_scope, "complete": False},
               "rows": [], "runs": runs}
    total, done = config.repeats * len(jobs), 0
    start = time.perf_counter()
    for _ in range(config.repeats):
        for job in jobs:
            done += 1
            rows = config.rows_of(job)
            timeout_s = config.timeout_s
            if config.budget_s is not None:
                timeout_s = min(timeout_s, config.budget_s - (time.perf_counter() - start))
            if timeout_s < 1.0:
                run_id, run = f"{job.name}-skipped-{done}", _skipped(job, config, commit)
                print(f"[{done}/{total}] {job.name}: skipped, the budget of {config.budget_s:g} s is spent", flush=True)
            else:
                print(f"[{done}/{total}] {job.name} (rows {', '.join(rows)}), at most {timeout_s:.0f} s ...",
                      flush=True)
                run_id, run = run_job(job, config, commit, timeout_s)
                print(f"[{done}/{total}] {job.name}: {run['status']} after {run['wall_s']:.0f} s: {run['command']}",
                      flush=True)
            runs[run_id] = run
            for name in rows:
                chosen[name].append(run_id)
            results["rows"] = summarize(runs, chosen)
            _write(config.output, results)  # after every run: a call stopped part-way keeps what it measured
    results["metadata"].update(device=_device_name(config.device), complete=True)
    for run in runs.values():
        run["device"] = run["device"] or results["metadata"]["device"]
    results["rows"] = summarize(runs, chosen)
    _write(config.output, results)
    print(report(results))
    print(f"wrote {config.output} and {config.output.with_suffix('.md')}")
    return results


def _device_name(device_type: str) -> str:
    # asked after the children ran: a CUDA context in this process would hold GPU memory while they start
    import torch

    from fms.bench.results import device_name

    return device_name(torch.device(device_type))


def _write(path: Path, results: dict) -> None:
    write_json(path, results)
    path.with_suffix(".md").write_text(report(results) + "\n")


# -- merging ------------------------------------------------------------------------------------------------
def merge_results(paths, rows: tuple[str, ...] = ROW_NAMES, command: str = "fms bench targets --from-results") -> dict:
    """Several targets JSONs as one: each row keeps every run of every file, in file order, judged again."""
    runs: dict[str, dict] = {}
    chosen: dict[str, list[str]] = {}
    sources = []
    counts: dict[str, int] = {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        if "runs" not in data or "rows" not in data:
            raise ValueError(f"{path} is not a targets results file (no 'rows' and 'runs')")
        meta = data.get("metadata", {})
        sources.append({"path": str(path), **{k: meta.get(k) for k in ("command", "device", "device_type", "commit",
                                                                        "started", "complete")}})
        renamed = {}
        for old_id, run in data["runs"].items():
            counts[run["job"]] = counts.get(run["job"], 0) + 1
            renamed[old_id] = new_id = f"{run['job']}-{counts[run['job']]}"
            runs[new_id] = run
        for row in data["rows"]:
            if row["name"] not in ROWS_BY_NAME:
                print(f"note: {path}: row {row['name']!r} is not a row any more (rows: {', '.join(ROW_NAMES)}); "
                      "skipped")
                continue
            if row["name"] in rows:
                chosen.setdefault(row["name"], []).extend(renamed[r["run"]] for r in row["runs"])
    device_types = sorted({s["device_type"] for s in sources})
    if len(device_types) > 1:
        raise ValueError(f"cannot merge results of different device types {device_types}: a CPU stand-in is not a "
                         "run of the GPU row")
    kept = {run_id for ids in chosen.values() for run_id in ids}
    runs = {run_id: run for run_id, run in runs.items() if run_id in kept}  # the runs of the rows asked for
    devices = list(dict.fromkeys(s["device"] for s in sources if s["device"]))
    commits = list(dict.fromkeys(s["commit"] for s in sources if s["commit"]))
    return {"metadata": {"command": command, "device": " / ".join(devices) or None,
                         "device_type": device_types[0] if device_types else None, "commit": " / ".join(commits),
                         "merged_from": sources, "complete": all(s["complete"] for s in sources)},
            "rows": summarize(runs, chosen), "runs": runs}


# -- the table ----------------------------------------------------------------------------------------------
def _runs_cell(row: dict) -> str:
    runs = row["runs"]
    unfinished = _counts(r["status"].replace("_", " ") for r in runs if r["status"] != "ok")
    text = str(len(runs)) + "".join(f", {n} {status}" for status, n in unfinished.items())
    commits = list(dict.fromkeys(str(r["commit"])[:7] for r in runs))
    return text + (f" (commits {', '.join(commits)})" if len(commits) > 1 else "")


def report(results: dict) -> str:
    """The markdown table (row | measured | target | met? | runs | command), what ran it, and any failures."""
    meta = results["metadata"]
    rows = results["rows"]
    lines = [f"device: {meta.get('device') or meta.get('device_type')}; commit: {meta.get('commit')}; "
             f"`{meta.get('command')}`"]
    if meta.get("merged_from"):
        lines.append(f"merged from {len(meta['merged_from'])} results files: "
                     + ", ".join(s["path"] for s in meta["merged_from"]))
    if not meta.get("complete", True):
        lines.append("(in progress, or stopped before the last run)")
    lines.append("")
    lines.append(markdown_table(
        ["row", "measured", "target", "met?", "runs", "command"],
        [[f"`{r['name']}`: {r['what']}" + (" (CPU stand-in)" if r["cpu_stand_in"] else ""), r["measured_text"],
          r["target"], r["verdict"], _runs_cell(r),
          f"`{' '.join(r['command'].split())}`" if r["command"] else "-"] for r in rows]))
    if meta.get("device_type") == "cpu":
        lines += ["", CPU_NOTE]
    failures = [(r["name"], run) for r in rows for run in r["runs"]
                if run["status"] != "ok" or run.get("read_error")]
    seen = set()
    for name, run in failures:
        if run["run"] in seen:
            continue
        seen.add(run["run"])
        full = results["runs"].get(run["run"], {})
        what = run.get("read_error") or full.get("error") or f"{run['status'].replace('_', ' ')} after " \
            f"{run['wall_s']:.0f} s (return code {full.get('returncode')})"
        lines += ["", f"{name}, run {run['run']}: {what}; log {full.get('log_path')}"]
        tail = (full.get("log_tail") or "").strip().splitlines()[-15:]
        if tail:
            lines += ["```", *tail, "```"]
    return "\n".join(lines)

