"""scripts/benchmark_inference.py and fms.utils.benchmarking on the CPU with llama nano (tiny, seconds)."""

import csv
import json
import sys

import pytest
import torch

from fms.models import get_model
from fms.utils import benchmarking as bench
from fms.utils.generation import generate
from tests.script_loader import load_script

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


script = load_script("benchmark_inference")

ONE_POINT = ["--architecture", "llama", "--variant", "nano", "--device_type", "cpu", "--batch_sizes", "1",
             "--context_lengths", "16", "--base_context", "16", "--max_new_tokens", "3", "--repeats", "1",
             "--warmup", "1", "--no_progress"]


def test_one_point_both_backends_writes_valid_results(tmp_path):
    assert script.main([*ONE_POINT, "--attn_name", "sdpa,paged", "--results_dir", str(tmp_path),
                        "--run_name", "run"]) == 0
    run = tmp_path / "run"
    results = json.loads((run / "results.json").read_text())
    for key in ("command", "device", "torch_version", "git_commit", "timestamp"):
        assert results["meta"][key]
    points = results["points"]
    assert [(p["backend"], p["batch_size"], p["context_len"]) for p in points] == [("sdpa", 1, 16), ("paged", 1, 16)]
    for p in points:
        assert set(bench.FIGURES) <= set(p), sorted(set(bench.FIGURES) - set(p))
        for figure in bench.FIGURES:
            if figure.startswith("peak_gpu_mem"):
                assert p[figure] is None  # no GPU
            else:
                assert p[figure] > 0, figure
        assert p["kv_bytes_allocated"] >= p["kv_bytes_in_use"] >= p["kv_bytes_holding_tokens"]
        assert p["sweep"] == "batch+context"
        # 16 prompt + 2 new tokens cached; the last new token is never written to the cache
        assert p["kv_bytes_holding_tokens"] == 18 * results["model"]["kv_bytes_per_token"]
        assert p["matches_generate"] is True and p["generate_agreement"] == 1.0
        assert "outputs" not in p
    assert points[1]["pages_in_use"] == 2 and points[1]["page_size"] == 16
    with (run / "points.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert set(bench.FIGURES) <= set(rows[0])
    assert [r["backend"] for r in rows] == ["sdpa", "paged"]
    pngs = sorted(run.glob("*.png"))
    assert {p.stem for p in pngs} >= {"latency_vs_batch", "ms_per_token_vs_context", "peak_memory_vs_context",
                                      "throughput_vs_batch"}
    for png in pngs:
        assert png.read_bytes()[:8] == PNG_MAGIC
    assert (run / "tables.md").read_text().count("| paged |") >= 1


def test_timed_loop_matches_generate_with_per_row_lengths():
    model = get_model("llama", "nano")
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    timing = bench.timed_generate(model, prompts, [4, 2], "paged", record_stats=True, page_size=16)
    reference = generate(model, prompts, 4, attn_name="sdpa")
    assert timing.outputs[0] == reference[0]
    assert timing.outputs[1] == reference[1][:2]
    assert len(timing.decode_step_ms) == 3  # 4 tokens: one from the prefill, three decode steps
    assert timing.kv_stats["pages_in_use"] == 2


def test_mixed_workload_and_capacity(tmp_path):
    argv = ["--architecture", "llama", "--variant", "nano", "--device_type", "cpu", "--sweep", "none", "--mixed",
            "--mixed_requests", "6", "--mixed_prompt_range", "4,40", "--mixed_output_range", "2,5",
            "--memory_budget_gb", "0.001", "--repeats", "1", "--warmup", "1", "--no_progress",
            "--results_dir", str(tmp_path), "--run_name", "mixed"]
    assert script.main(argv) == 0
    mixed = json.loads((tmp_path / "mixed" / "results.json").read_text())["mixed"]
    runs = {r["backend"]: r for r in mixed["runs"]}
    assert runs["sdpa"]["kv_bytes_holding_tokens"] == runs["paged"]["kv_bytes_holding_tokens"]
    assert runs["paged"]["kv_bytes_allocated"] < runs["sdpa"]["kv_bytes_allocated"]
    caps = {c["backend"]: c for c in mixed["capacity"]}
    assert caps["paged"]["largest_batch"] > caps["sdpa"]["largest_batch"] > 0
    assert caps["sdpa"]["verify"]["ok"] and caps["paged"]["verify"]["ok"]
    assert (tmp_path / "mixed" / "mixed_kv_memory.png").read_bytes()[:8] == PNG_MAGIC


def _failing_backend(gm, example_inputs):
    raise RuntimeError("this backend never compiles")


def test_compile_records_graphs_per_backend_and_no_fallback(tmp_path):
    torch._dynamo.reset()
    assert script.main([*ONE_POINT, "--batch_sizes", "2", "--max_new_tokens", "4", "--attn_name", "sdpa,paged",
                        "--compile", "--compile_backend", "aot_eager", "--results_dir", str(tmp_path),
                        "--run_name", "c"]) == 0
    results = json.loads((tmp_path / "c" / "results.json").read_text())
    compiled = results["config"]["compile"]
    assert compiled["requested"] and compiled["active"] and not compiled["fell_back_to_eager"]
    assert "aot_eager" in compiled["mode"] and compiled["graph_breaks"] == {}
    for backend in ("sdpa", "paged"):
        # points (batch 2, 16 tokens) and (batch 1, 16 tokens), a prefill and three decode steps each: at
        # most a graph per batch size (size 1 is specialized), not one per decode step as the contiguous
        # cache grows
        assert compiled["graphs"][backend] == {"prefill": 2, "decode": 2}, compiled["graphs"]
    assert all(p["compiled"] and p["matches_generate"] for p in results["points"])


def test_compile_scope_decode_leaves_prefill_eager(tmp_path):
    torch._dynamo.reset()
    assert script.main([*ONE_POINT, "--batch_sizes", "2", "--max_new_tokens", "4", "--attn_name", "paged",
                        "--compile", "--compile_scope", "decode", "--compile_backend", "aot_eager",
                        "--results_dir", str(tmp_path), "--run_name", "d"]) == 0
    compiled = json.loads((tmp_path / "d" / "results.json").read_text())["config"]["compile"]
    assert compiled["active"] and compiled["scope"] == "decode"
    assert compiled["graphs"]["paged"]["prefill"] == 0 and compiled["graphs"]["paged"]["decode"] >= 1


def test_decode_windows_time_per_token_and_match_generate(tmp_path):
    """--decode_window: each backend's timed runs go through one Generator (windows of 3 steps); its
    tokens equal the per-token generate() pass, and ms/token divides each window by its steps."""
    assert script.main([*ONE_POINT, "--batch_sizes", "2", "--max_new_tokens", "8", "--attn_name", "sdpa,paged",
                        "--decode_window", "3", "--results_dir", str(tmp_path), "--run_name", "w"]) == 0
    results = json.loads((tmp_path / "w" / "results.json").read_text())
    assert results["config"]["compile"]["decode_windows"]["decode_window"] == 3
    assert {p["backend"] for p in results["points"]} == {"sdpa", "paged"}
    assert all(p["matches_generate"] and p["decode_ms_per_token"] > 0 for p in results["points"])
    model = get_model("llama", "nano")
    prompts = bench.random_prompts(2, 16, model.config.vocab_size, seed=0)
    gen = bench.Generator(model, "paged", max_batch_size=2, max_seq_len=24, decode_window=3, page_size=16)
    timing = bench.timed_generate(model, prompts, 8, "paged", generator=gen)
    assert len(timing.decode_step_ms) == 3  # 7 decode tokens after the prefill's: windows of 3, 3, 1
    assert timing.outputs == generate(model, prompts, 8, attn_name="paged", page_size=16)


@pytest.mark.parametrize("extra, message", [
    (["--decode_window", "0"], "--decode_window must be >= 1"),
    (["--cuda_graphs"], "--cuda_graphs applies to decode windows"),
    (["--decode_window", "4", "--cuda_graphs"], "--cuda_graphs needs --device_type cuda"),
])
def test_bad_decode_window_arguments(extra, message, capsys):
    with pytest.raises(SystemExit) as exc:
        script.main(["--architecture", "llama", "--variant", "nano", "--device_type", "cpu", *extra])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_compile_failure_falls_back_to_eager_and_says_so(tmp_path):
    torch._dynamo.reset()
    if "fms_test_failing" not in torch._dynamo.list_backends(exclude_tags=()):
        torch._dynamo.register_backend(_failing_backend, name="fms_test_failing")
    assert script.main([*ONE_POINT, "--attn_name", "sdpa", "--compile", "--compile_backend", "fms_test_failing",
                        "--results_dir", str(tmp_path), "--run_name", "f"]) == 0
    results = json.loads((tmp_path / "f" / "results.json").read_text())
    compiled = results["config"]["compile"]
    assert compiled["requested"] and compiled["fell_back_to_eager"] and not compiled["active"]
    assert compiled["fell_back_at"] == "batch 1 context 16" and "never compiles" in compiled["error"]
    assert [p["compiled"] for p in results["points"]] == [False]


def test_wandb_offline_writes_a_local_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is not installed")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert script.main([*ONE_POINT, "--attn_name", "sdpa", "--wandb", "--results_dir", str(tmp_path),
                        "--run_name", "wb"]) == 0
    assert list((tmp_path / "wb" / "wandb").glob("offline-run-*")), "no offline wandb run directory"


