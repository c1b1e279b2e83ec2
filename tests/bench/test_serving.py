"""scripts/benchmark_serving.py end to end on a tiny CPU workload (llama "nano")."""

import json

from tests.script_loader import load_script


def test_benchmark_serving_writes_json_and_csv(tmp_path):
    module = load_script("benchmark_serving")
    module.main(["--results_dir", str(tmp_path), "--variant", "nano", "--num_requests", "3",
                 "--prompt_range", "4,20", "--output_range", "2,3", "--device", "cpu"])
    results = json.loads((tmp_path / "serving.json").read_text())
    row = results["results"][0]
    assert row["num_requests"] == 3 and row["output_tokens_per_s"] > 0 and row["ttft_p50_ms"] > 0
    assert row["finish_reasons"] == {"length": 3} and results["cpu_demo"] is True
    assert results["metadata"]["command"] and results["metadata"]["torch_version"]
    assert (tmp_path / "serving.csv").read_text().startswith("system,num_requests")


def test_decode_steps_sweep_and_batch1_share_one_engine(tmp_path):
    module = load_script("benchmark_serving")
    module.main(["--results_dir", str(tmp_path), "--variant", "nano", "--num_requests", "3",
                 "--prompt_range", "4,20", "--output_range", "5,5", "--device", "cpu",
                 "--decode_steps_sweep", "1,4", "--batch1_tokens", "6", "--num_pages", "64"])
    rows = json.loads((tmp_path / "serving.json").read_text())["results"]
    assert [r["system"] for r in rows] == ["fms LLMEngine (max_decode_steps=1)", "fms LLMEngine (max_decode_steps=4)",
                                           "fms LLMEngine batch-1"]
    assert rows[0]["engine_stats"]["num_decode_windows"] == 0 < rows[1]["engine_stats"]["num_decode_windows"]
    assert rows[2]["num_requests"] == 1 and rows[2]["num_output_tokens"] == 6
