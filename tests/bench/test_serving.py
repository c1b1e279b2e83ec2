"""The serving benchmark (fms.bench.serving) end to end on a tiny CPU workload (llama "nano")."""

import json

import pytest

from fms.bench.serving import ServingBenchConfig, run_serving_benchmark

TINY = dict(variant="nano", num_requests=3, prompt_range=(4, 20), device="cpu")


def test_benchmark_serving_writes_json_and_csv_with_the_roofline(tmp_path):
    run_serving_benchmark(ServingBenchConfig(**TINY, results_dir=tmp_path, output_range=(2, 3)))
    results = json.loads((tmp_path / "serving.json").read_text())
    row = results["results"][0]
    assert row["num_requests"] == 3 and row["output_tokens_per_s"] > 0 and row["ttft_p50_ms"] > 0
    assert row["finish_reasons"] == {"length": 3} and results["cpu_demo"] is True
    assert results["metadata"]["command"] and results["metadata"]["torch_version"]
    # the environment variables fms reads
    assert set(results["metadata"]["env_switches"]) == {"FMS_GEMV", "FMS_FUSE_NORM", "FMS_ARGMAX_KERNEL",
                                                        "FMS_FUSE_KV_WRITE", "FMS_GEMV_TABLE_DIR"}
    roofline = results["roofline"]
    assert roofline["bandwidth_bytes_per_s"] == 4.28e12 and roofline["peak_flops"] == 790e12
    assert roofline["num_output_tokens"] == row["num_output_tokens"]
    assert row["limit_tok_s"] == roofline["limit_tok_s"]
    assert row["pct_of_limit"] == pytest.approx(100 * row["output_tokens_per_s"] / row["limit_tok_s"])
    assert (tmp_path / "serving.csv").read_text().startswith("system,num_requests")


def test_compiles_inside_the_timed_runs_are_recorded_apart_from_start_up(tmp_path, monkeypatch):
    """startup.dynamo holds what start-up traced; dynamo_during_runs what the timed fms runs traced, with the
    recompile's function and failed guard: a compile there is inside a run's time. Here each run calls a compiled
    function at a new static shape, which dynamo traces again."""
    import torch

    from fms.bench import serving

    torch._dynamo.reset()
    scaled = torch.compile(lambda x: x * x.shape[0], dynamic=False, backend="eager")
    calls, run_fms = [], serving.run_fms

    def run_fms_and_compile(*args, **kwargs):
        calls.append(1)
        scaled(torch.ones(len(calls) + 1))
        return run_fms(*args, **kwargs)

    monkeypatch.setattr(serving, "run_fms", run_fms_and_compile)
    run_serving_benchmark(ServingBenchConfig(**TINY, results_dir=tmp_path, output_range=(2, 2),
                                             decode_steps_sweep=(1, 2)))
    results = json.loads((tmp_path / "serving.json").read_text())
    assert len(calls) == 2 and set(results["startup"]["dynamo"]) == {"graphs_traced", "recompiles"}
    during = results["dynamo_during_runs"]
    assert during["graphs_traced"] == 2, during
    [entry] = during["recompiles"]
    assert entry.startswith("Recompiling function <lambda>") and "size mismatch" in entry, entry


def test_decode_steps_sweep_and_batch1_share_one_engine(tmp_path):
    # no num_pages: the CPU pool is sized for the workload and for the batch-1 request's 128 + 6 tokens
    run_serving_benchmark(ServingBenchConfig(**TINY, results_dir=tmp_path, output_range=(5, 5),
                                             decode_steps_sweep=(1, 4), batch1_tokens=6))
    rows = json.loads((tmp_path / "serving.json").read_text())["results"]
    assert [r["system"] for r in rows] == ["fms LLMEngine (max_decode_steps=1)", "fms LLMEngine (max_decode_steps=4)",
                                           "fms LLMEngine batch-1"]
    assert rows[0]["engine_stats"]["num_decode_windows"] == 0 < rows[1]["engine_stats"]["num_decode_windows"]
    assert rows[2]["num_requests"] == 1 and rows[2]["num_output_tokens"] == 6 and "error" not in rows[2]
    assert rows[2]["finish_reasons"] == {"length": 1}
    # batch-1: a 128-token prompt and 6 new tokens -> 5 decode steps
    assert rows[2]["roofline"]["num_decode_steps"] == 5 and rows[2]["batch1_decode_limit_tok_s"] > 0


@pytest.mark.parametrize("options, message", [
    (dict(num_requests=0), "num_requests must be >= 1, got 0"),
    (dict(prompt_range=(9, 3)), "prompt_range must be LO,HI with 1 <= LO <= HI, got 9,3"),
    (dict(decode_steps_sweep=(4, 0)), "decode_steps_sweep values must be >= 1, got [0]"),
    (dict(peers=("vllm",)), "unknown peer ['vllm']; allowed: hf"),
    (dict(compile_scope="decode"), "compile_scope must be one of model, layers, got 'decode'"),
    (dict(graph_batch_sizes=(0, 2)), "graph_batch_sizes must be a non-empty sequence of ints >= 1, got (0, 2)"),
])
def test_bad_config_names_the_value(options, message):
    with pytest.raises(ValueError) as exc:
        ServingBenchConfig(**{**TINY, **options})
    assert message in str(exc.value)


def test_throughput_flags_compile_scope_and_graph_sizes_reach_the_engine(tmp_path, monkeypatch):
    from fms.bench import serving
    from fms.entrypoints.bench_cli import throughput_config

    config = throughput_config(["--device", "cpu", "--variant", "nano", "--num_requests", "2", "--prompt_range", "4,8",
                                "--output_range", "2,2", "--compile_scope", "layers", "--cuda_graph_sizes", "4,2",
                                "--results_dir", str(tmp_path)])
    assert config.compile_scope == "layers" and config.graph_batch_sizes == (2, 4)
    seen = []
    real = serving.LLMEngine

    def spy(model, **kwargs):
        seen.append((kwargs["compile_scope"], kwargs["graph_batch_sizes"]))
        return real(model, **kwargs)

    monkeypatch.setattr(serving, "LLMEngine", spy)
    run_serving_benchmark(config)
    assert seen == [("layers", (2, 4))]
    options = json.loads((tmp_path / "serving.json").read_text())["engine_options"]
    assert options["compile_scope"] == "layers" and options["graph_batch_sizes"] == [2, 4]


def test_a_row_whose_requests_were_rejected_says_so(tmp_path):
    # a pool of 2 pages (32 tokens) cannot hold the batch-1 request's 128-token prompt
    run_serving_benchmark(ServingBenchConfig(**{**TINY, "num_requests": 1, "prompt_range": (4, 8)},
                                             results_dir=tmp_path, output_range=(2, 2), batch1_tokens=4, num_pages=2))
    rows = json.loads((tmp_path / "serving.json").read_text())["results"]
    assert "error" not in rows[0] and rows[0]["num_output_tokens"] == 2
    assert rows[1]["finish_reasons"] == {"rejected": 1} and rows[1]["num_output_tokens"] == 0
    assert rows[1]["error"].startswith("1 of 1 requests did not run (rejected): ")
