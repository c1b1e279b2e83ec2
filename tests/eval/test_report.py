"""scripts/eval.py end to end on the shipped items with llama 'nano': paged agrees with default; complete JSON."""

import json
import sys
import types
from pathlib import Path

import pytest

from tests.script_loader import load_script
from tests.utils.test_evaluation import LOGPROB_ATOL, build_tiny_tokenizer

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "fms" / "resources" / "eval"
MODE_METRICS = ("accuracy", "accuracy_macro", "per_subject", "num_questions", "latency_ms", "qps",
                "input_tokens_per_s", "peak_gpu_memory_gb", "peak_kv_cache", "attn_name")


@pytest.fixture(scope="module")
def eval_script():
    return load_script("eval")


@pytest.fixture(scope="module")
def model_args(tmp_path_factory):
    tokenizer = build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    # no warm-up batch: on CPU it only doubles the (eager FlexAttention) paged run
    return ["--architecture", "llama", "--variant", "nano", "--tokenizer", str(tokenizer), "--no_progress",
            "--no_warmup", "--device_type", "cpu"]


def test_mmlu_both_modes_agree_and_json_holds_every_metric(eval_script, model_args, tmp_path, capsys):
    out = tmp_path / "mmlu.json"
    report = eval_script.main(model_args + ["--task", "mmlu", "--data", str(SAMPLES / "mmlu"), "--mode", "both",
                                            "--num_fewshot", "1", "--batch_size", "8", "--output", str(out),
                                            "--log_samples"])
    saved = json.loads(out.read_text())
    assert saved["modes"].keys() == {"default", "paged"}
    for mode, attn_name in (("default", "sdpa"), ("paged", "paged")):
        metrics = saved["modes"][mode]
        assert set(MODE_METRICS) <= set(metrics)
        assert metrics["attn_name"] == attn_name and metrics["num_questions"] == 8
        assert set(metrics["per_subject"]) == {"astronomy", "computer_science"}
        assert metrics["peak_gpu_memory_gb"] is None  # CPU
        assert metrics["latency_ms"] > 0 and metrics["qps"] > 0 and metrics["input_tokens_per_s"] > 0
    comparison = saved["comparison"]
    assert comparison["answer_agreement"] == 1.0 and comparison["num_disagreements"] == 0
    assert comparison["max_abs_loglikelihood_diff"] < LOGPROB_ATOL
    for sample in saved["samples"]:
        assert sample["default_prediction"] == sample["paged_prediction"]
        assert max(abs(a - b) for a, b in zip(sample["default_loglikelihoods"], sample["paged_loglikelihoods"])) \
            < LOGPROB_ATOL
    assert saved["config"]["num_fewshot"] == 1 and report["task"] == "mmlu"
    table = capsys.readouterr().out
    assert "accuracy" in table and "same answer on 100.00% of questions" in table


@pytest.mark.parametrize("task", ["truthfulqa_mc1", "truthfulqa_mc2"])
def test_truthfulqa_one_mode_from_original_json(eval_script, model_args, task):
    report = eval_script.main(model_args + ["--task", task, "--data", str(SAMPLES / "truthfulqa_mc.json"),
                                            "--mode", "default", "--limit", "3"])
    metrics = report["modes"]["default"]
    assert metrics["num_questions"] == 3 and 0.0 <= metrics["accuracy"] <= 1.0
    assert metrics["metric"] == ("acc" if task == "truthfulqa_mc1" else "mc2")
    assert report["comparison"] == {}


def _error(eval_script, argv, capsys) -> str:
    assert eval_script.cli(argv) == 2
    return capsys.readouterr().err


def test_bad_input_gives_clear_errors(eval_script, model_args, tmp_path, monkeypatch, capsys):
    err = _error(eval_script, model_args + ["--task", "hellaswag", "--data", str(SAMPLES)], capsys)
    assert "unknown task 'hellaswag'; allowed: mmlu, summarization, truthfulqa_mc1, truthfulqa_mc2" in err

    monkeypatch.setenv("FMS_EVAL_DATA", str(tmp_path / "none"))
    err = _error(eval_script, model_args + ["--task", "mmlu"], capsys)
    assert "no data path: put MMLU CSVs" in err and "or pass --data PATH; this tool never downloads" in err

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "law_test.csv").write_text("q,a,b,c,d,A\nq,a,b,c,d\n")
    err = _error(eval_script, model_args + ["--task", "mmlu", "--data", str(bad)], capsys)
    assert "law_test.csv row 2: expected 6 columns" in err

    (bad / "law_test.csv").write_text("")
    err = _error(eval_script, model_args + ["--task", "mmlu", "--data", str(bad)], capsys)
    assert "law_test.csv holds no questions" in err

    err = _error(eval_script, model_args + ["--task", "mmlu", "--data", str(tmp_path / "missing")], capsys)
    assert "data path" in err and "does not exist" in err

    err = _error(eval_script, model_args + ["--task", "mmlu", "--data", str(SAMPLES / "mmlu"), "--batch_size", "0"],
                 capsys)
    assert "--batch_size must be >= 1, got 0" in err


def test_summarization_is_delegated_lazily(eval_script, model_args, tmp_path, monkeypatch, capsys):
    data = tmp_path / "news.jsonl"
    data.write_text("{}\n")
    import fms.utils

    monkeypatch.setitem(sys.modules, "fms.utils.summarization", None)  # as if the module were not there
    monkeypatch.delattr(fms.utils, "summarization", raising=False)  # set by any earlier import of it
    err = _error(eval_script, model_args + ["--task", "summarization", "--data", str(data)], capsys)
    assert "--task summarization needs fms.utils.summarization" in err

    calls = []
    fake = types.ModuleType("fms.utils.summarization")
    fake.load_summarization_data = lambda path: [{"document": "a b c", "summary": "a"}] * 2

    def summarize_and_score(model, tokenizer, examples, attn_name, max_new_tokens, batch_size=1, **kwargs):
        calls.append((attn_name, max_new_tokens, batch_size, kwargs))
        return {"rougeL": 0.5, "predictions": ["x", "y"]}

    fake.summarize_and_score = summarize_and_score
    monkeypatch.setitem(sys.modules, "fms.utils.summarization", fake)
    report = eval_script.main(model_args + ["--task", "summarization", "--data", str(data), "--max_new_tokens", "4",
                                            "--batch_size", "2"])
    assert calls == [("sdpa", 4, 2, {}), ("paged", 4, 2, {"page_size": 16})]
    assert report["modes"]["paged"]["rougeL"] == 0.5 and report["comparison"]["identical_outputs"] == 1.0


def test_wandb_is_optional(eval_script, model_args, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    assert eval_script.cli(model_args + ["--task", "mmlu", "--data", str(SAMPLES / "mmlu.jsonl"), "--mode", "default",
                                         "--limit", "1", "--wandb"]) == 0
    assert "--wandb needs the wandb package (pip install wandb)" in capsys.readouterr().err
