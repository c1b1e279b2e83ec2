"""Issue 19's table of targets (fms.bench.targets, `fms bench targets`): verdicts on hand-written results (met, not
met, one run of several failing, a timed-out run, two results files merged), real child processes past their
timeout or failing, and two cheap rows end to end on the CPU."""

import dataclasses
import json
import sys
import time
from pathlib import Path

import pytest

from fms.bench import targets
from fms.bench.targets import TargetsConfig, merge_results, report, summarize
from fms.entrypoints.bench_cli import targets_config, targets_main
from fms.entrypoints.cli import main

TAIL = "Traceback (most recent call last):\nRuntimeError: CUDA out of memory"


# -- hand-written fixtures, in the shapes the benchmarks write ------------------------------------------------
def serving_raw(tok_s, pct, batch1_tok_s=1_000.0, peer=None):
    results = [{"system": "fms LLMEngine", "output_tokens_per_s": tok_s, "limit_tok_s": tok_s * 100 / pct,
                "pct_of_limit": pct, "ttft_p50_ms": 900.0, "tpot_p50_ms": 10.0},
               {"system": "fms LLMEngine batch-1", "output_tokens_per_s": batch1_tok_s, "limit_tok_s": 1_600.0,
                "pct_of_limit": 60.0, "ttft_p50_ms": 5.0, "tpot_p50_ms": 0.96, "batch1_decode_limit_tok_s": 1_730.0}]
    return {"metadata": {"device": "NVIDIA H200"}, "results": results + ([peer] if peer else [])}


def startup_raw(cold, warm=None, checks=()):
    runs = {"cold": cold} if warm is None else {"cold": cold, "warm": warm}
    return {"metadata": {"device": "NVIDIA H200"},
            "models": [{"model": "llama:3.1-8b", "runs": runs,
                        "targets": [{"run": run, "phases": list(phases), "met": met} for run, phases, met in checks]}]}


def eval_raw(default_s, paged_s):
    return {"device": {"type": "cuda", "name": "NVIDIA H200"}, "comparison": {"answer_agreement": 1.0},
            "modes": {"default": {"elapsed_s": default_s, "num_batches": 3},
                      "paged": {"elapsed_s": paged_s, "num_batches": 3}}}


def run(job, raw=None, status="ok", device_type="cuda", commit="1111111aaaa"):
    record = {"job": job, "status": status, "returncode": 0 if status == "ok" else -9, "wall_s": 42.0,
              "timeout_s": 600.0, "started": "2026-01-01T00:00:00+00:00", "command": f"python scripts/{job}.py",
              "raw_path": f"results/targets_raw/{job}/out.json", "log_path": f"results/targets_raw/{job}/log.txt",
              "device_type": device_type, "device": "NVIDIA H200", "commit": commit, "raw": raw}
    if status != "ok":
        record["log_tail"] = TAIL
    return record


def row_of(rows, name):
    [row] = [r for r in rows if r["name"] == name]
    return row


def results_file(path, runs, rows, device_type="cuda", commit="1111111aaaa"):
    data = {"metadata": {"command": "fms bench targets", "device": "NVIDIA H200", "device_type": device_type,
                         "commit": commit, "started": "2026-01-01T00:00:00+00:00", "complete": True},
            "rows": [{"name": name, "runs": [{"run": r} for r in ids]} for name, ids in rows.items()], "runs": runs}
    path.write_text(json.dumps(data))
    return path


# -- verdicts ---------------------------------------------------------------------------------------------
def test_serving_and_batch1_rows_read_one_run_and_judge_each_target():
    runs = {"serving-1b-1": run("serving-1b", serving_raw(62_000.0, 71.0, batch1_tok_s=1_200.0))}
    rows = summarize(runs, {"serving-1b": ["serving-1b-1"], "batch1-1b": ["serving-1b-1"]})
    serving, batch1 = row_of(rows, "serving-1b"), row_of(rows, "batch1-1b")
    assert (serving["met"], serving["verdict"]) == (True, "met")
    assert serving["measured_text"] == "62,000 tok/s = 71.0% of the 87,324 tok/s floor"
    assert serving["target"] == ">= 61,000 output tok/s (70% of the floor)"
    assert (batch1["met"], batch1["verdict"]) == (False, "NOT met")  # 1,200 < 1,390
    assert batch1["measured_text"] == ("1,200 tok/s = 69% of the 1,730 tok/s weight-read limit; TPOT p50 0.96 ms")
    assert batch1["runs"][0]["raw_path"] == "results/targets_raw/serving-1b/out.json"
    assert batch1["command"] == "python scripts/serving-1b.py" and batch1["runs"][0]["commit"] == "1111111aaaa"


