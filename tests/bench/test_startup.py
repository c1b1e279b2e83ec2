"""The start-up benchmark (fms.bench.startup, `fms bench startup`): config checks, the targets' comparison, and
real cold / warm child processes of llama "micro" on the CPU, one of them past its timeout."""

import json
import os
import tempfile

import pytest

from fms.bench.startup import StartupBenchConfig, check_targets
from fms.entrypoints.bench_cli import startup_config, startup_main

PHASE_KEYS = ["process_start_s", "import_s", "get_model_s", "engine_s", "first_generate_s"]
CACHE_VARS = ["TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"]


@pytest.mark.parametrize("options, message", [
    (dict(models=("llama",)), "models: 'llama' is not ARCHITECTURE:VARIANT"),
    (dict(models=("llama:nope",)), "models: 'llama:nope': unknown variant 'nope' for architecture 'llama'; allowed:"),
    (dict(models=("nope:x",)), "models: 'nope:x': unknown architecture 'nope'"),
    (dict(models=()), "models must name at least one ARCHITECTURE:VARIANT, got none"),
    (dict(models=("llama:micro", "llama:micro")), "models: ['llama:micro'] given more than once"),
    (dict(device="tpu"), "device must be cuda or cpu (optionally cuda:N), got 'tpu'"),
    (dict(dtype="int8"), "unknown data_type 'int8'"),
    (dict(timeout_s=0), "timeout_s must be a number of seconds > 0, got 0"),
    (dict(timeout_s=float("inf")), "timeout_s must be a number of seconds > 0, got inf"),
    (dict(prompt_len=0), "prompt_len must be an int >= 1, got 0"),
    (dict(max_tokens=2.5), "max_tokens must be an int >= 1, got 2.5"),
    (dict(engine_options={"bogus": 1}), "unknown engine option(s) ['bogus']"),
    (dict(engine_options={"max_num_seqs": 0}), "max_num_seqs must be an int >= 1 or None (the default), got 0"),
    (dict(runs=("warm", "cold")), "runs must be cold, warm or cold,warm (in that order), got 'warm,cold'"),
    (dict(runs=("hot",)), "runs must be cold, warm or cold,warm (in that order), got 'hot'"),
    (dict(runs=("warm",)), "runs=warm alone needs cache_dir"),
])
def test_bad_config_names_the_value(options, message):
    with pytest.raises(ValueError) as exc:
        StartupBenchConfig(**{"device": "cpu", **options})
    assert message in str(exc.value)


def test_cpu_default_is_the_micro_demo():
    assert StartupBenchConfig(device="cpu").models == ("llama:micro",)


def test_cli_passes_only_the_engine_options_given(capsys):
    config = startup_config(["--device", "cpu", "--models", "llama:micro,llama:nano", "--no-compile",
                             "--max-num-seqs", "4", "--timeout", "30"])
    assert config.models == ("llama:micro", "llama:nano") and config.timeout_s == 30
    assert config.engine_options == {"max_num_seqs": 4, "compile_decode": False, "compile_prefill": False}
    assert config.command.startswith("fms bench startup --device cpu")
    with pytest.raises(SystemExit) as exc:
        startup_config(["--device", "cpu", "-tp", "2"])
    assert exc.value.code == 2
    assert "--tensor-parallel-size must be 1 here (one process per start), got 2" in capsys.readouterr().err


def test_kept_cache_folders_must_be_empty_for_cold_and_filled_for_warm_alone(tmp_path):
    config = StartupBenchConfig(device="cpu", models=("llama:micro",), runs=("warm",), cache_dir=tmp_path)
    inductor = tmp_path / "llama-micro" / "inductor"
    assert config.model_cache_dirs("llama:micro")["TORCHINDUCTOR_CACHE_DIR"] == str(inductor)
    with pytest.raises(ValueError, match=f"runs=warm alone needs the caches of a cold run, but {inductor} holds no"):
        config.check_cache_dir()
    (inductor / "fxgraph").mkdir(parents=True)
    (inductor / "fxgraph" / "entry").write_text("x")
    config.check_cache_dir()  # a cold run filled it: warm may run
    cold = StartupBenchConfig(device="cpu", models=("llama:micro",), runs=("cold",), cache_dir=tmp_path)
    with pytest.raises(ValueError, match=f"a cold run needs empty compile caches, but {inductor} holds 1 files"):
        cold.check_cache_dir()


