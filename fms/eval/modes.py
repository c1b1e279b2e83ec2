"""Running a multiple-choice task in one or more modes (attention ops) over identical prompts, and comparing them."""

import time
from dataclasses import dataclass
from typing import Sequence

import torch

from fms.bench.timing import median, median_interval
from fms.eval.scoring import TokenRequest, encode_pair, score_requests
from fms.eval.tasks import EvalDataError, EvalError, MultipleChoiceItem, Question, TaskSpec, build_questions, get_task
from fms.modules.attention import get_attention_op

# mode name (what users pick) -> attention op that runs it
MODES = {"default": "sdpa", "paged": "paged"}


@dataclass
class ModeResult:
    mode: str
    metrics: dict
    loglikelihoods: list[list[float]]  # per question, per choice
    predictions: list[int]  # per question: index of the highest-scored choice


def encode_questions(tokenizer, questions: Sequence[Question], add_bos: bool | None = None) -> list[list[TokenRequest]]:
    encoded = []
    for q in questions:
        pairs = [encode_pair(tokenizer, q.context, c, add_bos) for c in q.continuations]
        encoded.append([TokenRequest(tuple(ctx), tuple(cont)) for ctx, cont in pairs])
    return encoded


def choice_scores(task: TaskSpec, item: MultipleChoiceItem, loglikelihoods: Sequence[float]) -> tuple[int, float]:
    """(predicted choice, score in [0, 1]) of one question."""
    prediction = max(range(len(loglikelihoods)), key=lambda k: loglikelihoods[k])  # first of ties, as np.argmax
    if task.metric == "acc":
        return prediction, float(item.labels[prediction] == 1)
    # mc2: normalized probability of the true answers
    probs = torch.tensor(loglikelihoods, dtype=torch.float64).softmax(dim=0)
    return prediction, float(probs[torch.tensor(item.labels, dtype=torch.bool)].sum())


def run_mode(
    model,
    task: TaskSpec,
    questions: Sequence[Question],
    encoded: Sequence[Sequence[TokenRequest]],
    mode: str,
    batch_size: int = 8,
    page_size: int = 16,
    warmup: bool = True,
    progress: bool = False,
    share_context: bool = True,
) -> ModeResult:
    """Score every request of the questions in one mode. share_context: answers to one question share its context
    where the mode's cache can fork a sequence (paged); False runs each answer's context (the default mode's work)."""
    if mode not in MODES:
        raise EvalError(f"unknown mode {mode!r}; allowed: {', '.join(MODES)}")
    if not questions:
        raise EvalDataError("no questions to evaluate")
    attn_name = MODES[mode]
    device = model.embedding.weight.device
    flat = [req for reqs in encoded for req in reqs]
    owner = [q for q, reqs in enumerate(encoded) for _ in reqs]
    is_cuda = device.type == "cuda"
    if is_cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    cache_options = get_attention_op(attn_name).cache_kwargs(page_size=page_size)
    start = time.perf_counter()
    run = score_requests(model, flat, attn_name, batch_size, cache_options, warmup=warmup, progress=progress,
                         desc=f"{task.name} [{mode}]", share_context=None if share_context else False)
    elapsed = sum(run.batch_seconds)
    wall = time.perf_counter() - start
    peak_gb = torch.cuda.max_memory_allocated(device) / 1e9 if is_cuda else None

    loglikelihoods: list[list[float]] = [[] for _ in questions]
    batches_of: list[set[int]] = [set() for _ in questions]
    for (ll, _), q, b in zip(run.results, owner, run.request_batch):
        loglikelihoods[q].append(ll)
        if b is not None:
            batches_of[q].add(b)
    predictions, scores = [], []
    per_subject: dict[str, list[float]] = {}
    for q, question in enumerate(questions):
        prediction, score = choice_scores(task, question.item, loglikelihoods[q])
        predictions.append(prediction)
        scores.append(score)
        per_subject.setdefault(question.item.subject, []).append(score)
    # a question's latency: the forward batches that computed its choices
    latencies = [sum(run.batch_seconds[b] for b in batches) for batches in batches_of]
    metrics = {
        "attn_name": attn_name,
        "metric": task.metric,
        "accuracy": sum(scores) / len(scores),
        "accuracy_macro": sum(sum(v) / len(v) for v in per_subject.values()) / len(per_subject),
        "per_subject": {
            s: {"accuracy": sum(v) / len(v), "num_questions": len(v)} for s, v in sorted(per_subject.items())
        },
        "num_questions": len(questions),
        "num_requests": len(flat),
        "num_forward_rows": run.num_rows,
        "num_batches": len(run.batch_seconds),
        "input_tokens": run.input_tokens,
        "shared_context": run.shared_context,
        "elapsed_s": elapsed,
        "wall_s": wall,
        "latency_ms": 1000 * sum(latencies) / len(latencies),
        "qps": len(questions) / elapsed if elapsed > 0 else None,
        "input_tokens_per_s": run.input_tokens / elapsed if elapsed > 0 else None,
        "peak_gpu_memory_gb": peak_gb,
        "peak_kv_cache": run.peak_cache,
    }
    return ModeResult(mode, metrics, loglikelihoods, predictions)


