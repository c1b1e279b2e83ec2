"""Accuracy, speed and memory of one model on MMLU / TruthfulQA (or summarization), default vs paged attention.

    python scripts/eval.py --task mmlu --data path/to/mmlu/test --mode both --output results/mmlu.json
    python scripts/eval.py --task truthfulqa_mc2 --data mc_task.json --model_path ckpt/ --mode paged

Data is read from local files only (see fms/resources/eval/README.md for the layouts). The work is
fms.eval.report.run_eval.
"""

import argparse
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fms.eval.report import MODE_CHOICES, TASK_NAMES, EvalConfig, run_eval


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", default="both", choices=MODE_CHOICES,
                   help="default = sdpa attention, paged = paged KV cache + FlexAttention, both = each, compared")
    p.add_argument("--architecture", default="llama", help="llama, granite, granite_hybrid or hf_pretrained")
    p.add_argument("--variant", default=None, help="e.g. micro, 3.2-1b (default: micro without --model_path)")
    p.add_argument("--model_path", default=None, help="HF checkpoint folder (config.json + safetensors)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.json / tokenizer.model or a folder (default: the one in --model_path, else shipped)")
    p.add_argument("--task", default="mmlu", help=f"one of: {', '.join(TASK_NAMES)}")
    p.add_argument("--data", default=None, help="local data file or folder (never downloaded)")
    p.add_argument("--fewshot_data", default=None, help="dev split to take few-shot examples from")
    p.add_argument("--limit", type=int, default=None, help="first N questions of each subject")
    p.add_argument("--num_fewshot", type=int, default=0)
    p.add_argument("--fewshot_seed", type=int, default=1234, help="draws few-shot examples when there is no dev split")
    p.add_argument("--batch_size", type=int, default=8, help="model inputs per forward")
    p.add_argument("--device_type", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="bf16, fp16 or fp32 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--page_size", type=int, default=16, help="paged mode's page size in tokens")
    p.add_argument("--seed", type=int, default=0, help="random weights' seed (no --model_path)")
    p.add_argument("--max_new_tokens", type=int, default=64, help="summarization only")
    p.add_argument("--no_warmup", action="store_true",
                   help="skip the untimed warm-up batches (timings then include compilation)")
    p.add_argument("--output", default=None, help="write every metric to this JSON file")
    p.add_argument("--log_samples", action="store_true", help="add per-question log-likelihoods to the JSON")
    p.add_argument("--wandb", action="store_true", help="log to Weights & Biases (offline unless configured)")
    p.add_argument("--wandb_project", default="fms-eval")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    """Run the evaluation; returns the report. Raises EvalError (a ValueError) on bad input."""
    args = parse_args(argv)
    options = {k: v for k, v in vars(args).items() if k not in ("no_warmup", "no_progress")}
    return run_eval(EvalConfig(**options, warmup=not args.no_warmup, progress=not args.no_progress))


def cli(argv=None) -> int:
    try:
        main(argv)
    except (ValueError, FileNotFoundError) as e:  # EvalError, and model / tokenizer set-up errors
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
