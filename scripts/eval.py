"""Accuracy, speed and memory of one model on MMLU / TruthfulQA (or summarization), default vs paged attention.

    python scripts/eval.py --task mmlu --data path/to/mmlu/test --mode both --output results/mmlu.json
    python scripts/eval.py --task truthfulqa_mc2 --data mc_task.json --model_path ckpt/ --mode paged

Data is read from local files only (see fms/resources/eval/README.md for the layouts).
"""

import argparse
import inspect
import json
import os
import sys
import time
from pathlib import Path

import torch

from fms.utils import evaluation
from fms.utils.evaluation import EvalDataError, EvalError

TASK_NAMES = sorted([*evaluation.TASKS, "summarization"])
MODE_CHOICES = list(evaluation.MODES) + ["both"]


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


# ---------------------------------------------------------------------------------------------
def _build_model(args):
    from fms.models import get_model
    from fms.utils.tokenizers import get_tokenizer

    architecture = "hf_pretrained" if args.model_path and args.architecture == "llama" and not args.variant \
        else args.architecture
    variant = args.variant or (None if args.model_path else "micro")
    model = get_model(architecture, variant, model_path=args.model_path, device_type=args.device_type,
                      data_type=args.dtype, seed=args.seed)
    tokenizer_path = args.tokenizer
    if tokenizer_path is None and args.model_path and any(
        (Path(args.model_path) / name).is_file() for name in ("tokenizer.json", "tokenizer.model")
    ):
        tokenizer_path = args.model_path
    tokenizer = get_tokenizer(tokenizer_path)
    if args.model_path is None:
        print(f"note: {architecture}/{variant} has random weights; its scores mean nothing", file=sys.stderr)
    described = {"architecture": architecture, "variant": variant, "model_path": args.model_path,
                 "tokenizer": tokenizer_path or "default", "dtype": str(model.embedding.weight.dtype).split(".")[-1],
                 "device": str(model.embedding.weight.device),
                 "num_parameters": sum(p.numel() for p in model.parameters())}
    return model, tokenizer, described


def _device_info(device_type: str) -> dict:
    info = {"type": device_type, "torch": torch.__version__}
    if device_type.startswith("cuda") and torch.cuda.is_available():
        info["name"] = torch.cuda.get_device_name(torch.device(device_type))
    return info


def _run_multiple_choice(args, modes):
    data = evaluation.load_task_data(args.task, args.data, args.fewshot_data, args.limit)
    model, tokenizer, described = _build_model(args)
    questions, results, comparison = evaluation.evaluate(
        model, tokenizer, args.task, data.items, modes, num_fewshot=args.num_fewshot, dev=data.dev,
        batch_size=args.batch_size, page_size=args.page_size, seed=args.fewshot_seed,
        warmup=not args.no_warmup, progress=not args.no_progress,
    )
    report = {
        "task": args.task,
        "data": data.source,
        "model": described,
        "modes": {r.mode: r.metrics for r in results},
        "comparison": comparison,
    }
    if args.log_samples:
        report["samples"] = [
            {
                "source": q.item.source,
                "subject": q.item.subject,
                "labels": list(q.item.labels),
                **{f"{r.mode}_loglikelihoods": r.loglikelihoods[i] for r in results},
                **{f"{r.mode}_prediction": r.predictions[i] for r in results},
            }
            for i, q in enumerate(questions)
        ]
    return report


def _load_summarization():
    try:
        from fms.utils import summarization
    except ImportError as e:
        raise EvalError(
            f"--task summarization needs fms.utils.summarization, which is not available here ({e}); "
            f"use --task {' or '.join(sorted(evaluation.TASKS))}"
        ) from None
    missing = [name for name in ("load_summarization_data", "summarize_and_score") if not hasattr(summarization, name)]
    if missing:
        raise EvalError(f"fms.utils.summarization lacks {', '.join(missing)}; it cannot run --task summarization")
    return summarization


def _run_summarization(args, modes):
    summarization = _load_summarization()
    if args.data is None:
        raise EvalDataError("no data path: pass --data PATH (a local summarization file); this tool never downloads")
    if not Path(args.data).expanduser().exists():
        raise EvalDataError(f"data path {args.data} does not exist")
    examples = list(summarization.load_summarization_data(args.data))
    if args.limit is not None:
        examples = examples[: args.limit]
    if not examples:
        raise EvalDataError(f"{args.data} holds no examples")
    model, tokenizer, described = _build_model(args)
    accepted = inspect.signature(summarization.summarize_and_score).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    report = {"task": "summarization", "data": args.data, "model": described, "modes": {}, "comparison": {}}
    outputs = {}
    for mode in modes:
        attn_name = evaluation.MODES[mode]
        extra = {"batch_size": args.batch_size}
        if attn_name == "paged":
            extra["page_size"] = args.page_size
        extra = {k: v for k, v in extra.items() if takes_any or k in accepted}
        is_cuda = model.embedding.weight.is_cuda
        if is_cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        result = summarization.summarize_and_score(model, tokenizer, examples, attn_name, args.max_new_tokens, **extra)
        if is_cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        metrics = dict(result) if isinstance(result, dict) else {"result": result}
        outputs[mode] = next((metrics.pop(k) for k in ("predictions", "summaries")
                              if isinstance(metrics.get(k), list)), None)
        if not args.log_samples:  # per-example lists stay out of the report unless asked for
            metrics = {k: v for k, v in metrics.items() if not isinstance(v, list)}
        metrics.update(
            attn_name=attn_name, num_examples=len(examples), elapsed_s=elapsed,
            latency_ms=1000 * elapsed / len(examples), qps=len(examples) / elapsed if elapsed > 0 else None,
            peak_gpu_memory_gb=torch.cuda.max_memory_allocated() / 1e9 if is_cuda else None,
        )
        report["modes"][mode] = metrics
    if len(modes) == 2 and all(outputs[m] is not None for m in modes):
        a, b = (outputs[m] for m in modes)
        same = sum(x == y for x, y in zip(a, b))
        report["comparison"] = {"modes": list(modes), "identical_outputs": same / max(len(a), 1)}
    return report


