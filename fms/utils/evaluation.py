"""Multiple-choice accuracy evaluation: log-likelihood scoring through any attention op, tasks, local data.

Scoring follows lm-evaluation-harness: a request is a (context, continuation) pair and its score is
the summed log-probability of the continuation tokens given the context. The model always runs
through the cache driver protocol (create_cache -> add -> prepare -> model(cache=, meta=) -> free),
so `--mode default` (sdpa) and `--mode paged` (paged KV cache + FlexAttention) execute the same code
apart from the attention op. Each request is scored in two steps over one cache:

    tokens:  c0 c1 c2 c3 | k0 k1 k2          context c*, continuation k*
    step 1:  c0 c1 c2 c3                       logits at c3 only   -> log p(k0)
    step 2:               k0 k1                logits at k0, k1    -> log p(k1), log p(k2)

so the vocabulary-sized logits exist only for continuation tokens, and step 2 attends to context
that is already in the (paged) cache. Requests that share their input (MMLU's four one-token answers
share the whole prompt) are run once.

Data is read from local files only; nothing is downloaded.
"""

import csv
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch

from fms.modules.attention import get_attention_op

# mode name (what users pick) -> attention op that runs it
MODES = {"default": "sdpa", "paged": "paged"}

SAMPLE_DATA_DIR = Path(__file__).resolve().parent.parent / "resources" / "eval"
DATA_SUFFIXES = (".json", ".jsonl", ".parquet")
MMLU_LETTERS = ("A", "B", "C", "D")
MMLU_COLUMNS = ("question", "A", "B", "C", "D", "answer")


class EvalError(ValueError):
    """A problem the user can fix (bad task name, flags, request); the message says what and how."""


class EvalDataError(EvalError):
    """A data file that is missing, empty or malformed; the message names the file, row and field."""


# ---------------------------------------------------------------------------------------------
# tokenization, the lm-evaluation-harness way
# ---------------------------------------------------------------------------------------------
def encode_pair(tokenizer, context: str, continuation: str, add_bos: bool | None = None) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) for a causal LM.

    Trailing spaces of the context move to the continuation (" A" scores the space with the
    letter). The whole string is encoded once and split at the context's length, so the
    continuation gets the ids it has in running text. An empty context becomes one BOS (or EOS).
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    if context:
        whole = tokenizer.encode(context + continuation, add_bos=add_bos)
        context_ids = tokenizer.encode(context, add_bos=add_bos)
        if context_ids:
            return context_ids, whole[len(context_ids):]
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    continuation_ids = tokenizer.encode(continuation, add_bos=False)
    if prefix is None:
        if len(continuation_ids) < 2:
            raise EvalError("an empty context needs a BOS or EOS token to condition on, and this tokenizer has neither")
        return continuation_ids[:1], continuation_ids[1:]
    return [prefix], continuation_ids


# ---------------------------------------------------------------------------------------------
# scoring
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenRequest:
    context: tuple[int, ...]
    continuation: tuple[int, ...]


@dataclass
class ScoreRun:
    """What one scoring pass returns: results in request order plus what it cost."""

    results: list[tuple[float, bool]]  # (log-likelihood, is_greedy) per request
    request_batch: list[int | None]  # the forward batch that computed each request (None: nothing to run)
    batch_seconds: list[float]
    input_tokens: int  # tokens run through the model (after sharing identical inputs)
    num_rows: int  # distinct model inputs
    peak_cache: dict = field(default_factory=dict)  # cache.memory_stats() at the fullest step


@dataclass
class _Row:
    """One model input: the context, then the continuation minus its last token."""

    context: tuple[int, ...]
    extension: tuple[int, ...]
    requests: list[int] = field(default_factory=list)

    @property
    def length(self) -> int:
        return len(self.context) + len(self.extension)