def test_met_only_if_every_run_meets_it_and_the_spread_is_shown():
    runs = {"a": run("serving-1b", serving_raw(62_000.0, 71.0)), "b": run("serving-1b", serving_raw(64_000.0, 73.0)),
            "c": run("serving-1b", serving_raw(58_000.0, 66.0))}
    [both] = summarize(runs, {"serving-1b": ["a", "b"]})
    assert (both["met"], both["verdict"]) == (True, "met in all 2 runs")
    assert both["measured_text"].startswith("62,000–64,000 tok/s = 71.0–73.0% of the")
    assert both["measured"]["output_tok_s"] == (62_000.0, 64_000.0)
    [three] = summarize(runs, {"serving-1b": ["a", "b", "c"]})
    assert (three["met"], three["verdict"]) == (False, "NOT met: met in 2 of 3 runs")
    assert [r["met"] for r in three["runs"]] == [True, True, False]


def test_one_run_of_several_failing_means_not_met_and_its_log_tail_is_reported():
    runs = {"a": run("serving-1b", serving_raw(62_000.0, 71.0)), "b": run("serving-1b", None, status="failed")}
    rows = summarize(runs, {"serving-1b": ["a", "b"]})
    [row] = rows
    assert (row["met"], row["verdict"]) == (False, "NOT met: 1 failed (of 2 runs)")
    assert row["measured_text"].startswith("62,000 tok/s")  # the finished run's figures
    text = report({"metadata": {"command": "fms bench targets", "device": "NVIDIA H200", "device_type": "cuda",
                                "commit": "1111111aaaa", "complete": True}, "rows": rows, "runs": runs})
    assert "| 2, 1 failed |" in text
    assert "serving-1b, run b: failed after 42 s (return code -9); log results/targets_raw/serving-1b/log.txt" in text
    assert "RuntimeError: CUDA out of memory" in text


def test_a_timed_out_row_is_reported_as_such():
    # the start-up benchmark wrote its cold run before the row's timeout killed it during the warm one
    partial = startup_raw({"status": "ok", "phases_s": {"get_model_s": 6.0, "engine_s": 50.0}},
                          {"status": "timed_out", "running": "engine", "phases_s": {"get_model_s": 5.0}})
    runs = {"s": run("startup-8b", partial, status="timed_out")}
    rows = summarize(runs, {"startup-8b": ["s"]})
    [row] = rows
    assert (row["met"], row["verdict"]) == (False, "NOT met: 1 timed out (of 1 runs)")
    assert row["measured_text"] == "-" and row["runs"][0]["measured"]["engine_cold_s"] == 50.0
    text = report({"metadata": {"command": "x", "device_type": "cuda", "complete": False}, "rows": rows, "runs": runs})
    assert "| 1, 1 timed out |" in text and "timed out after 42 s" in text and "CUDA out of memory" in text
    assert "(in progress, or stopped before the last run)" in text


def test_startup_rows_take_their_targets_and_checks_from_the_startup_benchmark():
    ok = {"status": "ok", "phases_s": {"get_model_s": 6.0, "engine_s": 40.0}}
    warm = {"status": "ok", "phases_s": {"get_model_s": 5.0, "engine_s": 16.0}}
    checks = [("cold", ("get_model",), True), ("warm", ("get_model",), True), ("cold", ("engine",), True),
              ("warm", ("engine",), False)]
    [row] = summarize({"s": run("startup-8b", startup_raw(ok, warm, checks))}, {"startup-8b": ["s"]})
    assert row["target"] == "get_model <= 10 s (cold, warm); LLMEngine <= 45 s (cold); LLMEngine <= 15 s (warm)"
    assert row["measured_text"] == "get_model 6.0 / 5.0 s, LLMEngine 40.0 / 16.0 s (cold / warm)"
    assert (row["met"], row["verdict"]) == (False, "NOT met")
    all_met = [(r, p, True) for r, p, _ in checks]
    [row] = summarize({"s": run("startup-8b", startup_raw(ok, warm, all_met))}, {"startup-8b": ["s"]})
    assert row["met"] is True
    # the cold start timed out inside the benchmark: its check was not reached, so the target is not met
    cut = startup_raw({"status": "timed_out", "running": "engine", "phases_s": {"get_model_s": 6.0}},
                      {"status": "skipped"}, [("cold", ("get_model",), True), ("cold", ("engine",), None)])
    [row] = summarize({"s": run("startup-8b", cut)}, {"startup-8b": ["s"]})
    assert row["met"] is False
    assert row["measured_text"] == ("get_model 6.0 / - s, LLMEngine - / - s (cold / warm); cold timed_out in engine; "
                                    "warm skipped")
    [hybrid] = summarize({}, {"startup-hybrid": []})
    assert hybrid["target"] == "get_model + LLMEngine <= 30 s (cold)" and hybrid["verdict"] == "not run"


