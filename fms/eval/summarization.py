"""Summarization evaluation: load CNN/DailyMail- or XSum-style data, generate "TL;DR:" summaries, score them.

    examples = load_summarization_data("news.jsonl")          # [{"id", "article", "summary"}, ...]
    result = summarize_and_score(model, tokenizer, examples, attn_name="paged", max_new_tokens=64, page_size=16)
    result["rouge1"], result["rouge2"], result["rougeL"], result["bleu"], result["predictions"]

Metrics are on each library's own scale: ROUGE F1 in [0, 1] (`rouge-score`, Porter stemming),
BLEU in [0, 100] (`sacrebleu` corpus BLEU, its default 13a tokenization).
"""

import csv
import json
import time
from pathlib import Path

import torch

from fms.utils.generation import generate

# (article field, reference summary field) of the layouts we read: CNN/DailyMail, XSum.
ARTICLE_FIELDS = ("article", "document")
SUMMARY_FIELDS = ("highlights", "summary")
PROMPT_SUFFIX = "\nTL;DR:"  # GPT-2's zero-shot summarization cue (Radford et al. 2019)
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
_FIELDS_HELP = f"fields {' or '.join(ARTICLE_FIELDS)} (the text) and {' or '.join(SUMMARY_FIELDS)} (the reference)"


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------
def load_summarization_data(path) -> list[dict]:
    """Examples from a local file, as [{"id": id or None, "article": str, "summary": str}, ...].

    Files: a JSON list of objects, JSON lines (one object per line), or CSV with a header row.
    Each record needs an article (`article` or `document`) and a reference summary (`highlights`
    or `summary`), both non-empty strings. Malformed data raises ValueError naming the file,
    the record and what is wrong.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"summarization data file {path} does not exist")
    if path.suffix.lower() == ".csv":
        records = _read_csv(path)
    else:
        records = _read_json(path)
    if not records:
        raise ValueError(f"{path} holds no examples")
    return [_example(record, where) for where, record in records]


def _read_json(path: Path) -> list[tuple[str, object]]:
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return _read_json_lines(path, text)
    if isinstance(data, dict):  # a file holding one record
        data = [data]
    if not isinstance(data, list):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}; expected a list of objects with {_FIELDS_HELP}")
    return [(f"{path} record {i}", record) for i, record in enumerate(data)]


def _read_json_lines(path: Path, text: str) -> list[tuple[str, object]]:
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((f"{path} line {number}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {number} is not valid JSON ({e}); expected a JSON list of objects "
                             "or JSON lines (one object per line)") from None
    return records


def _read_csv(path: Path) -> list[tuple[str, object]]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        if not any(name in header for name in ARTICLE_FIELDS) or not any(name in header for name in SUMMARY_FIELDS):
            raise ValueError(f"{path}: the CSV header {header} lacks {_FIELDS_HELP}")
        # row 1 is the header
        return [(f"{path} row {number}", row) for number, row in enumerate(reader, start=2)]


def _example(record, where: str) -> dict:
    """where: the record's location for messages, e.g. "news.jsonl line 3"."""
    if not isinstance(record, dict):
        raise ValueError(f"{where} is a {type(record).__name__}, not an object with {_FIELDS_HELP}")
    out = {"id": record.get("id")}
    for key, names in (("article", ARTICLE_FIELDS), ("summary", SUMMARY_FIELDS)):
        name = next((n for n in names if n in record), None)
        if name is None:
            raise ValueError(f"{where} has no {' or '.join(names)} field; it has {sorted(record)}")
        value = record[name]
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{where}: field {name!r} must be a non-empty string, got {value!r:.60}")
        out[key] = value.strip()
    return out


# ---------------------------------------------------------------------------------------------
# scoring
# ---------------------------------------------------------------------------------------------
def _metric_libraries():
    try:
        import sacrebleu
        from rouge_score import rouge_scorer
    except ImportError as e:
        raise ImportError(
            f"summarization scoring needs rouge-score and sacrebleu ({e}); "
            "install them with `pip install rouge-score sacrebleu` (or `pip install -e '.[test]'`)"
        ) from None
    return rouge_scorer, sacrebleu