def _synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _build_rows(requests: Sequence[TokenRequest], vocab_size: int, max_len: int) -> list[_Row]:
    rows: dict[tuple, _Row] = {}
    for i, req in enumerate(requests):
        context, continuation = tuple(req.context), tuple(req.continuation)
        if not context:
            raise EvalError(f"request {i} has an empty context: give at least one token (e.g. BOS)")
        if len(continuation) > max_len:
            raise EvalError(
                f"request {i} has a continuation of {len(continuation)} tokens, over the model's context of "
                f"{max_len} tokens"
            )
        bad = [t for t in context + continuation if not 0 <= t < vocab_size]
        if bad:
            raise EvalError(
                f"request {i} has token ids outside the model's vocabulary [0, {vocab_size}): {bad[:5]}; "
                f"the tokenizer does not match the model (pass the model's own --tokenizer)"
            )
        if not continuation:
            continue  # scores 0.0 and is trivially greedy; nothing to run
        # keep the newest tokens when the input exceeds the context, as lm-eval does
        context = context[-(max_len - len(continuation) + 1):]
        key = (context, continuation[:-1])
        if key not in rows:
            rows[key] = _Row(context, continuation[:-1])
        rows[key].requests.append(i)
    return list(rows.values())


@torch.no_grad()
def score_requests(
    model,
    requests: Sequence[TokenRequest],
    attn_name: str = "sdpa",
    batch_size: int = 8,
    cache_options: dict | None = None,
    warmup: bool = False,
    progress: bool = False,
    desc: str | None = None,
) -> ScoreRun:
    """Log-likelihood and is_greedy of each continuation given its context.

    Rows run longest first, `batch_size` per forward; each batch's sequences are freed from the
    cache after it. With warmup, the first and last batches run once, untimed, before the timed
    pass (CUDA compilation of the attention kernels).
    """
    if batch_size < 1:
        raise EvalError(f"batch_size must be >= 1, got {batch_size}")
    op = get_attention_op(attn_name)
    config = model.config
    device = model.embedding.weight.device
    rows = _build_rows(requests, config.vocab_size, config.max_position_embeddings)
    results: list[tuple[float, bool]] = [(0.0, True)] * len(requests)
    request_batch: list[int | None] = [None] * len(requests)
    run = ScoreRun(results, request_batch, [], 0, len(rows))
    if not rows:
        return run
    order = sorted(range(len(rows)), key=lambda r: -rows[r].length)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    cache = op.create_cache(
        model.cache_spec(), max_batch_size=min(batch_size, len(rows)),
        max_seq_len=max(row.length for row in rows), **(cache_options or {}),
    )
    if warmup:
        # the longest and the shortest batch: two shapes, so torch.compile has made its shapes dynamic
        for batch in {0: batches[0], len(batches) - 1: batches[-1]}.values():
            _score_batch(model, op, cache, [rows[r] for r in batch], requests, device)

    from tqdm.auto import tqdm

    for b, batch in enumerate(tqdm(batches, desc=desc or attn_name, disable=not progress, file=sys.stderr)):
        _synchronize(device)
        start = time.perf_counter()
        scores, stats = _score_batch(model, op, cache, [rows[r] for r in batch], requests, device)
        _synchronize(device)
        run.batch_seconds.append(time.perf_counter() - start)
        run.input_tokens += sum(rows[r].length for r in batch)
        if stats["kv_bytes_in_use"] >= run.peak_cache.get("kv_bytes_in_use", -1):
            run.peak_cache = stats
        for i, score in scores.items():
            results[i] = score
            request_batch[i] = b
    return run