def test_serving_8b_needs_its_floor_share_and_the_hf_peer_in_the_same_run():
    peer = {"system": "hf generate_batch", "output_tokens_per_s": 1_500.0}
    failed_peer = {"system": "hf generate_batch", "error": "RuntimeError: generate_batch failed"}
    runs = {"a": run("serving-8b", serving_raw(15_000.0, 61.0, peer=peer)),
            "b": run("serving-8b", serving_raw(15_000.0, 61.0, peer=failed_peer)),
            "c": run("serving-8b", serving_raw(12_000.0, 50.0, peer=peer))}
    verdicts = {k: summarize(runs, {"serving-8b": [k]})[0] for k in runs}
    assert verdicts["a"]["met"] is True
    assert verdicts["a"]["measured_text"].endswith("hf generate_batch 1,500 tok/s (fms 10.0x)")
    assert verdicts["b"]["met"] is False
    assert verdicts["b"]["measured_text"].endswith("hf generate_batch: RuntimeError: generate_batch failed")
    assert verdicts["c"]["met"] is False


def test_eval_row_compares_per_batch_times_and_is_judged_on_the_cpu_too():
    runs = {"slow": run("eval-fp32", eval_raw(0.030, 0.036), device_type="cpu"),
            "fast": run("eval-fp32", eval_raw(0.030, 0.027), device_type="cpu")}
    slow = summarize(runs, {"eval-fp32": ["slow"]})[0]
    assert slow["measured_text"] == "paged 12.0 against default 10.0 ms per batch (1.20x); answers agree 100%"
    assert (slow["met"], slow["cpu_stand_in"]) == (False, False)
    assert summarize(runs, {"eval-fp32": ["fast"]})[0]["met"] is True
    shared = eval_raw(0.030, 0.024)
    shared["modes"]["default"].update(shared_context=False, input_tokens=827)
    shared["modes"]["paged"].update(shared_context=True, input_tokens=419)
    row = summarize({"s": run("eval-fp32", shared, device_type="cpu")}, {"eval-fp32": ["s"]})[0]
    assert row["measured_text"].endswith("(0.80x); answers agree 100%; paged shared each question's context "
                                         "(419 against 827 input tokens)") and row["met"] is True


def test_eval_row_judges_the_median_of_interleaved_pairs_and_shows_its_interval():
    raw = eval_raw(0.030, 0.036)  # the median passes alone would say 1.20x
    raw["comparison"]["latency_ratio"] = {"runs": [0.97, 0.99, 1.0, 0.95, 0.98, 1.02], "median": 0.975,
                                          "ci95": [0.95, 1.02]}
    row = summarize({"p": run("eval-fp32", raw)}, {"eval-fp32": ["p"]})[0]
    assert row["met"] is True
    assert row["measured_text"] == ("paged 12.0 against default 10.0 ms per batch (median of 6 interleaved pairs "
                                    "0.975x, 95% interval 0.950-1.020); answers agree 100%")
    raw["comparison"]["latency_ratio"].update(median=1.01, ci95=None)
    row = summarize({"p": run("eval-fp32", raw)}, {"eval-fp32": ["p"]})[0]
    assert row["met"] is False and "(median of 6 interleaved pairs 1.010x);" in row["measured_text"]


def test_cpu_runs_are_stand_ins_with_no_verdict():
    runs = {"a": run("serving-1b", serving_raw(62_000.0, 71.0), device_type="cpu")}
    [row] = summarize(runs, {"serving-1b": ["a"]})
    assert (row["met"], row["verdict"], row["cpu_stand_in"]) == (None, "n/a (CPU)", True)
    assert row["runs"][0]["met"] is None
    text = report({"metadata": {"command": "x", "device_type": "cpu", "complete": True}, "rows": [row], "runs": runs})
    assert "1B serving: 128 requests, prompts 64-512, 256 new (CPU stand-in)" in text
    assert "The targets apply to the GPU only" in text


