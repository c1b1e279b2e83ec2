"""Where get_model's time goes outside the weight read: cProfile of get_model("hf_pretrained", ...) from a checkpoint
(written once by bench_startup's writer into CKPT_DIR), in a fresh process with CUDA started before the clock.

    python final_project/results/session30/profile_get_model.py OUT_PREFIX [--model llama:3.2-1b] [--device cuda]

Writes OUT_PREFIX.txt (the top functions by cumulative and by own time) and OUT_PREFIX.json (the seconds).
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import cProfile, io, json, pstats, sys, time
import torch
from fms.models import get_model
from fms.utils import serialization
device, folder, prefix = sys.argv[1], sys.argv[2], sys.argv[3]
sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
if device == "cuda":
    torch.empty(1, device="cuda"); sync()
reads, load = [], serialization.load_hf_checkpoint
def timed(*args, **kwargs):
    t = time.perf_counter(); load(*args, **kwargs); sync(); reads.append(time.perf_counter() - t)
serialization.load_hf_checkpoint = timed
profile = cProfile.Profile()
t = time.perf_counter()
profile.enable()
model = get_model("hf_pretrained", model_path=folder, device_type=device)
sync()
profile.disable()
total = time.perf_counter() - t
out = io.StringIO()
for key in ("cumulative", "tottime"):
    pstats.Stats(profile, stream=out).sort_stats(key).print_stats(45)
open(prefix + ".txt", "w").write(out.getvalue())
json.dump({"get_model_s": total, "read_s": sum(reads), "build_s": total - sum(reads)}, open(prefix + ".json", "w"))
print(json.dumps({"get_model_s": total, "read_s": sum(reads)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prefix")
    parser.add_argument("--model", default="llama:3.2-1b")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--ckpt-dir", default="/tmp/ckpt_ab")
    args = parser.parse_args()
    from fms.bench.startup import CHECKPOINT_MARKER, MAX_SHARD_BYTES

    folder = Path(args.ckpt_dir) / args.model.replace(":", "-")
    if not (folder / CHECKPOINT_MARKER).is_file():
        spec = {"model": args.model, "device": args.device, "dtype": None, "seed": 0, "folder": str(folder),
                "max_shard_bytes": MAX_SHARD_BYTES}
        subprocess.run([sys.executable, "-m", "fms.bench.startup", "--write-checkpoint", json.dumps(spec)],
                       check=True, stdout=subprocess.DEVNULL, timeout=300)
    subprocess.run([sys.executable, "-c", CHILD, args.device, str(folder), str(Path(args.prefix).resolve())],
                   check=True, timeout=300)


if __name__ == "__main__":
    main()
