"""Task data from local files only (MMLU CSV / exports, TruthfulQA JSON, JSONL, parquet); nothing is downloaded."""

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from fms.eval.tasks import MMLU_LETTERS, EvalDataError, EvalError, MultipleChoiceItem, get_task

SAMPLE_DATA_DIR = Path(__file__).resolve().parent.parent / "resources" / "eval"
DATA_SUFFIXES = (".json", ".jsonl", ".parquet")
MMLU_COLUMNS = ("question", "A", "B", "C", "D", "answer")


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