def _score_batch(model, op, cache, rows: list[_Row], requests, device) -> tuple[dict[int, tuple[float, bool]], dict]:
    seq_ids = list(range(len(rows)))
    for seq_id in seq_ids:
        cache.add(seq_id)
    try:
        # step 1: every context, logits at its last token only
        meta = cache.prepare(seq_ids, [len(row.context) for row in rows])
        tokens = _right_padded([row.context for row in rows], meta.query_len, device)
        last = torch.tensor([len(row.context) - 1 for row in rows], device=device)
        first = model(tokens, attn_name=op.name, logits_positions=last, cache=cache, meta=meta)
        first = first[:, 0].float().log_softmax(dim=-1)  # (B, V)
        # step 2: continuations longer than one token, logits at every fed token
        extended = [s for s in seq_ids if rows[s].extension]
        rest = None
        if extended:
            meta = cache.prepare(extended, [len(rows[s].extension) for s in extended])
            tokens = _right_padded([rows[s].extension for s in extended], meta.query_len, device)
            rest = model(tokens, attn_name=op.name, cache=cache, meta=meta).float().log_softmax(dim=-1)  # (B2, T, V)
        stats = cache.memory_stats().as_dict()
    finally:
        for seq_id in seq_ids:
            cache.free(seq_id)

    row_in_rest = {s: k for k, s in enumerate(extended)}
    logprobs, greedy, owners = [], [], []
    for s, row in enumerate(rows):
        m = len(row.extension) + 1
        row_logp = first[s:s + 1]
        if m > 1:
            row_logp = torch.cat([row_logp, rest[row_in_rest[s], : m - 1]])  # (m, V)
        targets = torch.tensor([requests[i].continuation for i in row.requests], device=device)  # (R, m)
        picked = row_logp[torch.arange(m, device=device)[None, :], targets]  # (R, m)
        logprobs.append(picked.sum(dim=-1))
        greedy.append((row_logp.argmax(dim=-1)[None, :] == targets).all(dim=-1))
        owners += row.requests
    values = torch.cat(logprobs).tolist()
    is_greedy = torch.cat(greedy).tolist()
    return {i: (v, g) for i, v, g in zip(owners, values, is_greedy)}, stats


def _right_padded(seqs: Sequence[Sequence[int]], width: int, device) -> torch.Tensor:
    return torch.tensor([list(s) + [0] * (width - len(s)) for s in seqs], dtype=torch.long, device=device)


# ---------------------------------------------------------------------------------------------
# tasks
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskSpec:
    name: str
    family: str  # which loader and prompt format: "mmlu" or "truthfulqa"
    metric: str  # "acc": the top-scored choice is a true one; "mc2": probability mass on true choices


TASKS = {
    "mmlu": TaskSpec("mmlu", "mmlu", "acc"),
    "truthfulqa_mc1": TaskSpec("truthfulqa_mc1", "truthfulqa", "acc"),
    "truthfulqa_mc2": TaskSpec("truthfulqa_mc2", "truthfulqa", "mc2"),
}


def get_task(name: str) -> TaskSpec:
    try:
        return TASKS[name]
    except KeyError:
        raise EvalError(f"unknown task {name!r}; allowed: {', '.join(sorted(TASKS))}") from None


@dataclass(frozen=True)
class MultipleChoiceItem:
    question: str
    choices: tuple[str, ...]
    labels: tuple[int, ...]  # 1 for a true answer
    subject: str
    source: str = ""  # "file row N", for messages

    @property
    def gold(self) -> int:
        return self.labels.index(1)


@dataclass(frozen=True)
class Question:
    """One item turned into a prompt: the context every choice is scored after."""

    item: MultipleChoiceItem
    context: str
    continuations: tuple[str, ...]


def _mmlu_text(item: MultipleChoiceItem) -> str:
    lines = [item.question.strip()] + [f"{letter}. {choice}" for letter, choice in zip(MMLU_LETTERS, item.choices)]
    return "\n".join(lines) + "\nAnswer:"


def _truthfulqa_text(item: MultipleChoiceItem) -> str:
    return f"Q: {item.question.strip()}\nA:"


def _format(task: TaskSpec, item: MultipleChoiceItem, shots: Sequence[MultipleChoiceItem]) -> Question:
    if task.family == "mmlu":
        # lm-eval's mmlu template: a description line, solved examples, then "Answer:" and " A".." D"
        topic = item.subject.replace("_", " ")
        head = f"The following are multiple choice questions (with answers) about {topic}.\n\n"
        solved = "".join(f"{_mmlu_text(s)} {MMLU_LETTERS[s.gold]}\n\n" for s in shots)
        return Question(item, head + solved + _mmlu_text(item), tuple(f" {letter}" for letter in MMLU_LETTERS))
    solved = "".join(f"{_truthfulqa_text(s)} {s.choices[s.gold]}\n\n" for s in shots)
    return Question(item, solved + _truthfulqa_text(item), tuple(f" {c}" for c in item.choices))