def score_summaries(predictions: list[str], references: list[str]) -> dict:
    """Mean ROUGE-1/2/L F1 over examples ([0, 1]) and corpus BLEU ([0, 100]), plus per-example ROUGE."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"need as many predictions as references (>= 1), got {len(predictions)} and {len(references)}")
    rouge_scorer, sacrebleu = _metric_libraries()
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    per_example = [
        {name: score.fmeasure for name, score in scorer.score(reference, prediction).items()}
        for prediction, reference in zip(predictions, references)
    ]
    out = {name: sum(e[name] for e in per_example) / len(per_example) for name in ROUGE_TYPES}
    out["bleu"] = sacrebleu.corpus_bleu(list(predictions), [list(references)]).score
    out["per_example"] = per_example
    return out


# ---------------------------------------------------------------------------------------------
# generation + scoring
# ---------------------------------------------------------------------------------------------
def build_prompt(tokenizer, article: str, max_prompt_tokens: int) -> list[int]:
    """article + "\\nTL;DR:" as token ids; the article (not the cue) is cut to fit max_prompt_tokens."""
    cue = tokenizer.encode(PROMPT_SUFFIX, add_bos=False)
    ids = tokenizer.encode(article)
    room = max_prompt_tokens - len(cue)
    if room < 1:
        raise ValueError(f"max_prompt_tokens={max_prompt_tokens} leaves no room for the article next to the "
                         f"{len(cue)}-token TL;DR cue")
    return ids[:room] + cue


@torch.no_grad()
def summarize_and_score(
    model,
    tokenizer,
    examples: list[dict],
    attn_name: str | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 1,
    max_prompt_tokens: int | None = None,
    **generate_options,
) -> dict:
    """Greedy "TL;DR:" summaries of `examples` (from load_summarization_data), scored against their references.

    attn_name: the attention op (sdpa / flex / paged; default the model's). batch_size prompts run
    per generate() call. Articles are cut so that prompt + max_new_tokens fits the model's context
    (or max_prompt_tokens). generate_options go to fms.utils.generation.generate (e.g. page_size=,
    prefill_chunk_size=). Generation stops at the tokenizer's (else the model's) EOS token.

    Returns: rouge1, rouge2, rougeL (mean F1, [0, 1]), bleu (corpus, [0, 100]), num_examples,
    inference_ms_mean, new_tokens_per_s, peak_gpu_memory_bytes (None off CUDA), kv_cache (peak cache
    statistics of the last batch), predictions, references and per_example (ROUGE, inference_ms,
    prompt_tokens, new_tokens; inference_ms is the batch's time shared equally by its examples).
    """
    if not examples:
        raise ValueError("examples is empty: give at least one {'article', 'summary'} example")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    _metric_libraries()  # fail before generating, not after
    examples = [_example(e, f"examples[{i}]") for i, e in enumerate(examples)]
    context = model.config.max_position_embeddings
    limit = context - max_new_tokens if max_prompt_tokens is None else min(max_prompt_tokens, context - max_new_tokens)
    prompts = [build_prompt(tokenizer, e["article"], limit) for e in examples]
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else model.config.eos_token_id
    device = model.embedding.weight.device
    is_cuda = device.type == "cuda"
    if is_cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)

    outputs, times_ms, kv_stats = [], [], {}
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start: start + batch_size]
        if is_cuda:
            torch.cuda.synchronize(device)
        began = time.perf_counter()
        new_ids, kv_stats = generate(model, batch, max_new_tokens, attn_name=attn_name, eos_token_id=eos,
                                     return_stats=True, **generate_options)
        if is_cuda:
            torch.cuda.synchronize(device)
        elapsed_ms = 1000 * (time.perf_counter() - began)
        outputs += new_ids
        times_ms += [elapsed_ms / len(batch)] * len(batch)

    predictions = [tokenizer.decode(ids).strip() for ids in outputs]  # special tokens (EOS) are skipped
    references = [e["summary"] for e in examples]
    scores = score_summaries(predictions, references)
    per_example = [
        dict(rouge, inference_ms=ms, prompt_tokens=len(p), new_tokens=len(o))
        for rouge, ms, p, o in zip(scores.pop("per_example"), times_ms, prompts, outputs)
    ]
    total_s = sum(times_ms) / 1000
    return {
        **scores,
        "num_examples": len(examples),
        "attn_name": attn_name or model.attn_name,
        "inference_ms_mean": sum(times_ms) / len(times_ms),
        "new_tokens_per_s": sum(len(o) for o in outputs) / total_s if total_s > 0 else None,
        "peak_gpu_memory_bytes": torch.cuda.max_memory_allocated(device) if is_cuda else None,
        "kv_cache": kv_stats,
        "predictions": predictions,
        "references": references,
        "per_example": per_example,
    }