# ---------------------------------------------------------------------------------------------
def _fmt(value, digits=4):
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def format_table(report: dict) -> str:
    modes = list(report["modes"])
    width = max(14, *(len(m) + 2 for m in modes))
    rows = [("accuracy", "accuracy", 4), ("accuracy (subject mean)", "accuracy_macro", 4),
            ("latency (ms / query)", "latency_ms", 1), ("QPS", "qps", 2), ("input tokens / s", "input_tokens_per_s", 1),
            ("peak GPU memory (GB)", "peak_gpu_memory_gb", 3), ("ROUGE-1", "rouge1", 4), ("ROUGE-2", "rouge2", 4),
            ("ROUGE-L", "rougeL", 4), ("BLEU", "bleu", 2), ("questions", "num_questions", 0),
            ("examples", "num_examples", 0)]
    lines = [f"task {report['task']}  model {report['model']['architecture']}/{report['model']['variant']}  "
             f"{report['model']['dtype']} on {report['model']['device']}"]
    lines.append(f"{'metric':<26}" + "".join(f"{m:>{width}}" for m in modes))
    for label, key, digits in rows:
        if any(key in report["modes"][m] for m in modes):
            cells = (_fmt(report["modes"][m].get(key), digits) for m in modes)
            lines.append(f"{label:<26}" + "".join(f"{cell:>{width}}" for cell in cells))
    subjects = report["modes"][modes[0]].get("per_subject", {})
    if len(subjects) > 1:
        lines.append("per subject:")
        for subject, entry in subjects.items():
            label = f"  {subject} ({entry['num_questions']})"
            lines.append(f"{label:<26}" + "".join(
                f"{_fmt(report['modes'][m]['per_subject'][subject]['accuracy']):>{width}}" for m in modes))
    comparison = report.get("comparison") or {}
    if "answer_agreement" in comparison:
        lines.append(
            f"{' vs '.join(comparison['modes'])}: same answer on {comparison['answer_agreement']:.2%} of questions "
            f"({comparison['num_disagreements']} differ); max |log-likelihood diff| "
            f"{comparison['max_abs_loglikelihood_diff']:.3g}"
        )
    elif "identical_outputs" in comparison:
        lines.append(f"{' vs '.join(comparison['modes'])}: identical outputs on {comparison['identical_outputs']:.2%}")
    return "\n".join(lines)


def _log_wandb(report: dict, project: str, output: str | None):
    try:
        import wandb
    except ImportError:
        print("warning: --wandb needs the wandb package (pip install wandb); results were not logged there",
              file=sys.stderr)
        return
    # offline unless the user has configured W&B (WANDB_MODE or an API key); sync later with `wandb sync`
    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    run = wandb.init(project=project, mode=mode, job_type="eval", config=report["config"],
                     dir=str(Path(output).resolve().parent) if output else None,
                     name=f"{report['task']}-{'-'.join(report['modes'])}")
    summary = {}
    for mode_name, metrics in report["modes"].items():
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                summary[f"{mode_name}/{key}"] = value
        for subject, entry in metrics.get("per_subject", {}).items():
            summary[f"{mode_name}/accuracy/{subject}"] = entry["accuracy"]
    for key, value in (report.get("comparison") or {}).items():
        if isinstance(value, (int, float)):
            summary[f"comparison/{key}"] = value
    run.log(summary)
    run.summary.update(summary)
    run.finish()


def main(argv=None) -> dict:
    """Run the evaluation; returns the report. Raises EvalError (a ValueError) on bad input."""
    args = parse_args(argv)
    if args.task not in TASK_NAMES:
        raise EvalError(f"unknown task {args.task!r}; allowed: {', '.join(TASK_NAMES)}")
    for name in ("batch_size", "limit", "max_new_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise EvalError(f"--{name} must be >= 1, got {value}")
    if args.num_fewshot < 0:
        raise EvalError(f"--num_fewshot must be >= 0, got {args.num_fewshot}")
    modes = list(evaluation.MODES) if args.mode == "both" else [args.mode]
    runner = _run_summarization if args.task == "summarization" else _run_multiple_choice
    report = runner(args, modes)
    report["config"] = {k: v for k, v in vars(args).items() if k not in ("output", "no_progress")}
    report["device"] = _device_info(args.device_type)
    print(format_table(report))
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out}", file=sys.stderr)
    if args.wandb:
        _log_wandb(report, args.wandb_project, args.output)
    return report


def cli(argv=None) -> int:
    try:
        main(argv)
    except (ValueError, FileNotFoundError) as e:  # EvalError, and model / tokenizer set-up errors
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
