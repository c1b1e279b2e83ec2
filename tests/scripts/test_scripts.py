"""One smoke test per command-line front end: main(argv) with tiny settings on the CPU (or its clear refusal
without a GPU). What the scripts run is tested in tests/bench and tests/eval; these check the wiring of flags."""

import json
import statistics
import sys

import pytest
import torch

from scripts import (
    bench_paged_decode_kernel,
    bench_ssd_scan,
    benchmark_inference,
    benchmark_serving,
    benchmark_variants,
    probe_flex_page_sizes,
    profile_hybrid,
    profile_serving,
)

NO_GPU = not torch.cuda.is_available()


def test_benchmark_inference(tmp_path):
    assert benchmark_inference.main(["--variant", "nano", "--device_type", "cpu", "--batch_sizes", "1",
                                     "--context_lengths", "8", "--base_context", "8", "--max_new_tokens", "2",
                                     "--attn_name", "sdpa", "--no_progress", "--results_dir", str(tmp_path),
                                     "--run_name", "r"]) == 0
    points = json.loads((tmp_path / "r" / "results.json").read_text())["points"]
    assert [p["backend"] for p in points] == ["sdpa"] and points[0]["limit_tok_s"] > 0


@pytest.mark.parametrize("argv, message", [
    (["--attn_name", "sdpa,nope"], "unknown attention backend 'nope'"),
    (["--batch_sizes", "x"], "--batch_sizes / --context_lengths take integers"),
    (["--cuda_graphs"], "cuda_graphs applies to decode windows"),
])
def test_benchmark_inference_bad_flags_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        benchmark_inference.main(["--variant", "nano", "--device_type", "cpu", *argv])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_benchmark_serving(tmp_path, capsys):
    results = benchmark_serving.main(["--results_dir", str(tmp_path), "--variant", "nano", "--num_requests", "2",
                                      "--prompt_range", "4,8", "--output_range", "2", "--device", "cpu",
                                      "--peers", "hf2"])
    assert results["results"][0]["num_output_tokens"] == 4
    assert "unknown peers ignored: ['hf2']" in capsys.readouterr().out


