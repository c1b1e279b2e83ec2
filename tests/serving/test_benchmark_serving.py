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
