"""`fms eval lm-eval`: lm-evaluation-harness on local data, on any machine (CPU included).

lm-eval's own `mmlu` task downloads its data set, and its CLI hands the model a CUDA device. Here the
model is built first (on CUDA when there is one, else the CPU, or --device) and handed to
lm_eval.simple_evaluate as an object (the "fms" model type of fms.eval.lm_eval_adapter), and the
task is a local lm-eval task file written next to a JSON-lines copy of the data (the shipped MMLU
sample by default, or your MMLU CSVs / export with --data), so nothing is downloaded:

    fms eval lm-eval --architecture llama --variant micro --tasks mmlu
    fms eval lm-eval /models/Llama-3.2-1B --tasks mmlu --data ~/data/mmlu --num-fewshot 5
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from fms.entrypoints.engine_args import add_model_arguments
from fms.entrypoints.model_loading import load_model

# our local task name per task asked for
LOCAL_TASKS = {"mmlu": "fms_mmlu_local"}
LETTERS = "ABCDEFGHIJ"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fms eval lm-eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--tasks", default="mmlu", help=f"comma list; one of {sorted(LOCAL_TASKS)}")
    p.add_argument("--data", default=None, help="MMLU CSV folder or JSON-lines export (default: the shipped sample)")
    p.add_argument("--limit", type=int, default=None, help="first N items of each subject")
    p.add_argument("--num-fewshot", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--attn-name", default="paged", help="attention op the scoring runs: sdpa, flex or paged")
    p.add_argument("--output", type=Path, default=None, help="write lm-eval's results as JSON here")
    return p


def write_local_task(folder: Path, data_path: str | None, limit: int | None) -> str:
    """A JSON-lines copy of the MMLU items and an lm-eval task file reading it; -> the task name."""
    from fms.eval.data import load_task_data, sample_data_path

    data = load_task_data("mmlu", data_path or sample_data_path("mmlu"), limit=limit)
    rows = folder / "mmlu.jsonl"
    with rows.open("w") as f:
        for item in data.items:
            f.write(json.dumps({"question": item.question, "choices": list(item.choices), "answer": item.gold,
                                "subject": item.subject}) + "\n")
    num_choices = max(len(item.choices) for item in data.items)
    choices = "\n".join(f"{LETTERS[i]}. {{{{choices[{i}]}}}}" for i in range(num_choices))
    name = LOCAL_TASKS["mmlu"]
    task = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(rows)}},
        "test_split": "test",
        "fewshot_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{question.strip()}}\n" + choices + "\nAnswer:",
        "doc_to_choice": list(LETTERS[:num_choices]),
        "doc_to_target": "answer",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }
    # lm-eval reads YAML; JSON is YAML
    (folder / f"{name}.yaml").write_text(json.dumps(task, indent=2))
    return name


def main(argv: list[str]) -> dict:
    args = parser().parse_args(argv)
    unknown = [t for t in args.tasks.split(",") if t and t not in LOCAL_TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; local tasks: {sorted(LOCAL_TASKS)}")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the data are local; never reach for the hub
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ValueError("lm-eval is not installed: pip install 'ibm-fms[eval]'") from None
    from fms.eval.lm_eval_adapter import FMSLM

    loaded = load_model(args.model, args.architecture, args.variant, args.tokenizer, args.device, args.dtype,
                        args.seed, args.revision)
    lm = FMSLM(model=loaded.model, tokenizer=loaded.tokenizer, attn_name=args.attn_name, batch_size=args.batch_size)
    with tempfile.TemporaryDirectory(prefix="fms-lm-eval-") as folder:
        name = write_local_task(Path(folder), args.data, args.limit)
        results = lm_eval.simple_evaluate(model=lm, tasks=[name], num_fewshot=args.num_fewshot,
                                          task_manager=TaskManager(include_path=folder), log_samples=False)
    print(lm_eval.utils.make_table(results))
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({k: results[k] for k in ("results", "configs", "versions")
                                           if k in results}, indent=2, default=str))
        print(f"wrote {args.output}", file=sys.stderr)
    return results
