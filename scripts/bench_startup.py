"""Engine start-up by phase, cold and warm, each model in two fresh processes (issue 19). Same as
`fms bench startup`; the flags live in fms.entrypoints.bench_cli, the work in fms.bench.startup.

    python scripts/bench_startup.py --output results/startup.json     # CUDA: llama 3.2-1b, 3.1-8b, granite 4.0-h-1b
    python scripts/bench_startup.py --models llama:3.1-8b --timeout 270 --output results/startup_8b.json
    python scripts/bench_startup.py --no-compile --output results/startup_graphs_only.json   # graphs only

On CPU the default is llama:micro, a demo that checks the benchmark end to end in under a minute.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fms.entrypoints import bench_cli  # noqa: E402


def main(argv=None):
    return bench_cli.startup_main(argv, program=("python", "scripts/bench_startup.py"))


if __name__ == "__main__":
    main()