def test_hybrid_serving_is_not_met_without_the_hf_static_peer():
    [row] = summarize({"a": run("serving-hybrid", serving_raw(3_700.0, 20.0))}, {"serving-hybrid": ["a"]})
    assert row["met"] is False and "HF static generate: not run" in row["measured_text"]
    peer = {"system": "hf generate", "output_tokens_per_s": 900.0}
    [row] = summarize({"a": run("serving-hybrid", serving_raw(3_700.0, 20.0, peer=peer))}, {"serving-hybrid": ["a"]})
    assert row["met"] is True and row["measured_text"].endswith("HF static generate 900 tok/s")


def test_an_unreadable_json_is_a_failed_run_not_a_crash():
    runs = {"a": run("serving-1b", {"results": [{"system": "something else"}]})}
    [row] = summarize(runs, {"serving-1b": ["a"]})
    assert row["met"] is False and row["verdict"] == "NOT met: 1 unreadable (of 1 runs)"
    assert "no 'fms LLMEngine' row in the serving JSON" in row["runs"][0]["read_error"]


# -- merging ------------------------------------------------------------------------------------------------
def test_merging_two_results_files_adds_runs_row_by_row(tmp_path, capsys):
    first = results_file(tmp_path / "a.json",
                         {"serving-1b-1": run("serving-1b", serving_raw(62_000.0, 71.0)),
                          "eval-fp32-1": run("eval-fp32", eval_raw(0.03, 0.027))},
                         {"serving-1b": ["serving-1b-1"], "eval-fp32": ["eval-fp32-1"]})
    second = results_file(tmp_path / "b.json",
                          {"serving-1b-1": run("serving-1b", serving_raw(58_000.0, 66.0), commit="2222222bbbb"),
                           "startup-8b-1": run("startup-8b", None, status="timed_out", commit="2222222bbbb")},
                          {"serving-1b": ["serving-1b-1"], "startup-8b": ["startup-8b-1"]}, commit="2222222bbbb")
    merged = merge_results([first, second])
    assert [r["name"] for r in merged["rows"]] == ["startup-8b", "serving-1b", "eval-fp32"]  # the order
    serving = row_of(merged["rows"], "serving-1b")
    assert [r["run"] for r in serving["runs"]] == ["serving-1b-1", "serving-1b-2"]  # renamed, both kept
    assert [r["commit"] for r in serving["runs"]] == ["1111111aaaa", "2222222bbbb"]
    assert (serving["met"], serving["verdict"]) == (False, "NOT met: met in 1 of 2 runs")
    assert row_of(merged["rows"], "eval-fp32")["met"] is True
    assert row_of(merged["rows"], "startup-8b")["verdict"] == "NOT met: 1 timed out (of 1 runs)"
    assert merged["metadata"]["commit"] == "1111111aaaa / 2222222bbbb"
    assert [s["path"] for s in merged["metadata"]["merged_from"]] == [str(first), str(second)]
    # the command line: merge, write, and the table names both commits on the row that has both
    output = tmp_path / "merged.json"
    targets_main(["--from-results", str(first), str(second), "--output", str(output), "--rows", "serving-1b"])
    written = json.loads(output.read_text())
    assert [r["name"] for r in written["rows"]] == ["serving-1b"] and len(written["runs"]) == 2
    out = capsys.readouterr().out
    assert "| 2 (commits 1111111, 2222222) |" in out and output.with_suffix(".md").read_text() in out + "\n"
    again = merge_results([output, second])  # a merged file merges again: its runs keep adding up
    assert len(row_of(again["rows"], "serving-1b")["runs"]) == 3


def test_merging_a_cpu_file_into_gpu_results_is_refused(tmp_path):
    gpu = results_file(tmp_path / "gpu.json", {"a": run("eval-fp32", eval_raw(0.03, 0.03))}, {"eval-fp32": ["a"]})
    cpu = results_file(tmp_path / "cpu.json", {"a": run("eval-fp32", eval_raw(0.03, 0.03), device_type="cpu")},
                       {"eval-fp32": ["a"]}, device_type="cpu")
    with pytest.raises(ValueError, match=r"cannot merge results of different device types \['cpu', 'cuda'\]"):
        merge_results([gpu, cpu])
    (tmp_path / "other.json").write_text(json.dumps({"models": []}))
    with pytest.raises(ValueError, match="other.json is not a targets results file"):
        merge_results([tmp_path / "other.json"])