def compare_modes(first: ModeResult, second: ModeResult) -> dict:
    """How far two modes agree: same answer picked per question, largest per-choice log-likelihood gap."""
    same = [a == b for a, b in zip(first.predictions, second.predictions)]
    gaps = [abs(a - b) for la, lb in zip(first.loglikelihoods, second.loglikelihoods) for a, b in zip(la, lb)]
    return {
        "modes": [first.mode, second.mode],
        "answer_agreement": sum(same) / len(same),
        "num_disagreements": len(same) - sum(same),
        "max_abs_loglikelihood_diff": max(gaps) if gaps else 0.0,
        "accuracy_diff": second.metrics["accuracy"] - first.metrics["accuracy"],
    }


def evaluate(
    model,
    tokenizer,
    task: str,
    items: Sequence[MultipleChoiceItem],
    modes: Sequence[str] = ("default", "paged"),
    num_fewshot: int = 0,
    dev: dict | None = None,
    batch_size: int = 8,
    page_size: int = 16,
    seed: int = 1234,
    add_bos: bool | None = None,
    warmup: bool = True,
    progress: bool = False,
    timing_repeats: int = 1,
    share_context: bool = True,
) -> tuple[list[Question], list[ModeResult], dict]:
    """Score `items` in each mode over identical prompts.

    timing_repeats: timed passes per mode, the modes interleaved (A B A B ...) so that a drift of the
    machine's speed falls on both; each mode's timing metrics are those of its median pass (by elapsed
    time), with every pass's in latency_ms_runs. Every pass must score the same (checked).
    share_context: see run_mode (False: every mode runs every answer's context).
    Returns (questions, per-mode results, comparison of the first two modes or {}).
    """
    if isinstance(timing_repeats, bool) or not isinstance(timing_repeats, int) or timing_repeats < 1:
        raise ValueError(f"timing_repeats must be an int >= 1, got {timing_repeats!r}")
    spec = get_task(task)
    if not items:
        raise EvalDataError("no questions to evaluate (the data, after --limit, is empty)")
    questions = build_questions(spec, items, num_fewshot, dev, seed)
    encoded = encode_questions(tokenizer, questions, add_bos)
    passes: dict[str, list[ModeResult]] = {mode: [] for mode in modes}
    for r in range(timing_repeats):
        for mode in modes:
            passes[mode].append(run_mode(model, spec, questions, encoded, mode, batch_size, page_size,
                                         warmup and r == 0, progress, share_context))
    results = [_median_pass(runs) for runs in passes.values()]
    if len(results) < 2:
        return questions, results, {}
    comparison = compare_modes(*results[:2])
    comparison["latency_ratio"] = paired_latency_ratio(*(passes[m] for m in modes[:2]))
    return questions, results, comparison


def paired_latency_ratio(first: list[ModeResult], second: list[ModeResult]) -> dict:
    """second / first latency per repeat (the passes ran interleaved, so each pair shares the machine's
    state of its moment): every ratio, their median, and a distribution-free 95% interval for the
    median (None below 6 repeats)."""
    ratios = [b.metrics["latency_ms"] / a.metrics["latency_ms"] for a, b in zip(first, second)]
    interval = median_interval(ratios)
    return {"runs": ratios, "median": median(ratios), "ci95": list(interval) if interval else None}


TIMING_KEYS = ("elapsed_s", "wall_s", "latency_ms", "qps", "input_tokens_per_s")


def _median_pass(runs: list[ModeResult]) -> ModeResult:
    """The first pass's scores with the timing metrics of the pass of median elapsed time."""
    first = runs[0]
    for other in runs[1:]:
        if other.loglikelihoods != first.loglikelihoods:
            raise RuntimeError(f"mode {first.mode}: a repeated pass scored differently from the first")
    median = sorted(runs, key=lambda r: r.metrics["elapsed_s"])[(len(runs) - 1) // 2]
    metrics = {**first.metrics, **{k: median.metrics[k] for k in TIMING_KEYS}}
    metrics["latency_ms_runs"] = [r.metrics["latency_ms"] for r in runs]
    return ModeResult(first.mode, metrics, first.loglikelihoods, first.predictions)
