"""The static benchmark (fms.bench.static, fms.bench.static_run) on the CPU with llama nano (tiny, seconds)."""

import csv
import json
import sys

import pytest
import torch

from fms.bench import static as bench
from fms.bench.hf_peer import hf_generate_point, hf_twin
from fms.bench.static_run import StaticBenchConfig, run_static_benchmark
from fms.bench.wandb_log import WANDB_MISSING, start_wandb
from fms.bench.workloads import random_prompts
from fms.models import get_model
from fms.utils.generation import Generator, generate

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

ONE_POINT = dict(architecture="llama", variant="nano", device_type="cpu", batch_sizes=[1], context_lengths=[16],
                 base_context=16, max_new_tokens=3, repeats=1, warmup=1, progress=False)


def run(tmp_path, run_name, **options) -> dict:
    """results.json of one run with ONE_POINT's settings updated by options."""
    run_static_benchmark(StaticBenchConfig(**{**ONE_POINT, **options}, results_dir=str(tmp_path), run_name=run_name))
    return json.loads((tmp_path / run_name / "results.json").read_text())


def test_one_point_both_backends_writes_valid_results(tmp_path):
    results = run(tmp_path, "run", backends=("sdpa", "paged"))
    run_dir = tmp_path / "run"
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
        # the roofline of this point (1 row, 16 prompt + 3 new tokens) and the inputs it came from
        assert p["roofline"]["num_decode_steps"] == 2 and p["roofline"]["num_output_tokens"] == 3
        assert p["roofline"]["kv_bytes_per_token"] == results["model"]["kv_bytes_per_token"]
        assert p["pct_of_limit"] == pytest.approx(100 * p["output_tokens_per_s"] / p["limit_tok_s"])
    assert points[1]["pages_in_use"] == 2 and points[1]["page_size"] == 16
    with (run_dir / "points.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert set(bench.FIGURES) <= set(rows[0])
    assert [r["backend"] for r in rows] == ["sdpa", "paged"]
    pngs = sorted(run_dir.glob("*.png"))
    assert {p.stem for p in pngs} >= {"latency_vs_batch", "ms_per_token_vs_context", "peak_memory_vs_context",
                                      "throughput_vs_batch"}
    for png in pngs:
        assert png.read_bytes()[:8] == PNG_MAGIC
    assert (run_dir / "tables.md").read_text().count("| paged |") >= 1


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
    mixed = run(tmp_path, "mixed", sweep="none", mixed=True, mixed_requests=6, mixed_prompt_range=(4, 40),
                mixed_output_range=(2, 5), memory_budget_gb=0.001)["mixed"]
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
    results = run(tmp_path, "c", batch_sizes=[2], max_new_tokens=4, compile=True, compile_backend="aot_eager")
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
    compiled = run(tmp_path, "d", batch_sizes=[2], max_new_tokens=4, backends=("paged",), compile=True,
                   compile_scope="decode", compile_backend="aot_eager")["config"]["compile"]
    assert compiled["active"] and compiled["scope"] == "decode"
    assert compiled["graphs"]["paged"]["prefill"] == 0 and compiled["graphs"]["paged"]["decode"] >= 1


def test_decode_windows_time_per_token_and_match_generate(tmp_path):
    """--decode_window: each backend's timed runs go through one Generator (windows of 3 steps); its
    tokens equal the per-token generate() pass, and ms/token divides each window by its steps."""
    results = run(tmp_path, "w", batch_sizes=[2], max_new_tokens=8, decode_window=3)
    assert results["config"]["compile"]["decode_windows"]["decode_window"] == 3
    assert {p["backend"] for p in results["points"]} == {"sdpa", "paged"}
    assert all(p["matches_generate"] and p["decode_ms_per_token"] > 0 for p in results["points"])
    model = get_model("llama", "nano")
    prompts = random_prompts(2, 16, model.config.vocab_size, seed=0)
    gen = Generator(model, "paged", max_batch_size=2, max_seq_len=24, decode_window=3, page_size=16)
    timing = bench.timed_generate(model, prompts, 8, "paged", generator=gen)
    assert len(timing.decode_step_ms) == 3  # 7 decode tokens after the prefill's: windows of 3, 3, 1
    assert timing.outputs == generate(model, prompts, 8, attn_name="paged", page_size=16)


@pytest.mark.parametrize("extra, message", [
    (dict(decode_window=0), "decode_window must be >= 1, got 0"),
    (dict(cuda_graphs=True), "cuda_graphs applies to decode windows"),
    (dict(decode_window=4, cuda_graphs=True), "cuda_graphs needs device_type cuda"),
])
def test_bad_decode_window_arguments(extra, message):
    with pytest.raises(ValueError, match=message):
        StaticBenchConfig(architecture="llama", variant="nano", device_type="cpu", **extra)


def test_compile_failure_falls_back_to_eager_and_says_so(tmp_path):
    torch._dynamo.reset()
    if "fms_test_failing" not in torch._dynamo.list_backends(exclude_tags=()):
        torch._dynamo.register_backend(_failing_backend, name="fms_test_failing")
    results = run(tmp_path, "f", backends=("sdpa",), compile=True, compile_backend="fms_test_failing")
    compiled = results["config"]["compile"]
    assert compiled["requested"] and compiled["fell_back_to_eager"] and not compiled["active"]
    assert compiled["fell_back_at"] == "batch 1 context 16" and "never compiles" in compiled["error"]
    assert [p["compiled"] for p in results["points"]] == [False]


def test_wandb_offline_writes_a_local_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is not installed")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    run(tmp_path, "wb", backends=("sdpa",), wandb=True)
    assert list((tmp_path / "wb" / "wandb").glob("offline-run-*")), "no offline wandb run directory"


def test_wandb_missing_is_a_message_not_an_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    assert start_wandb({}, tmp_path, "x") is None
    assert WANDB_MISSING in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (dict(backends=("sdpa", "nope")), "unknown attention backend 'nope'"),
    (dict(backends=("sdpa", "sdpa")), "lists a backend twice"),
    (dict(batch_sizes=[0]), "batch_sizes must all be >= 1, got [0]"),
    (dict(batch_sizes=[-2, 4]), "batch_sizes must all be >= 1, got [-2]"),
    (dict(context_lengths=[1020], max_new_tokens=8), "longer than the model's max_position_embeddings (1024)"),
    (dict(variant="giant"), "unknown variant 'giant'"),
    (dict(sweep="diagonal"), "sweep must be one of both, batch, context, none, got 'diagonal'"),
    (dict(page_size=12), "page_size must be one of"),
    (dict(peers=("vllm",)), "unknown peer ['vllm']; allowed: hf"),
])
def test_bad_config_names_the_value_and_what_is_allowed(extra, message):
    with pytest.raises(ValueError) as exc:
        StaticBenchConfig(**{**dict(architecture="llama", variant="nano", device_type="cpu"), **extra})
    assert message in str(exc.value)


def test_profile_defaults_are_clipped_to_the_model_and_explicit_lengths_are_not():
    # CPU profile: contexts 32, 64, 128 + 8 new tokens; nano has 1024 positions, so nothing is clipped
    config = StaticBenchConfig(architecture="llama", variant="nano", device_type="cpu")
    assert config.context_lengths == [32, 64, 128] and config.max_new_tokens == 8 and config.repeats == 1
    # 1020 of the 1024 positions leave 4 for new tokens: the defaults are clipped to 1024 - 1020 = 4
    config = StaticBenchConfig(architecture="llama", variant="nano", device_type="cpu", max_new_tokens=1020)
    assert config.context_lengths == [4] and config.base_context == 4


def test_hf_twin_has_our_weights():
    pytest.importorskip("transformers", reason="transformers is not installed")
    model = get_model("llama", "nano")
    hf_model = hf_twin(model, "llama")
    tokens = torch.randint(0, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf_model(tokens).logits, model(tokens), atol=1e-4, rtol=1e-4)
    prompts = tokens.tolist()
    peer = hf_generate_point(hf_model, prompts, 4, repeats=1, warmup=0, device=torch.device("cpu"))
    assert peer["outputs"] == generate(model, prompts, 4)
