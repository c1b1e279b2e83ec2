"""A CPU model's checkpoint load, old tree against new, cold page cache: session 30's reads by offset straight into
the parameters against views of safetensors' memory map. One fresh process per row; each drops the files from the
page cache first (bench_startup's evict_page_cache), then times get_model("hf_pretrained") and the
load_hf_checkpoint inside it. Prints one JSON line per row. Indicative only: CPU timings on a shared VM vary.

    python final_project/results/session30/cpu_load_ab.py CKPT_FOLDER --trees .gpu,. --rounds 3 > OUT.jsonl
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys, time
from pathlib import Path
from fms.bench.startup import evict_page_cache, page_cache_fraction
from fms.models import get_model
from fms.utils import serialization
paths = sorted(Path(sys.argv[1]).glob("*.safetensors"))
dropped = evict_page_cache(paths)
cached = page_cache_fraction(paths)
reads, load = [], serialization.load_hf_checkpoint
def timed(*args, **kwargs):
    t = time.perf_counter(); load(*args, **kwargs); reads.append(time.perf_counter() - t)
serialization.load_hf_checkpoint = timed
t = time.perf_counter()
get_model("hf_pretrained", model_path=sys.argv[1])
total = time.perf_counter() - t
nbytes = sum(p.stat().st_size for p in paths)
print(json.dumps({"dropped": dropped, "page_cached_at_start": cached, "get_model_s": total, "read_s": reads[0],
                  "read_gb_per_s": nbytes / reads[0] / 1e9, "bytes": nbytes}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder")
    parser.add_argument("--trees", default=".gpu,.")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    for round_ in range(args.rounds):
        for tree in args.trees.split(","):
            tree = Path(tree).resolve()
            commit = (tree / "COMMIT").read_text().strip() if (tree / "COMMIT").is_file() else subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True, text=True).stdout.strip()
            out = subprocess.run([sys.executable, "-c", CHILD, args.folder], capture_output=True, text=True,
                                 cwd=tree, env=dict(os.environ, PYTHONPATH=str(tree)), timeout=600)
            row = {"round": round_, "tree": tree.name, "commit": commit, "returncode": out.returncode}
            row.update(json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else
                       {"stderr_tail": out.stderr[-1500:]})
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