def build_questions(
    task: TaskSpec,
    items: Sequence[MultipleChoiceItem],
    num_fewshot: int = 0,
    dev: dict[str, list[MultipleChoiceItem]] | None = None,
    seed: int = 1234,
) -> list[Question]:
    """Prompts for `items` with `num_fewshot` solved examples each.

    Examples come from `dev[subject]` when there is one (its first num_fewshot, as lm-eval does for
    MMLU), else from the other items of the same subject, drawn with a generator seeded by
    (seed, subject, item index) so every run and every mode sees the same prompts.
    """
    if num_fewshot < 0:
        raise EvalError(f"num_fewshot must be >= 0, got {num_fewshot}")
    dev = dev or {}
    by_subject: dict[str, list[MultipleChoiceItem]] = {}
    for item in items:
        by_subject.setdefault(item.subject, []).append(item)
    questions = []
    for item in items:
        shots: list[MultipleChoiceItem] = []
        if num_fewshot:
            pool = dev.get(item.subject)
            if pool:
                if len(pool) < num_fewshot:
                    raise EvalError(
                        f"num_fewshot={num_fewshot} but the dev split of {item.subject!r} has {len(pool)} examples"
                    )
                shots = list(pool[:num_fewshot])
            else:
                same = by_subject[item.subject]
                index = same.index(item)
                others = same[:index] + same[index + 1:]
                if len(others) < num_fewshot:
                    raise EvalError(
                        f"num_fewshot={num_fewshot} but subject {item.subject!r} has no dev split and only "
                        f"{len(others)} other items to draw examples from; pass a dev split with --fewshot_data"
                    )
                shots = random.Random(f"{seed}:{item.subject}:{index}").sample(others, num_fewshot)
        questions.append(_format(task, item, shots))
    return questions


# ---------------------------------------------------------------------------------------------
# data loading (local files only)
# ---------------------------------------------------------------------------------------------
@dataclass
class TaskData:
    items: list[MultipleChoiceItem]
    dev: dict[str, list[MultipleChoiceItem]]  # few-shot pools per subject from a dev split; may be empty
    source: str


def default_data_dir(task: str) -> Path:
    """Where data is looked for without --data: $FMS_EVAL_DATA/<mmlu|truthfulqa> (default ~/.cache/fms/eval)."""
    root = Path(os.environ.get("FMS_EVAL_DATA", "~/.cache/fms/eval")).expanduser()
    return root / get_task(task).family


def sample_data_path(task: str) -> Path:
    """The few hand-written items shipped with fms (for demos and tests, not for measuring a model)."""
    return SAMPLE_DATA_DIR / ("mmlu" if get_task(task).family == "mmlu" else "truthfulqa_mc.json")


def load_task_data(task: str, path: str | os.PathLike | None = None, fewshot_path: str | os.PathLike | None = None,
                   limit: int | None = None) -> TaskData:
    """Items of `task` from local files; `limit` keeps the first N items of each subject (as lm-eval's --limit)."""
    spec = get_task(task)
    if limit is not None and limit < 1:
        raise EvalError(f"limit must be >= 1, got {limit}")
    if path is None:
        path = default_data_dir(task)
        if not path.exists() or (path.is_dir() and not any(path.iterdir())):
            what = "MMLU CSVs (<subject>_test.csv)" if spec.family == "mmlu" else "TruthfulQA mc_task.json"
            raise EvalDataError(
                f"no data path: put {what} in {path} or pass --data PATH; this tool never downloads "
                f"(a few sample items ship in {sample_data_path(task)})"
            )
    path = Path(path).expanduser()
    if not path.exists():
        raise EvalDataError(f"data path {path} does not exist")
    loader = _load_mmlu if spec.family == "mmlu" else (lambda p: _load_truthfulqa(p, spec.name))
    items, dev = loader(path)
    if fewshot_path is not None:
        fewshot_path = Path(fewshot_path).expanduser()
        if not fewshot_path.exists():
            raise EvalDataError(f"few-shot data path {fewshot_path} does not exist")
        shots, _ = loader(fewshot_path)
        dev = {}
        for item in shots:
            dev.setdefault(item.subject, []).append(item)
    if limit is not None:
        kept: dict[str, int] = {}
        limited = []
        for item in items:
            if kept.get(item.subject, 0) < limit:
                kept[item.subject] = kept.get(item.subject, 0) + 1
                limited.append(item)
        items = limited
    return TaskData(items, dev, str(path))