# -- configuration and the command line ------------------------------------------------------------------------
@pytest.mark.parametrize("options, message", [
    (dict(rows=("serving-1b", "nope")), "rows: unknown row(s) ['nope']; allowed: startup-8b, startup-hybrid,"),
    (dict(rows=()), "rows: unknown row(s) []"),
    (dict(repeats=0), "repeats must be an int >= 1, got 0"),
    (dict(timeout_s=float("nan")), "timeout_s must be a number of seconds > 0, got nan"),
    (dict(budget_s=-1), "budget_s must be a number of seconds > 0, got -1"),
    (dict(device="tpu"), "device must be cuda or cpu, got 'tpu'"),
    (dict(from_results=("no/such.json",)), "from_results: no such file(s) ['no/such.json']"),
    (dict(compile_scope="blocks"), "compile_scope must be one of model, layers or None (the engine's default), "
                                   "got 'blocks'"),
])
def test_bad_config_names_the_value(options, message):
    with pytest.raises(ValueError) as exc:
        TargetsConfig(**{"device": "cpu", **options})
    assert message in str(exc.value)


def test_help_and_dry_run(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "targets", "--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and "usage: fms bench targets" in out
    for flag in ("--rows", "--repeats", "--timeout", "--budget", "--from-results", "--output", "--dry-run"):
        assert flag in out, flag
    assert main(["bench", "--help"]) == 0 and "targets" in capsys.readouterr().out
    config = targets_config(["--device", "cpu", "--rows", "eval-fp32,batch1-1b,serving-1b", "--output", "r/t.json"])
    assert [job.name for job in config.jobs()] == ["eval-fp32", "serving-1b"]  # one job for both 1B rows
    assert config.raw_dir == Path("r/t_raw") and config.command.startswith("fms bench targets --device cpu")
    assert main(["bench", "targets", "--device", "cpu", "--rows", "batch1-1b", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("serving-1b (rows batch1-1b): python scripts/benchmark_serving.py --device cpu")
    assert "--batch1_tokens 16" in out
    # --compile-scope reaches the start-up and serving jobs, not the eval
    assert main(["bench", "targets", "--device", "cpu", "--rows", "startup-8b,serving-8b,eval-fp32",
                 "--compile-scope", "layers", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert ["--compile-scope layers" in lines[0], "--compile_scope layers" in lines[1], "compile" in lines[2]] \
        == [True, True, False], lines
    with pytest.raises(SystemExit) as exc:
        targets_config(["--rows", "serving-2b"])
    assert exc.value.code == 2 and "unknown row(s) ['serving-2b']" in capsys.readouterr().err


# -- real child processes ---------------------------------------------------------------------------------
def _python_job(name, code):
    return targets.Job(name, lambda ctx: ["-c", code, str(ctx.run_dir)], "out.json")


@pytest.fixture
def scripted_rows(monkeypatch):
    """eval-fp32 and serving-hybrid read scripted jobs: one that hangs (with a grandchild in a session of its own,
    as the start-up benchmark's children are), one that fails."""
    hang = _python_job("hang", "import subprocess, sys, time\n"
                               "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], "
                               "start_new_session=True)\n"
                               "open(sys.argv[1] + '/grandchild.pid', 'w').write(str(p.pid))\n"
                               "print('hanging', flush=True)\ntime.sleep(120)\n")
    fail = _python_job("fail", "import sys\nprint('boom: bad flag', flush=True)\nsys.exit(3)\n")
    rows = tuple(dataclasses.replace(row, job=hang) if row.name == "eval-fp32" else
                 dataclasses.replace(row, job=fail) if row.name == "serving-hybrid" else row for row in targets.ROWS)
    monkeypatch.setattr(targets, "ROWS", rows)
    monkeypatch.setattr(targets, "ROWS_BY_NAME", {row.name: row for row in rows})


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"  # killed, waiting for init to reap it


def test_a_run_past_its_timeout_is_killed_with_everything_below_it_and_the_next_row_still_runs(
        tmp_path, scripted_rows, capsys):
    output = tmp_path / "targets.json"
    start = time.perf_counter()
    results = targets_main(["--device", "cpu", "--rows", "eval-fp32,serving-hybrid", "--timeout", "3",
                            "--output", str(output)])
    assert time.perf_counter() - start < 30
    hung, failed = row_of(results["rows"], "eval-fp32"), row_of(results["rows"], "serving-hybrid")
    assert hung["verdict"] == "NOT met: 1 timed out (of 1 runs)"  # eval-fp32 is judged on the CPU too
    assert failed["verdict"] == "n/a (CPU): 1 failed (of 1 runs)"
    hung_run, failed_run = results["runs"]["hang-1"], results["runs"]["fail-1"]
    assert hung_run["status"] == "timed_out" and 3 <= hung_run["wall_s"] < 20 and "hanging" in hung_run["log_tail"]
    pid = int((tmp_path / "targets_raw" / "hang-1" / "grandchild.pid").read_text())
    deadline = time.time() + 5
    while not _gone(pid) and time.time() < deadline:
        time.sleep(0.05)
    assert _gone(pid)
    assert failed_run["status"] == "failed" and failed_run["returncode"] == 3
    assert "boom: bad flag" in failed_run["log_tail"]
    written = json.loads(output.read_text())
    assert written["metadata"]["complete"] is True and set(written["runs"]) == {"hang-1", "fail-1"}
    out = capsys.readouterr().out
    assert "eval-fp32, run hang-1: timed out after" in out and "boom: bad flag" in out


def test_a_spent_budget_skips_the_runs_left(tmp_path, scripted_rows):
    results = targets_main(["--device", "cpu", "--rows", "eval-fp32,serving-hybrid", "--timeout", "60",
                            "--budget", "2", "--output", str(tmp_path / "t.json")])
    assert results["runs"]["hang-1"]["status"] == "timed_out" and results["runs"]["hang-1"]["timeout_s"] <= 2
    [skipped] = [r for r in results["runs"].values() if r["job"] == "fail"]
    assert skipped["status"] == "skipped" and "the budget of 2 s was spent" in skipped["error"]


def test_two_cheap_rows_end_to_end_on_the_cpu(tmp_path, capsys):
    output = tmp_path / "targets.json"
    results = targets_main(["--device", "cpu", "--rows", "eval-fp32,serving-hybrid", "--timeout", "120",
                            "--output", str(output), "--commit", "feedbeef"])
    written = json.loads(output.read_text())
    assert written["rows"] == json.loads(json.dumps(results["rows"]))
    meta = written["metadata"]
    assert meta["device_type"] == "cpu" and meta["device"].startswith("cpu") and meta["commit"] == "feedbeef"
    assert meta["complete"] is True and meta["command"].startswith("fms bench targets --device cpu")
    assert [r["name"] for r in written["rows"]] == ["eval-fp32", "serving-hybrid"]
    for row in written["rows"]:
        [ran] = row["runs"]
        full = written["runs"][ran["run"]]
        assert ran["status"] == "ok" and ran["commit"] == "feedbeef" and full["raw"] is not None
        raw_path = Path(full["raw_path"])
        assert raw_path.is_file() and json.loads(raw_path.read_text()) == full["raw"]
        assert raw_path.parent.parent == tmp_path / "targets_raw"
    eval_row, hybrid = row_of(written["rows"], "eval-fp32"), row_of(written["rows"], "serving-hybrid")
    assert eval_row["command"].startswith("python scripts/eval.py --task truthfulqa_mc2 --data "
                                          "fms/resources/eval/truthfulqa_mc.json --mode both --dtype fp32")
    assert eval_row["met"] in (True, False) and eval_row["measured"]["answer_agreement"] == 1.0
    assert eval_row["measured"]["paged_ms_per_batch"] > 0 and eval_row["measured"]["default_ms_per_batch"] > 0
    assert hybrid["verdict"] == "n/a (CPU)" and hybrid["cpu_stand_in"] is True
    assert "--architecture granite_hybrid --variant h-nano" in hybrid["command"]
    assert hybrid["measured"]["output_tok_s"] > 0 and hybrid["measured"]["hf_static_tok_s"] is None
    out = capsys.readouterr().out
    assert "| row | measured | target | met? | runs | command |" in out
    assert "CPU stand-ins: tiny models and workloads" in out
    table = output.with_suffix(".md").read_text()
    assert "| `serving-hybrid`: Granite-4.0-H-1B serving: 64 requests, prompts 512-2048, 128 new (CPU stand-in) |" \
        in table
    assert sys.executable not in table  # the interpreter is written as python, the scripts relative to the repository
