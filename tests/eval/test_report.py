"""fms.eval.report (what scripts/eval.py runs) end to end on the shipped items with llama 'nano': paged agrees with
default; complete JSON; clear errors. One smoke test calls the script's cli(argv)."""

import json
import sys
from pathlib import Path

import pytest

from fms.eval.report import EvalConfig, run_eval
from fms.eval.tasks import EvalError
from tests.eval.test_evaluation import LOGPROB_ATOL, build_tiny_tokenizer

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "fms" / "resources" / "eval"
MODE_METRICS = ("accuracy", "accuracy_macro", "per_subject", "num_questions", "latency_ms", "qps",
                "input_tokens_per_s", "peak_gpu_memory_gb", "peak_kv_cache", "attn_name")


@pytest.fixture(scope="module")
def model_args(tmp_path_factory):
    tokenizer = build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    # no warm-up batch: on CPU it only doubles the (eager FlexAttention) paged run
    return dict(architecture="llama", variant="nano", tokenizer=str(tokenizer), progress=False, warmup=False,
                device_type="cpu")


def test_mmlu_both_modes_agree_and_json_holds_every_metric(model_args, tmp_path, capsys):
    out = tmp_path / "mmlu.json"
    report = run_eval(EvalConfig(**model_args, task="mmlu", data=str(SAMPLES / "mmlu"), mode="both", num_fewshot=1,
                                 batch_size=8, output=str(out), log_samples=True))
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
def test_truthfulqa_one_mode_from_original_json(model_args, task):
    report = run_eval(EvalConfig(**model_args, task=task, data=str(SAMPLES / "truthfulqa_mc.json"), mode="default",
                                 limit=3))
    metrics = report["modes"]["default"]
    assert metrics["num_questions"] == 3 and 0.0 <= metrics["accuracy"] <= 1.0
    assert metrics["metric"] == ("acc" if task == "truthfulqa_mc1" else "mc2")
    assert report["comparison"] == {}


def _error(model_args, **options) -> str:
    with pytest.raises((EvalError, ValueError, FileNotFoundError)) as exc:
        run_eval(EvalConfig(**{**model_args, **options}))
    return str(exc.value)


def test_bad_input_gives_clear_errors(model_args, tmp_path, monkeypatch):
    err = _error(model_args, task="hellaswag", data=str(SAMPLES))
    assert "unknown task 'hellaswag'; allowed: mmlu, summarization, truthfulqa_mc1, truthfulqa_mc2" in err
    assert "unknown mode 'fast'; allowed: default, paged, both" in _error(model_args, mode="fast")

    monkeypatch.setenv("FMS_EVAL_DATA", str(tmp_path / "none"))
    err = _error(model_args, task="mmlu")
    assert "no data path: put MMLU CSVs" in err and "or pass --data PATH; this tool never downloads" in err

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "law_test.csv").write_text("q,a,b,c,d,A\nq,a,b,c,d\n")
    assert "law_test.csv row 2: expected 6 columns" in _error(model_args, task="mmlu", data=str(bad))

    (bad / "law_test.csv").write_text("")
    assert "law_test.csv holds no questions" in _error(model_args, task="mmlu", data=str(bad))

    err = _error(model_args, task="mmlu", data=str(tmp_path / "missing"))
    assert "data path" in err and "does not exist" in err
    assert "--batch_size must be >= 1, got 0" in _error(model_args, task="mmlu", data=str(SAMPLES / "mmlu"),
                                                       batch_size=0)


def test_summarization_passes_each_mode_its_ops_cache_options(model_args, tmp_path, monkeypatch):
    data = tmp_path / "news.jsonl"
    data.write_text(json.dumps({"document": "a b c", "summary": "a"}) + "\n" + json.dumps(
        {"document": "d e f", "summary": "d"}) + "\n")
    assert "no data path" in _error(model_args, task="summarization")
    calls = []

    def summarize_and_score(model, tokenizer, examples, attn_name, max_new_tokens, batch_size=1, **kwargs):
        calls.append((attn_name, max_new_tokens, batch_size, kwargs, len(examples)))
        return {"rougeL": 0.5, "predictions": ["x", "y"], "per_example": [{}, {}]}

    monkeypatch.setattr("fms.eval.summarization.summarize_and_score", summarize_and_score)
    report = run_eval(EvalConfig(**model_args, task="summarization", data=str(data), max_new_tokens=4, batch_size=2))
    # only the paged op takes a page size
    assert calls == [("sdpa", 4, 2, {}, 2), ("paged", 4, 2, {"page_size": 16}, 2)]
    assert report["modes"]["paged"]["rougeL"] == 0.5 and report["comparison"]["identical_outputs"] == 1.0
    assert "per_example" not in report["modes"]["paged"]  # per-example lists only with log_samples


def test_wandb_is_optional(model_args, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    run_eval(EvalConfig(**model_args, task="mmlu", data=str(SAMPLES / "mmlu.jsonl"), mode="default", limit=1,
                        wandb=True))
    assert "--wandb needs the wandb package (pip install wandb)" in capsys.readouterr().err


def test_script_cli_smoke(capsys):
    """scripts/eval.py: flags -> EvalConfig -> run_eval; exit 2 with the message on bad input."""
    from scripts import eval as eval_script

    argv = ["--variant", "micro", "--device_type", "cpu", "--no_progress", "--no_warmup", "--task", "truthfulqa_mc1",
            "--data", str(SAMPLES / "truthfulqa_mc.json"), "--mode", "default", "--limit", "1"]
    assert eval_script.cli(argv) == 0
    assert "truthfulqa_mc1" in capsys.readouterr().out
    # paged forks one sequence per question's context unless told not to (then it runs what default runs)
    paged = [*argv[:-4], "--mode", "both", "--limit", "2"]
    assert eval_script.cli(paged) == 0
    shared = capsys.readouterr().out
    assert eval_script.cli([*paged, "--no_share_context"]) == 0
    alone = capsys.readouterr().out
    row = {name: [line.split()[-2:] for line in out.splitlines() if line.startswith("input tokens run")][0]
           for name, out in (("shared", shared), ("alone", alone))}
    assert row["alone"][0] == row["alone"][1] == row["shared"][0]  # default's count, and paged's when not shared
    assert int(row["shared"][1]) < int(row["shared"][0])
    assert eval_script.cli([*argv, "--batch_size", "0"]) == 2
    assert "--batch_size must be >= 1, got 0" in capsys.readouterr().err


def test_interleaved_repeats_print_the_paired_ratio_with_its_interval(model_args, capsys):
    report = run_eval(EvalConfig(**model_args, task="truthfulqa_mc2", data=str(SAMPLES / "truthfulqa_mc.json"),
                                 mode="both", limit=2, timing_repeats=6))
    ratio = report["comparison"]["latency_ratio"]
    assert len(ratio["runs"]) == 6 and ratio["ci95"] == [min(ratio["runs"]), max(ratio["runs"])]  # n=6: ranks 1, 6
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("paged/default latency per batch")]
    assert line == [f"paged/default latency per batch: median of 6 interleaved pairs {ratio['median']:.3f}, "
                    f"95% interval {ratio['ci95'][0]:.3f}-{ratio['ci95'][1]:.3f}"]
