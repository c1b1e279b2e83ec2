"""GEMV timing and per-GPU tables: fms.bench.gemv (also `fms bench gemv`)."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from fms.bench.gemv import main  # noqa: E402

if __name__ == "__main__":
    main()
