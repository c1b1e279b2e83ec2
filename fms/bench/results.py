"""Run metadata (command, device, versions, commit) and results files: JSON that is always valid, CSV."""

import csv
import json
import math
import platform
from datetime import datetime, timezone
from pathlib import Path

import torch

from fms.bench.commit import COMMIT_ENV, git_commit  # noqa: F401  (results' commit)
from fms.bench.switches import env_switches
from fms.bench.timing import GB


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def run_metadata(command: str, device: torch.device) -> dict:
    meta = {
        "command": command,
        "device": device_name(device),
        "device_type": device.type,
        "torch_version": torch.__version__,
        "git_commit": git_commit(Path(__file__).resolve().parent),
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "gb": "1e9 bytes",
        "env_switches": env_switches(),
    }
    if device.type == "cuda":
        meta["gpu_memory_gb"] = torch.cuda.get_device_properties(device).total_memory / GB
    try:
        import transformers

        meta["transformers_version"] = transformers.__version__
    except ImportError:
        meta["transformers_version"] = None
    return meta


def jsonable(value):
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def write_json(path: Path, results: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(jsonable(results), indent=2) + "\n")
    return path


def write_csv(path: Path, rows, columns):
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: csv_value(row.get(k)) for k in columns})


def csv_value(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, tuple)):
        return " ".join(str(x) for x in v)
    return v


