"""Accuracy, speed and memory of one model on MMLU / TruthfulQA (or summarization), default vs paged attention.

    python scripts/eval.py --task mmlu --data path/to/mmlu/test --mode both --output results/mmlu.json
    python scripts/eval.py --task truthfulqa_mc2 --data mc_task.json --model_path ckpt/ --mode paged

Data is read from local files only (see fms/resources/eval/README.md for the layouts). The work is
fms.eval.report.run_eval.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fms.entrypoints import bench_cli  # noqa: E402


def main(argv=None) -> dict:
    """Run the evaluation (same as `fms eval`); returns the report. Raises EvalError (a ValueError) on bad input."""
    return bench_cli.eval_main(argv)


def cli(argv=None) -> int:
    return bench_cli.eval_cli(argv)


if __name__ == "__main__":
    sys.exit(cli())