def test_wandb_missing_is_a_message_not_an_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    assert bench.start_wandb({}, tmp_path, "x") is None
    assert bench.WANDB_MISSING in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--attn_name", "sdpa,nope"], "unknown attention backend 'nope'"),
    (["--batch_sizes", "0"], "--batch_sizes must all be >= 1"),
    (["--batch_sizes", "-2"], "--batch_sizes must all be >= 1"),
    (["--context_lengths", "1020", "--max_new_tokens", "8"], "longer than the model's max_position_embeddings (1024)"),
    (["--variant", "giant"], "unknown variant 'giant'"),
])
def test_bad_arguments_exit_nonzero_with_a_message(extra, message, capsys):
    argv = ["--architecture", "llama", "--variant", "nano", "--device_type", "cpu", *extra]
    with pytest.raises(SystemExit) as exc:
        script.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_hf_twin_has_our_weights():
    pytest.importorskip("transformers", reason="transformers is not installed")
    model = get_model("llama", "nano")
    hf_model = bench.hf_twin(model, "llama")
    tokens = torch.randint(0, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf_model(tokens).logits, model(tokens), atol=1e-4, rtol=1e-4)
    prompts = tokens.tolist()
    peer = bench.hf_generate_point(hf_model, prompts, 4, repeats=1, warmup=0, device=torch.device("cpu"))
    assert peer["outputs"] == generate(model, prompts, 4)
