"""One evaluation run as scripts/eval.py runs it: its config, the model, each mode's metrics, the table and report."""

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fms.eval.data import load_task_data
from fms.eval.modes import MODES, evaluate
from fms.eval.tasks import TASKS, EvalDataError, EvalError
from fms.modules.attention import get_attention_op

TASK_NAMES = sorted([*TASKS, "summarization"])
MODE_CHOICES = [*MODES, "both"]


@dataclass
class EvalConfig:
    """What to evaluate and how; checked on creation (EvalError, a ValueError, names the bad value)."""

    mode: str = "both"
    architecture: str = "llama"
    variant: str | None = None
    model_path: str | None = None
    tokenizer: str | None = None
    task: str = "mmlu"
    data: str | None = None
    fewshot_data: str | None = None
    limit: int | None = None
    num_fewshot: int = 0
    fewshot_seed: int = 1234
    batch_size: int = 8
    device_type: str = "cpu"
    dtype: str | None = None
    page_size: int = 16
    seed: int = 0
    max_new_tokens: int = 64
    warmup: bool = True
    output: str | None = None
    log_samples: bool = False
    wandb: bool = False
    wandb_project: str = "fms-eval"
    progress: bool = True
    timing_repeats: int = 1
    share_context: bool = True  # answers to one question share its context where the cache can fork (paged)

    def __post_init__(self):
        if self.task not in TASK_NAMES:
            raise EvalError(f"unknown task {self.task!r}; allowed: {', '.join(TASK_NAMES)}")
        if self.mode not in MODE_CHOICES:
            raise EvalError(f"unknown mode {self.mode!r}; allowed: {', '.join(MODE_CHOICES)}")
        for name in ("batch_size", "limit", "max_new_tokens", "timing_repeats"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise EvalError(f"--{name} must be >= 1, got {value}")
        if self.timing_repeats > 1 and self.task == "summarization":
            raise EvalError(f"--timing_repeats applies to multiple-choice tasks; summarization times one pass, "
                            f"got --timing_repeats {self.timing_repeats}")
        if not isinstance(self.share_context, bool):
            raise EvalError(f"share_context must be True or False, got {self.share_context!r}")
        if self.num_fewshot < 0:
            raise EvalError(f"--num_fewshot must be >= 0, got {self.num_fewshot}")

    @property
    def modes(self) -> list[str]:
        return list(MODES) if self.mode == "both" else [self.mode]


def build_model(config: EvalConfig):
    """(model, tokenizer, description); random weights unless model_path."""
    from fms.models import get_model
    from fms.utils.tokenizers import get_tokenizer

    architecture = "hf_pretrained" if config.model_path and config.architecture == "llama" and not config.variant \
        else config.architecture
    variant = config.variant or (None if config.model_path else "micro")
    model = get_model(architecture, variant, model_path=config.model_path, device_type=config.device_type,
                      data_type=config.dtype, seed=config.seed)
    tokenizer_path = config.tokenizer
    if tokenizer_path is None and config.model_path and any(
        (Path(config.model_path) / name).is_file() for name in ("tokenizer.json", "tokenizer.model")
    ):
        tokenizer_path = config.model_path
    tokenizer = get_tokenizer(tokenizer_path)
    if config.model_path is None:
        print(f"note: {architecture}/{variant} has random weights; its scores mean nothing", file=sys.stderr)
    described = {"architecture": architecture, "variant": variant, "model_path": config.model_path,
                 "tokenizer": tokenizer_path or "default", "dtype": str(model.embedding.weight.dtype).split(".")[-1],
                 "device": str(model.embedding.weight.device),
                 "num_parameters": sum(p.numel() for p in model.parameters())}
    return model, tokenizer, described


def run_multiple_choice(config: EvalConfig) -> dict:
    data = load_task_data(config.task, config.data, config.fewshot_data, config.limit)
    model, tokenizer, described = build_model(config)
    questions, results, comparison = evaluate(
        model, tokenizer, config.task, data.items, config.modes, num_fewshot=config.num_fewshot, dev=data.dev,
        batch_size=config.batch_size, page_size=config.page_size, seed=config.fewshot_seed,
        warmup=config.warmup, progress=config.progress, timing_repeats=config.timing_repeats,
        share_context=config.share_context,
    )
    report = {"task": config.task, "data": data.source, "model": described,
              "modes": {r.mode: r.metrics for r in results}, "comparison": comparison}
    if config.log_samples:
        report["samples"] = [
            {"source": q.item.source, "subject": q.item.subject, "labels": list(q.item.labels),
             **{f"{r.mode}_loglikelihoods": r.loglikelihoods[i] for r in results},
             **{f"{r.mode}_prediction": r.predictions[i] for r in results}}
            for i, q in enumerate(questions)
        ]
    return report


def run_summarization(config: EvalConfig) -> dict:
    from fms.eval.summarization import load_summarization_data, summarize_and_score

    if config.data is None:
        raise EvalDataError("no data path: pass --data PATH (a local summarization file); this tool never downloads")
    if not Path(config.data).expanduser().exists():
        raise EvalDataError(f"data path {config.data} does not exist")
    examples = load_summarization_data(config.data)[: config.limit]
    model, tokenizer, described = build_model(config)
    report = {"task": "summarization", "data": config.data, "model": described, "modes": {}, "comparison": {}}
    outputs = {}
    is_cuda = model.embedding.weight.is_cuda
    for mode in config.modes:
        attn_name = MODES[mode]
        options = get_attention_op(attn_name).cache_kwargs(page_size=config.page_size)
        if is_cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        metrics = summarize_and_score(model, tokenizer, examples, attn_name, config.max_new_tokens,
                                      batch_size=config.batch_size, **options)
        if is_cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        outputs[mode] = metrics.pop("predictions")
        if not config.log_samples:  # per-example lists stay out of the report unless asked for
            metrics = {k: v for k, v in metrics.items() if not isinstance(v, list)}
        metrics.update(
            attn_name=attn_name, num_examples=len(examples), elapsed_s=elapsed,
            latency_ms=1000 * elapsed / len(examples), qps=len(examples) / elapsed if elapsed > 0 else None,
            peak_gpu_memory_gb=torch.cuda.max_memory_allocated() / 1e9 if is_cuda else None,
        )
        report["modes"][mode] = metrics
    if len(outputs) == 2:
        a, b = outputs.values()
        report["comparison"] = {"modes": list(outputs), "identical_outputs": sum(x == y for x, y in zip(a, b)) / len(a)}
    return report


def _fmt(value, digits=4):
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


TABLE_ROWS = (("accuracy", "accuracy", 4), ("accuracy (subject mean)", "accuracy_macro", 4),
              ("latency (ms / query)", "latency_ms", 1), ("QPS", "qps", 2), ("input tokens run", "input_tokens", 0),
              ("input tokens / s", "input_tokens_per_s", 1),
              ("peak GPU memory (GB)", "peak_gpu_memory_gb", 3), ("ROUGE-1", "rouge1", 4), ("ROUGE-2", "rouge2", 4),
              ("ROUGE-L", "rougeL", 4), ("BLEU", "bleu", 2), ("questions", "num_questions", 0),
              ("examples", "num_examples", 0))


def format_table(report: dict) -> str:
    modes = list(report["modes"])
    width = max(14, *(len(m) + 2 for m in modes))
    lines = [f"task {report['task']}  model {report['model']['architecture']}/{report['model']['variant']}  "
             f"{report['model']['dtype']} on {report['model']['device']}",
             f"{'metric':<26}" + "".join(f"{m:>{width}}" for m in modes)]
    for label, key, digits in TABLE_ROWS:
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
        ratio = comparison.get("latency_ratio")
        if ratio and len(ratio["runs"]) > 1:
            ci = ratio["ci95"]
            first, second = comparison["modes"]
            lines.append(f"{second}/{first} latency per batch: median of {len(ratio['runs'])} interleaved pairs "
                         f"{ratio['median']:.3f}" + (f", 95% interval {ci[0]:.3f}-{ci[1]:.3f}" if ci else
                                                     " (no interval below 6 pairs)"))
    elif "identical_outputs" in comparison:
        lines.append(f"{' vs '.join(comparison['modes'])}: identical outputs on {comparison['identical_outputs']:.2%}")
    return "\n".join(lines)


def wandb_summary(report: dict) -> dict:
    """Every number of the report under mode/metric (and mode/accuracy/subject, comparison/...)."""
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
    return summary


def run_eval(config: EvalConfig) -> dict:
    """Run the evaluation, print the table, write the JSON and log to wandb as asked; returns the report."""
    report = run_summarization(config) if config.task == "summarization" else run_multiple_choice(config)
    report["config"] = {k: v for k, v in asdict(config).items() if k not in ("output", "progress")}
    report["device"] = {"type": config.device_type, "torch": torch.__version__}
    if config.device_type.startswith("cuda") and torch.cuda.is_available():
        report["device"]["name"] = torch.cuda.get_device_name(torch.device(config.device_type))
    print(format_table(report))
    if config.output:
        out = Path(config.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out}", file=sys.stderr)
    if config.wandb:
        from fms.bench.wandb_log import log_summary

        log_summary(wandb_summary(report), report["config"], config.wandb_project,
                    f"{report['task']}-{'-'.join(report['modes'])}",
                    str(Path(config.output).resolve().parent) if config.output else None, job_type="eval")
    return report
