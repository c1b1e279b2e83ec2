"""fms.entrypoints.server_vs_offline's config: every bad setting is refused with its name and value (the benchmark
itself runs end to end in tests/scripts/test_scripts.py::test_bench_server_vs_offline)."""

import pytest

from fms.entrypoints.server_vs_offline import ServerVsOfflineConfig


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_prompts=0), "num_prompts must be an int >= 1, got 0"),
    (dict(output_len=-2), "output_len must be an int >= 1, got -2"),
    (dict(repeats=True), "repeats must be an int >= 1, got True"),
    (dict(warmup_prompts=-1), "warmup_prompts must be an int >= 0, got -1"),
    (dict(prompt_range="64-512"), "prompt_range must be LO,HI with 1 <= LO <= HI, got '64-512'"),
    (dict(prompt_range="512,64"), "prompt_range must be LO,HI with 1 <= LO <= HI, got '512,64'"),
    (dict(port=70000), "port must be in [1, 65535] or None (a free one), got 70000"),
    (dict(server_timeout=0), "server_timeout must be > 0 seconds, got 0"),
])
def test_bad_settings_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError) as e:
        ServerVsOfflineConfig(**kwargs)
    assert str(e.value) == message


def test_defaults_and_a_single_prompt_length_are_accepted(tmp_path):
    config = ServerVsOfflineConfig(prompt_range="32", output=str(tmp_path / "r.json"))
    assert config.num_prompts == 8 and config.output == tmp_path / "r.json"


def test_the_script_reports_a_bad_flag_as_a_usage_error(capsys):
    from scripts import bench_server_vs_offline

    with pytest.raises(SystemExit) as e:
        bench_server_vs_offline.main(["--num-prompts", "0"])
    assert e.value.code == 2 and "num_prompts must be an int >= 1, got 0" in capsys.readouterr().err


def test_reports_name_the_tree_run_not_the_repository_around_it(monkeypatch):
    """A device run's tree is copied without its .git inside the repository (run.sh's .gpu / .wA); FMS_GIT_COMMIT
    names it, as fms.bench.results.git_commit does for the other benchmarks."""
    from fms.entrypoints.bench_serve import _commit

    monkeypatch.setenv("FMS_GIT_COMMIT", "abc1234-edee959")
    assert _commit() == "abc1234-edee959"
    monkeypatch.delenv("FMS_GIT_COMMIT")
    assert _commit() != "abc1234-edee959"