def _data_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in DATA_SUFFIXES)


def _one_data_file(folder: Path, what: str, preferred: Sequence[str] = ()) -> Path:
    for name in preferred:
        if (folder / name).is_file():
            return folder / name
    files = _data_files(folder)
    if not files:
        raise EvalDataError(f"no {what} data in {folder}: expected {' or '.join(DATA_SUFFIXES)} files")
    if len(files) > 1:
        raise EvalDataError(
            f"{folder} holds several data files ({', '.join(p.name for p in files)}); pass one of them with --data"
        )
    return files[0]


# -- MMLU --------------------------------------------------------------------------------------
def _load_mmlu(path: Path) -> tuple[list[MultipleChoiceItem], dict[str, list[MultipleChoiceItem]]]:
    """A folder of <subject>_test.csv (optionally beside <subject>_dev.csv, or the release's test/ and
    dev/ folders), one such CSV, or a JSON/JSONL/parquet export (question, subject, choices, answer)."""
    if path.is_file():
        if path.suffix == ".csv":
            items = _read_mmlu_csv(path, _subject_of(path))
            dev_file = path.with_name(f"{_subject_of(path)}_dev.csv")
            dev = {items[0].subject: _read_mmlu_csv(dev_file, items[0].subject)} if dev_file.is_file() else {}
            return items, dev
        return _read_mmlu_export(path), {}
    test_dir = path / "test" if (path / "test").is_dir() and not list(path.glob("*_test.csv")) else path
    tests = sorted(test_dir.glob("*_test.csv"))
    if not tests:
        export = _one_data_file(path, "MMLU", ()) if _data_files(path) else None
        if export is None:
            raise EvalDataError(
                f"no MMLU data in {path}: expected <subject>_test.csv files (question,A,B,C,D,answer, no header) "
                f"or one {'/'.join(DATA_SUFFIXES)} export with fields question, subject, choices, answer"
            )
        return _read_mmlu_export(export), {}
    items, dev = [], {}
    for test_file in tests:
        subject = _subject_of(test_file)
        items += _read_mmlu_csv(test_file, subject)
        for dev_file in (test_dir / f"{subject}_dev.csv", test_dir.parent / "dev" / f"{subject}_dev.csv"):
            if dev_file.is_file():
                dev[subject] = _read_mmlu_csv(dev_file, subject)
                break
    return items, dev


def _subject_of(csv_path: Path) -> str:
    stem = csv_path.stem
    for split in ("_test", "_dev", "_val"):
        if stem.endswith(split):
            return stem[: -len(split)]
    return stem


def _read_mmlu_csv(path: Path, subject: str) -> list[MultipleChoiceItem]:
    items = []
    with open(path, newline="", encoding="utf-8") as f:
        for number, row in enumerate(csv.reader(f), start=1):
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            where = f"{path} row {number}"
            if len(row) != len(MMLU_COLUMNS):
                raise EvalDataError(
                    f"{where}: expected {len(MMLU_COLUMNS)} columns ({','.join(MMLU_COLUMNS)}, no header), "
                    f"got {len(row)}"
                )
            question, *choices, answer = row
            answer_index = _mmlu_answer(answer, where)
            items.append(_mmlu_item(question, choices, answer_index, subject, where))
    if not items:
        raise EvalDataError(f"{path} holds no questions")
    return items