def test_profile_hybrid(tmp_path):
    assert profile_hybrid.main(["--variant", "h-micro-test", "--dtype", "fp32", "--device", "cpu", "--sections",
                                "memory", "--context_lengths", "16", "--output_dir", str(tmp_path),
                                "--run_name", "m"]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["memory"]["per_context"][0]["context_len"] == 16


def test_benchmark_variants(tmp_path):
    results = benchmark_variants.main(["--variants", "standard", "--context_lengths", "8", "--max_new_tokens", "2",
                                       "--device_type", "cpu", "--results_dir", str(tmp_path)])
    assert [r["backend"] for r in results["rows"]] == ["sdpa", "paged"]
    assert (tmp_path / "gpt2_variants_nano_cpu.csv").is_file()


def test_profile_serving(tmp_path):
    results = profile_serving.main(["--results_dir", str(tmp_path), "--variant", "nano", "--device", "cpu",
                                    "--num_requests", "2", "--prompt_range", "4,8", "--output_len", "2", "--top", "3"])
    assert len(results["host_ops"]) == 3 and (tmp_path / "profile.json").is_file()


@pytest.mark.skipif(not NO_GPU, reason="checks the refusal without a GPU")
def test_cuda_only_scripts_refuse_clearly_without_a_gpu(tmp_path, capsys):
    assert bench_ssd_scan.main(["--output", str(tmp_path / "x.json")]) == 2
    assert "no CUDA device here" in capsys.readouterr().err
    assert probe_flex_page_sizes.main() == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        bench_paged_decode_kernel.main(["--page-size", "16"])


def test_gemv_script_refuses_clearly_without_a_gpu(monkeypatch):
    if not NO_GPU:
        pytest.skip("checks the refusal without a GPU")
    from scripts import bench_gemv

    monkeypatch.setattr(sys, "argv", ["bench_gemv.py"])
    with pytest.raises(SystemExit, match="no CUDA device here"):
        bench_gemv.main()


def test_bench_server_vs_offline(tmp_path):
    """Both halves on llama micro (the server in a child process, on 127.0.0.1): the ratio, and per timed run the
    client's TTFT beside the engine's. The engine's interval (arrival at the engine to the first token) lies
    inside the client's (sending to receiving it), so it cannot be longer."""
    from scripts import bench_server_vs_offline

    report = bench_server_vs_offline.main(["--num-prompts", "3", "--prompt-range", "36,44", "--output-len", "3",
                                           "--warmup-prompts", "1", "--output", str(tmp_path / "s.json")])
    assert report["server"]["completed"] == 3 and report["server"]["failed"] == 0
    # each timed run its own prompts (seeds 0, 2; the warm-up's is 1), the ratio taken per run on the same prompts
    assert report["workload"]["seeds_per_run"] == [0, 2] and report["workload"]["fresh_prompts"] is True
    assert report["workload"]["client_connections"] == "opened before each timed run"
    per_run = report["server_over_offline_per_run"]
    assert len(per_run) == 2 and all(r > 0 for r in per_run)
    assert report["server_over_offline"] == statistics.median(per_run)
    for side in ("offline", "server"):
        throughputs, durations = report[side]["output_throughput_per_run"], report[side]["durations_s"]
        assert [round(t * d, 6) for t, d in zip(throughputs, durations)] == [9.0, 9.0], side  # 3 x 3 tokens
    # each request's admission (its response headers) comes after the run starts and before the run ends
    for admitted, duration in zip(report["server"]["admitted_ms_per_run"], report["server"]["durations_s"]):
        assert 0 < admitted["p50_admitted_ms"] <= admitted["max_admitted_ms"] < 1000 * duration, admitted
    client, engine = report["server"]["client_mean_ttft_ms"], report["server"]["engine_mean_ttft_ms"]
    assert len(client) == len(engine) == 2
    assert all(0 < e <= c for c, e in zip(client, engine)), (client, engine)
    assert json.loads((tmp_path / "s.json").read_text())["server_over_offline"] == report["server_over_offline"]
    # per timed run, the engine's steps and phase seconds on both sides: the same 3 requests of 3 tokens need at
    # least one prefill step and one more step each side, and every phase took some time
    for side in ("offline", "server"):
        runs = report[side]["engine_per_run"]
        assert len(runs) == 2, (side, runs)
        for run in runs:
            # no run reuses the one before's prompts: every prompt token (3 of 36..44 each) is computed again
            assert run["num_steps"] >= 2 and run["num_batched_tokens"] >= 3 * 36, (side, run)
            assert all(run["time_s"][phase] > 0 for phase in ("schedule", "execute", "update")), (side, run)
    # per timed run, each engine's timeline (FMS_STEP_TRACE, written by the engine itself): every request reached
    # the engine inside the run, the steps counted in the trace are the ones the engine's totals counted, and the
    # server's engine process took the 3 adds off its pipe
    for side in ("offline", "server"):
        for timeline, run, duration in zip(report[side]["timeline_per_run"], report[side]["engine_per_run"],
                                           report[side]["durations_s"]):
            assert timeline["num_adds"] == 3 and timeline["num_steps"] == run["num_steps"], (side, timeline, run)
            assert 0 <= timeline["first_add_ms"] <= timeline["first_step_start_ms"] < timeline["last_step_end_ms"]
            assert timeline["last_step_end_ms"] + timeline["tail_ms"] == pytest.approx(1e3 * duration)
            assert timeline["busy_ms"] > 0 and timeline["idle_between_steps_ms"] >= 0
            assert (sum(timeline["recv_sizes"]) == 3) if side == "server" else ("recv_sizes" not in timeline)
