"""Issue 19's table of targets in one command: each row runs an existing benchmark as a child process, reads its
JSON and says whether the target is met. Same as `fms bench targets`; the flags live in fms.entrypoints.bench_cli,
the work in fms.bench.targets.

    python scripts/bench_targets.py --output results/targets.json                  # every row, one after another
    python scripts/bench_targets.py --rows serving-1b,batch1-1b,eval-fp32 --timeout 540 --output results/a.json
    python scripts/bench_targets.py --from-results results/a.json results/b.json --output results/targets.json

Without CUDA the rows run tiny stand-ins (llama micro, granite_hybrid h-nano) and the targets read n/a (CPU).
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fms.entrypoints import bench_cli  # noqa: E402


def main(argv=None):
    return bench_cli.targets_main(argv, program=("python", "scripts/bench_targets.py"))


if __name__ == "__main__":
    main()