def _mmlu_answer(value, where: str) -> int:
    if isinstance(value, str) and value.strip().upper() in MMLU_LETTERS:
        return MMLU_LETTERS.index(value.strip().upper())
    if not isinstance(value, (bool, str)):
        try:
            index = int(value)
        except (TypeError, ValueError):
            index = -1
        if index == value and 0 <= index < len(MMLU_LETTERS):
            return index
    hint = " (MMLU CSVs have no header row)" if str(value).strip().lower() == "answer" else ""
    raise EvalDataError(f"{where}: field 'answer' must be a letter A-D or an index 0-3, got {value!r}{hint}")


def _mmlu_item(question, choices, answer: int, subject: str, where: str) -> MultipleChoiceItem:
    if not isinstance(question, str) or not question.strip():
        raise EvalDataError(f"{where}: field 'question' must be a non-empty string, got {question!r}")
    if len(choices) != len(MMLU_LETTERS):
        raise EvalDataError(f"{where}: field 'choices' must hold {len(MMLU_LETTERS)} answers, got {len(choices)}")
    for k, choice in enumerate(choices):
        if not isinstance(choice, str):
            raise EvalDataError(f"{where}: choice {MMLU_LETTERS[k]} must be a string, got {choice!r}")
    labels = tuple(int(k == answer) for k in range(len(choices)))
    return MultipleChoiceItem(question, tuple(choices), labels, subject, where)


def _read_mmlu_export(path: Path) -> list[MultipleChoiceItem]:
    items = []
    for where, record in _read_records(path):
        for key in ("question", "choices", "answer"):
            if key not in record:
                raise EvalDataError(f"{where}: missing field {key!r} (expected question, subject, choices, answer)")
        choices = record["choices"]
        if isinstance(choices, (str, bytes)) or not isinstance(choices, Iterable):
            raise EvalDataError(f"{where}: field 'choices' must be a list of {len(MMLU_LETTERS)} strings")
        subject = record.get("subject") or path.stem
        if not isinstance(subject, str):
            raise EvalDataError(f"{where}: field 'subject' must be a string, got {subject!r}")
        answer = _mmlu_answer(record["answer"], where)
        items.append(_mmlu_item(record["question"], list(choices), answer, subject, where))
    if not items:
        raise EvalDataError(f"{path} holds no questions")
    # group by subject (first appearance order is kept inside each subject)
    return sorted(items, key=lambda item: item.subject)


# -- TruthfulQA --------------------------------------------------------------------------------
def _load_truthfulqa(path: Path, task: str) -> tuple[list[MultipleChoiceItem], dict]:
    """The original mc_task.json ({answer: 0/1} targets) or the HF multiple_choice layout
    ({choices: [...], labels: [...]}), as JSON, JSONL or parquet."""
    if path.is_dir():
        path = _one_data_file(path, "TruthfulQA", ("mc_task.json", "truthfulqa_mc.json"))
    targets_key = "mc1_targets" if task == "truthfulqa_mc1" else "mc2_targets"
    items = []
    for where, record in _read_records(path):
        question = record.get("question")
        if not isinstance(question, str) or not question.strip():
            raise EvalDataError(f"{where}: field 'question' must be a non-empty string, got {question!r}")
        if targets_key not in record:
            raise EvalDataError(f"{where}: missing field {targets_key!r}")
        choices, labels = _truthfulqa_targets(record[targets_key], f"{where} field {targets_key!r}")
        if task == "truthfulqa_mc1" and sum(labels) != 1:
            raise EvalDataError(f"{where} field {targets_key!r}: needs exactly one true answer, got {sum(labels)}")
        if task == "truthfulqa_mc2" and not any(labels):
            raise EvalDataError(f"{where} field {targets_key!r}: needs at least one true answer")
        subject = record.get("category") if isinstance(record.get("category"), str) else "truthfulqa"
        items.append(MultipleChoiceItem(question, choices, labels, subject, where))
    if not items:
        raise EvalDataError(f"{path} holds no questions")
    return items, {}