def test_targets_compare_the_phase_sums_of_the_named_run():
    runs = {"cold": {"status": "ok", "phases_s": {"get_model_s": 6.0, "engine_s": 50.0}},
            "warm": {"status": "ok", "phases_s": {"get_model_s": 11.0, "engine_s": 14.0}}}
    checks = {(c["run"], tuple(c["phases"])): (c["measured_s"], c["met"])
              for c in check_targets("llama:3.1-8b", "cuda", runs)}
    assert checks == {("cold", ("get_model",)): (6.0, True), ("warm", ("get_model",)): (11.0, False),
                      ("cold", ("engine",)): (50.0, False), ("warm", ("engine",)): (14.0, True)}
    hybrid = check_targets("granite_hybrid:4.0-h-1b", "cuda", {"cold": {"phases_s": {"get_model_s": 4.0,
                                                                                     "engine_s": 25.0}}})
    assert [(c["measured_s"], c["met"], c["limit_s"]) for c in hybrid] == [(29.0, True, 30.0)]
    # a run that stopped before the phase: not measured, neither met nor missed
    cut = check_targets("granite_hybrid:4.0-h-1b", "cuda", {"cold": {"phases_s": {"get_model_s": 4.0}}})
    assert [(c["measured_s"], c["met"]) for c in cut] == [(None, None)]
    assert check_targets("llama:3.1-8b", "cpu", runs) == []  # the bounds are for CUDA
    assert check_targets("llama:micro", "cuda", runs) == []


def test_cold_then_warm_run_in_fresh_processes_on_the_caches_of_the_first(tmp_path, capsys):
    output = tmp_path / "startup.json"
    startup_main(["--device", "cpu", "--models", "llama:micro", "--no-compile", "--max-num-seqs", "2",
                  "--num-pages", "16", "--max-tokens", "3", "--output", str(output)])
    results = json.loads(output.read_text())
    assert results["metadata"]["command"].startswith("fms bench startup --device cpu")
    assert results["metadata"]["device_type"] == "cpu" and results["metadata"]["complete"] is True
    assert results["default_engine"] is False
    [row] = results["models"]
    assert row["model"] == "llama:micro" and row["targets"] == []
    cold, warm = row["runs"]["cold"], row["runs"]["warm"]
    for run in (cold, warm):
        assert run["status"] == "ok" and run["returncode"] == 0 and run["done"] is True
        assert list(run["phases_s"]) == PHASE_KEYS and all(t > 0 for t in run["phases_s"].values())
        assert run["total_s"] == pytest.approx(sum(run["phases_s"].values()))
        assert run["wall_s"] >= run["total_s"] - run["phases_s"]["process_start_s"]
        assert set(run["engine_phases_s"]) == {"KV pool", "decode step: compile + graph capture", "prefill warm-up"}
        assert run["num_output_tokens"] == 3 and run["peak_rss_gb"] > 0 and run["device_name"] == "cpu"
        # the engine options reached the child's engine
        assert run["engine_config"]["max_num_seqs"] == 2 and run["engine_config"]["compile_decode"] is False
    assert len({cold["pid"], warm["pid"], os.getpid()}) == 3  # two fresh processes
    # the cold child saw the parent's fresh, empty cache folders; the warm child saw the same ones
    for var in CACHE_VARS:
        folder = row["cache_dirs"][var]
        assert cold["env"][var] == warm["env"][var] == folder
        assert folder.startswith(tempfile.gettempdir()) and "fms-startup-" in folder
        assert cold["cache_files_at_start"][var] == 0
        assert not os.path.exists(folder)  # removed after the model's runs
    assert len({row["cache_dirs"][v] for v in CACHE_VARS}) == 2
    out = capsys.readouterr().out
    assert "| model | phase | cold s | warm s |" in out and "| llama:micro | status | ok | ok |" in out


def test_a_child_past_its_timeout_is_recorded_with_the_phases_it_finished(tmp_path, capsys):
    # 4000 new tokens take a minute on the CPU (eager FlexAttention over the pool): the first generate()
    # cannot finish in 12 s, while imports, get_model and the engine take about 5 s
    output = tmp_path / "startup.json"
    startup_main(["--device", "cpu", "--models", "llama:micro", "--max-tokens", "4000", "--timeout", "12",
                  "--output", str(output)])
    [row] = json.loads(output.read_text())["models"]
    cold = row["runs"]["cold"]
    assert cold["status"] == "timed_out" and cold["returncode"] != 0 and cold["done"] is False
    assert 12 <= cold["wall_s"] < 60
    assert "first_generate_s" not in cold["phases_s"]
    running = PHASE_KEYS.index(f"{cold['running']}_s")  # the phase it was in when killed
    assert list(cold["phases_s"]) == PHASE_KEYS[:running] and running >= 2  # at least the imports finished
    assert all(t > 0 for t in cold["phases_s"].values())
    # where it was when killed: faulthandler's stack of the child's main thread, outermost frame first
    assert cold["stack_at_timeout"][0].startswith("fms/bench/startup.py")
    assert row["runs"]["warm"] == {"status": "skipped", "reason": "the cold run timed_out"}
    assert "timed_out in" in capsys.readouterr().out
