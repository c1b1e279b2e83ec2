"""Checkpoint load rate, old loader against new, in fresh processes: session 29's A/B for reading safetensors through
a ring of pinned buffers (fms.utils.serialization._HostStaging) against safetensors' own device reads.

The parent writes the model's random weights once as a HF checkpoint (bench_startup's writer, kept in CKPT_DIR) and
then, ROUNDS times, for each tree in turn: a cold child (the files' pages dropped from the page cache first) and a
warm one. Each child imports torch and fms from its tree, starts CUDA (timed on its own), then times
get_model("hf_pretrained", ...) and, inside it, load_hf_checkpoint (the files into the built model) until the GPU
is idle. GB/s = the safetensors files' bytes / those seconds.

    python final_project/results/session29/load_ab.py OUT.json --model llama:3.2-1b --trees .wA,.gpu [--rounds 2]
    python final_project/results/session29/load_ab.py OUT.json --model llama:micro --trees .gpu --device cpu
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import json, sys, time
start = time.perf_counter()
import torch
from fms.models import get_model
from fms.utils import serialization
imported = time.perf_counter()
device = sys.argv[2]
sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
if device == "cuda":
    torch.empty(1, device="cuda")
    sync()
started = time.perf_counter()
reads, load = [], serialization.load_hf_checkpoint
def timed(*args, **kwargs):
    t = time.perf_counter()
    load(*args, **kwargs)
    sync()
    reads.append(time.perf_counter() - t)
serialization.load_hf_checkpoint = timed
t = time.perf_counter()
model = get_model("hf_pretrained", model_path=sys.argv[1], device_type=device)
sync()
done = time.perf_counter()
print(json.dumps({"import_s": imported - start, "cuda_start_s": started - imported, "get_model_s": done - t,
                  "read_s": sum(reads), "dtype": str(next(model.parameters()).dtype)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output")
    parser.add_argument("--model", default="llama:3.2-1b")
    parser.add_argument("--trees", default=".wA,.gpu", help="comma-separated source trees (each has COMMIT)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--ckpt-dir", default="/tmp/ckpt_ab")
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args()
    trees = [Path(t).resolve() for t in args.trees.split(",")]
    sys.path.insert(0, str(trees[-1]))
    from fms.bench.startup import (CHECKPOINT_MARKER, MAX_SHARD_BYTES, evict_page_cache, page_cache_fraction)

    folder = Path(args.ckpt_dir) / args.model.replace(":", "-")
    env = dict(os.environ, PYTHONPATH=str(trees[-1]))
    if not (folder / CHECKPOINT_MARKER).is_file():
        spec = {"model": args.model, "device": args.device, "dtype": None, "seed": 0, "folder": str(folder),
                "max_shard_bytes": MAX_SHARD_BYTES}
        subprocess.run([sys.executable, "-m", "fms.bench.startup", "--write-checkpoint", json.dumps(spec)],
                       check=True, env=env, cwd=trees[-1], timeout=args.timeout, stdout=subprocess.DEVNULL)
    marker = json.loads((folder / CHECKPOINT_MARKER).read_text())
    paths = [folder / n for n in marker["files"] if n.endswith(".safetensors")]
    nbytes = marker["safetensors_bytes"]
    report = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "model": args.model, "bytes": nbytes,
              "checkpoint_dtype": marker["dtype"], "files": len(paths), "device": args.device, "runs": []}
    if args.device == "cuda":
        name = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True).stdout.strip()
        report["gpu"] = name
    print(f"{args.model}: {nbytes / 1e9:.2f} GB in {len(paths)} file(s), {marker['dtype']}", flush=True)
    for round_ in range(args.rounds):
        for tree in trees:
            for mode in ("cold", "warm"):
                dropped = evict_page_cache(paths) if mode == "cold" else None
                cached = page_cache_fraction(paths)
                wall = time.perf_counter()
                proc = subprocess.run([sys.executable, "-c", CHILD, str(folder), args.device], capture_output=True,
                                      text=True, env=dict(os.environ, PYTHONPATH=str(tree)), cwd=tree,
                                      timeout=args.timeout)
                row = {"round": round_, "tree": tree.name, "commit": (tree / "COMMIT").read_text().strip()
                       if (tree / "COMMIT").is_file() else None, "mode": mode, "dropped": dropped,
                       "page_cached_at_start": cached, "wall_s": time.perf_counter() - wall,
                       "returncode": proc.returncode}
                if proc.returncode == 0:
                    row.update(json.loads(proc.stdout.strip().splitlines()[-1]))
                    row["read_gb_per_s"] = nbytes / row["read_s"] / 1e9
                    row["get_model_gb_per_s"] = nbytes / row["get_model_s"] / 1e9
                else:
                    row["stderr_tail"] = proc.stderr[-2000:]
                report["runs"].append(row)
                print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()
                                  if k != "stderr_tail"}), flush=True)
                Path(args.output).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
