"""Optional Weights & Biases logging of benchmark and eval results (offline unless configured; never required)."""

import os
import sys
from pathlib import Path

from fms.bench.results import csv_value, jsonable

WANDB_MISSING = "wandb is not installed; pip install wandb or drop --wandb"


def start_wandb(config: dict, results_dir: Path, name: str, project: str = "fms-inference-benchmark"):
    """A wandb run, or None (with a message) if wandb is missing or fails to start: it is never required.

    Offline unless WANDB_MODE says otherwise or WANDB_API_KEY is set.
    """
    try:
        import wandb
    except ImportError:
        print(WANDB_MISSING)
        return None
    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    try:
        results_dir.mkdir(parents=True, exist_ok=True)
        run = wandb.init(project=os.environ.get("WANDB_PROJECT", project), name=name, config=jsonable(config),
                         dir=str(results_dir), mode=mode)
    except Exception as exc:  # noqa: BLE001 - logging must never stop a benchmark
        print(f"wandb could not start ({type(exc).__name__}: {exc}); continuing without it")
        return None
    print(f"wandb: logging in {mode} mode under {results_dir / 'wandb'}")
    return run


def log_wandb_points(run, rows, section: str) -> None:
    if run is None:
        return
    for row in rows:
        numbers = {f"{section}/{row['backend']}/{k}": v for k, v in row.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None}
        run.log({**numbers, f"{section}/batch_size": row.get("batch_size"),
                 f"{section}/context_len": row.get("context_len")})


def finish_wandb(run, results: dict, plots: dict[str, Path], columns) -> None:
    """Log the points table (columns) and the plots, then close the run."""
    if run is None:
        return
    import wandb

    try:
        points = results["points"]
        if points:
            columns = list(columns)
            run.log({"points": wandb.Table(columns=columns, data=[[csv_value(p.get(c)) for c in columns]
                                                                  for p in points])})
        run.log({f"plots/{name}": wandb.Image(str(path)) for name, path in plots.items()})
        run.summary["results_json"] = str(results.get("paths", {}).get("json", ""))
    finally:
        run.finish()


def log_summary(summary: dict, config: dict, project: str, name: str, run_dir: str | None = None,
                job_type: str | None = None) -> bool:
    """One wandb run holding these numbers as its summary; False (with a warning) when wandb is not installed."""
    try:
        import wandb
    except ImportError:
        print("warning: --wandb needs the wandb package (pip install wandb); results were not logged there",
              file=sys.stderr)
        return False
    # offline unless the user has configured W&B (WANDB_MODE or an API key); sync later with `wandb sync`
    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    run = wandb.init(project=project, mode=mode, job_type=job_type, config=jsonable(config), dir=run_dir, name=name)
    run.log(summary)
    run.summary.update(summary)
    run.finish()
    return True
