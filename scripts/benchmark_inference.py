"""Benchmark static-batch inference per attention backend: `fms bench static` as a script (same flags).

    python scripts/benchmark_inference.py --help         # what it measures, the flags, examples
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fms.entrypoints import bench_cli  # noqa: E402


def main(argv=None) -> int:
    """Same as `fms bench static`; the flags live in fms.entrypoints.bench_cli."""
    return bench_cli.static_main(argv, program=("python", "scripts/benchmark_inference.py"))


if __name__ == "__main__":
    sys.exit(main())
