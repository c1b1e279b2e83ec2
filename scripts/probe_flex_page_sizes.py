"""Which FlexAttention kernel options compile and run a chunked prefill over small pages (CUDA).

Writes probe_flex_page_sizes.json under $OUT (default: the current folder). The work is fms.bench.flex_probe.
"""

import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fms.bench.flex_probe import probe_flex_page_sizes


def main(argv=None) -> int:
    try:
        probe_flex_page_sizes(os.environ.get("OUT", "."))
    except RuntimeError as exc:
        print(f"probe_flex_page_sizes.py: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
