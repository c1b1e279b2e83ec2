"""Multiple-choice tasks: the task registry, items, few-shot prompt formatting, and the errors users can fix."""

import random
from dataclasses import dataclass
from typing import Sequence

MMLU_LETTERS = ("A", "B", "C", "D")


class EvalError(ValueError):
    """A problem the user can fix (bad task name, flags, request); the message says what and how."""


class EvalDataError(EvalError):
    """A data file that is missing, empty or malformed; the message names the file, row and field."""



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