def _truthfulqa_targets(targets, where: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    if not isinstance(targets, dict) or not targets:
        raise EvalDataError(f"{where}: expected a non-empty object, got {type(targets).__name__}")
    if set(targets) == {"choices", "labels"} and not isinstance(targets["choices"], str):
        choices, labels = list(targets["choices"]), list(targets["labels"])
        if len(choices) != len(labels):
            raise EvalDataError(f"{where}: {len(choices)} choices but {len(labels)} labels")
    else:
        choices, labels = list(targets), list(targets.values())
    if not choices:
        raise EvalDataError(f"{where}: no answers")
    for choice, label in zip(choices, labels):
        if not isinstance(choice, str) or not choice.strip():
            raise EvalDataError(f"{where}: answers must be non-empty strings, got {choice!r}")
        if isinstance(label, bool) or label not in (0, 1):
            raise EvalDataError(f"{where}: label of {choice!r} must be 0 or 1, got {label!r}")
    return tuple(choices), tuple(int(label) for label in labels)


# -- record files --------------------------------------------------------------------------------
def _read_records(path: Path) -> list[tuple[str, dict]]:
    """(location for messages, record) pairs from a JSON list, JSON lines, or parquet file."""
    if path.suffix == ".parquet":
        records = [(f"{path} row {i + 1}", r) for i, r in enumerate(_read_parquet(path))]
    else:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".jsonl" or (path.suffix == ".json" and _looks_like_json_lines(text)):
            records = []
            for number, line in enumerate(text.splitlines(), start=1):
                if line.strip():
                    try:
                        records.append((f"{path} line {number}", json.loads(line)))
                    except json.JSONDecodeError as e:
                        raise EvalDataError(f"{path} line {number} is not valid JSON: {e.msg}") from None
        elif path.suffix == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise EvalDataError(f"{path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
            if not isinstance(data, list):
                raise EvalDataError(f"{path} holds a JSON {type(data).__name__}; expected a list of records")
            records = [(f"{path} record {i + 1}", r) for i, r in enumerate(data)]
        else:
            raise EvalDataError(f"cannot read {path}: expected a {', '.join(DATA_SUFFIXES)} or .csv file")
    for where, record in records:
        if not isinstance(record, dict):
            raise EvalDataError(f"{where}: expected an object, got {type(record).__name__}")
    return records


def _looks_like_json_lines(text: str) -> bool:
    lines = [line for line in text.splitlines() if line.strip()]
    return len(lines) > 1 and all(line.lstrip().startswith("{") and line.rstrip().endswith("}") for line in lines)


def _read_parquet(path: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise EvalDataError(f"reading {path} needs pyarrow: pip install pyarrow (or export it as JSONL)") from None
    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for a bad file
        raise EvalDataError(f"{path} is not a readable parquet file: {e}") from None


# ---------------------------------------------------------------------------------------------
# running a task in one or more modes
# ---------------------------------------------------------------------------------------------
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
) -> ModeResult:
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
    cache_options = {"page_size": page_size} if attn_name == "paged" else {}
    start = time.perf_counter()
    run = score_requests(model, flat, attn_name, batch_size, cache_options, warmup=warmup, progress=progress,
                         desc=f"{task.name} [{mode}]")
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
) -> tuple[list[Question], list[ModeResult], dict]:
    """Score `items` in each mode over identical prompts.

    Returns (questions, per-mode results, comparison of the first two modes or {}).
    """
    spec = get_task(task)
    if not items:
        raise EvalDataError("no questions to evaluate (the data, after --limit, is empty)")
    questions = build_questions(spec, items, num_fewshot, dev, seed)
    encoded = encode_questions(tokenizer, questions, add_bos)
    results = [run_mode(model, spec, questions, encoded, mode, batch_size, page_size, warmup, progress)
               for mode in modes]
    return questions, results, compare_modes(*results[:2]) if len(results) > 1 else {}
