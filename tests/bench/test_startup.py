"""The start-up benchmark (fms.bench.startup, `fms bench startup`): config checks, the targets' comparison, and
real cold / warm child processes of llama "micro" on the CPU, one of them past its timeout; checkpoint mode: the
writer's HF checkpoint, the child's load of it, load GB/s, the page cache, and bad checkpoint folders."""

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from fms.bench.startup import (CHECKPOINT_MARKER, StartupBenchConfig, _child_spec, build_model, check_targets,
                               evict_page_cache, page_cache_fraction, prepare_checkpoint, write_hf_checkpoint)
from fms.entrypoints.bench_cli import startup_config, startup_main
from fms.models import get_model

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
        # nothing compiled, so dynamo traced nothing
        assert run["dynamo"] == run["dynamo_with_first_generate"] == {"graphs_traced": 0, "recompiles": []}
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


# -- checkpoint mode --------------------------------------------------------------------------------------
def _hf_names(prefix="model.layers.{}."):
    """Our llama parameter -> the HF tensors stacked on dim 0 to make it (written by hand: the test's own map)."""
    layer = {"ln.weight": ["input_layernorm.weight"], "ff_ln.weight": ["post_attention_layernorm.weight"],
             "mixer.qkv_fused.weight": [f"self_attn.{n}_proj.weight" for n in "qkv"],
             "mixer.dense.weight": ["self_attn.o_proj.weight"],
             "ff.wg1_fused.weight": ["mlp.gate_proj.weight", "mlp.up_proj.weight"],
             "ff.w2.weight": ["mlp.down_proj.weight"]}

    def sources(name):
        top = {"embedding.weight": ["model.embed_tokens.weight"], "head.weight": ["lm_head.weight"],
               "dec_norm.weight": ["model.norm.weight"]}
        if name in top:
            return top[name]
        _, index, rest = name.split(".", 2)
        return [prefix.format(index) + n for n in layer[rest]]

    return sources


def _file_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})
    return tensors


def _safetensors_sizes(folder: Path) -> int:
    return sum(os.path.getsize(f) for f in folder.glob("*.safetensors"))


@pytest.mark.parametrize("options, message", [
    (dict(checkpoint=1), "checkpoint must be a bool, got 1"),
    (dict(checkpoint_dir="somewhere"), "checkpoint_dir (somewhere) is where checkpoint mode keeps its checkpoints; "
                                       "give checkpoint=True (--checkpoint) with it"),
])
def test_bad_checkpoint_options_name_the_value(options, message):
    with pytest.raises(ValueError) as exc:
        StartupBenchConfig(device="cpu", models=("llama:micro",), **options)
    assert message in str(exc.value)


def test_a_checkpoint_dir_holding_something_else_is_refused(tmp_path, capsys):
    def config(**options):
        return StartupBenchConfig(device="cpu", models=("llama:micro",), checkpoint=True, **options)

    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ValueError, match=f"checkpoint_dir {a_file} is a file; give a folder"):
        config(checkpoint_dir=a_file)
    with pytest.raises(SystemExit) as exc:  # the command line says the same, as a usage error
        startup_config(["--device", "cpu", "--models", "llama:micro", "--checkpoint", "--checkpoint-dir", str(a_file)])
    assert exc.value.code == 2 and f"checkpoint_dir {a_file} is a file" in capsys.readouterr().err
    # the model's folder holds files that this benchmark did not write: never overwritten
    (tmp_path / "llama-micro").mkdir()
    (tmp_path / "llama-micro" / "model.safetensors").write_text("someone's weights")
    with pytest.raises(ValueError, match=f"checkpoint_dir: {tmp_path / 'llama-micro'} holds files, but not the "
                                         "checkpoint this benchmark writes for llama:micro .dtype float32, seed 0; "
                                         f"found no {CHECKPOINT_MARKER}.; remove the folder"):
        config(checkpoint_dir=tmp_path)
    # ... or one it wrote for another seed
    marker = {"model": "llama:micro", "dtype": "float32", "seed": 1, "files": {"model.safetensors": 17}}
    (tmp_path / "llama-micro" / CHECKPOINT_MARKER).write_text(json.dumps(marker))
    with pytest.raises(ValueError, match="found model='llama:micro', dtype='float32', seed=1"):
        config(checkpoint_dir=tmp_path)
    # ... or the right one, with a file changed since
    (tmp_path / "llama-micro" / CHECKPOINT_MARKER).write_text(json.dumps(dict(marker, seed=0)))
    (tmp_path / "llama-micro" / "model.safetensors").write_text("shorter")
    with pytest.raises(ValueError, match=r"is incomplete: \['model.safetensors'\] missing or changed"):
        config(checkpoint_dir=tmp_path)
    (tmp_path / "llama-micro" / "model.safetensors").write_text("x" * 17)
    assert config(checkpoint_dir=tmp_path).kept_checkpoint("llama:micro")["seed"] == 0  # reused as it is


def test_written_checkpoint_is_hf_shards_of_the_random_weights(tmp_path):
    # llama nano with a tied head, in shards of at most 40 kB: HF's names, file names and index
    model = get_model("llama", "nano", seed=3, tie_word_embeddings=True)
    files = write_hf_checkpoint(model, "llama", tmp_path, max_shard_bytes=40_000)
    shards = sorted(f for f in files if f.endswith(".safetensors"))
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert files == {f.name: f.stat().st_size for f in tmp_path.iterdir()}
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    stored = _file_tensors(tmp_path)
    assert set(index["weight_map"]) == set(stored) and "lm_head.weight" not in stored  # tied: written once
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in stored.values())
    for shard in shards:
        with safe_open(str(tmp_path / shard), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            sizes = [f.get_tensor(n).numel() * 4 for n in f.keys()]
            assert sum(sizes) <= 40_000 or len(sizes) == 1
    sources = _hf_names()
    for name, param in model.named_parameters():
        assert torch.equal(torch.cat([stored[s] for s in sources(name)]), param), name
    loaded = get_model("hf_pretrained", model_path=str(tmp_path))
    assert loaded.config.tie_word_embeddings and loaded.head.weight is loaded.embedding.weight
    assert loaded.config.eos_token_id == model.config.eos_token_id


def test_written_hybrid_checkpoint_loads_as_the_same_model(tmp_path):
    model = get_model("granite_hybrid", "h-nano", seed=0, data_type="bf16")
    files = write_hf_checkpoint(model, "granite_hybrid", tmp_path)
    assert sorted(files) == ["config.json", "model.safetensors"]  # under one shard's size: one file, no index
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded = dict(get_model("hf_pretrained", model_path=str(tmp_path), data_type="bf16").named_parameters())
    params = dict(model.named_parameters())
    assert sorted(loaded) == sorted(params)
    for name, param in params.items():
        assert loaded[name].dtype == torch.bfloat16 and torch.equal(loaded[name], param), name


def test_page_cache_fraction_sees_reads_and_the_drop(tmp_path):
    file = tmp_path / "weights.bin"
    file.write_bytes(os.urandom(1 << 20))
    file.read_bytes()
    assert page_cache_fraction([file]) == 1.0  # just written and read
    assert evict_page_cache([file]) is True
    dropped = page_cache_fraction([file])
    if dropped == 1.0:
        pytest.skip(f"this filesystem keeps {tmp_path} in memory (tmpfs?): its pages cannot be dropped")
    assert dropped < 0.1
    with file.open("rb") as f:
        f.read(1 << 19)  # the first half
    assert 0.4 <= page_cache_fraction([file]) <= 1.0
    assert page_cache_fraction([]) is None


def test_checkpoint_mode_times_the_load_of_the_written_weights(tmp_path, capsys):
    output, kept = tmp_path / "startup.json", tmp_path / "checkpoints"
    startup_main(["--device", "cpu", "--models", "llama:micro", "--no-compile", "--max-num-seqs", "2",
                  "--num-pages", "16", "--max-tokens", "3", "--checkpoint", "--checkpoint-dir", str(kept),
                  "--output", str(output)])
    results = json.loads(output.read_text())
    assert results["weights"] == "checkpoint" and "page cache" in results["page_cache_note"]
    assert results["config"]["checkpoint"] is True
    [row] = results["models"]
    checkpoint, folder = row["checkpoint"], kept / "llama-micro"
    assert checkpoint["status"] == "ok" and checkpoint["written_now"] and checkpoint["path"] == str(folder)
    assert checkpoint["dtype"] == "float32" and checkpoint["bytes"] == _safetensors_sizes(folder) > 10**7
    for name in ("cold", "warm"):
        run = row["runs"][name]
        assert run["status"] == "ok" and run["weights"] == "checkpoint"
        assert run["checkpoint_bytes"] == _safetensors_sizes(folder)
        assert run["load_gb_per_s"] == pytest.approx(run["checkpoint_bytes"] / run["phases_s"]["get_model_s"] / 1e9)
        # the files' read alone: part of get_model, and its own rate
        assert 0 < run["weights_read_s"] < run["phases_s"]["get_model_s"]
        assert run["weights_read_gb_per_s"] == pytest.approx(run["checkpoint_bytes"] / run["weights_read_s"] / 1e9)
        assert 0.0 <= run["checkpoint_page_cache"]["resident_fraction_at_start"] <= 1.0
    assert row["runs"]["cold"]["checkpoint_page_cache"]["dropped_before_start"] is True
    warm = row["runs"]["warm"]["checkpoint_page_cache"]
    assert warm["dropped_before_start"] is None  # not dropped: the cold child read it into the page cache
    # Most of it is still cached; not all need be, since the kernel may evict a few pages between the two
    # children (CI once measured 0.998 here).
    assert warm["resident_fraction_at_start"] >= 0.9
    out = capsys.readouterr().out
    assert "| get_model (checkpoint load) |" in out and "|   load GB/s |" in out

    # the child's get_model (build_model, from the spec the parent gave it) holds the written tensors, bit for
    # bit, and those are the random weights the random mode draws
    config = StartupBenchConfig(device="cpu", models=("llama:micro",), checkpoint=True, checkpoint_dir=kept)
    again = prepare_checkpoint(config, "llama:micro", folder, tmp_path)
    assert again["written_now"] is False and again["files"] == checkpoint["files"]  # kept: not written again
    model = build_model(_child_spec(config, "llama:micro", "cold", again), torch.device("cpu"))
    stored, sources = _file_tensors(folder), _hf_names()
    random = dict(get_model("llama", "micro", seed=0, init_on_device=True).named_parameters())
    for name, param in model.named_parameters():
        assert torch.equal(param, torch.cat([stored[s] for s in sources(name)])), name
        assert torch.equal(param, random[name]), name


def test_recompiles_are_recorded_with_the_function_and_the_failed_guard():
    """What the start-up JSON's dynamo.recompiles holds: one entry per recompile, naming the function and the guard."""
    import torch

    from fms.bench.recompiles import RecompileLog, dynamo_graphs

    def scaled(x):
        return x * x.shape[0]

    torch._dynamo.reset()
    compiled = torch.compile(scaled, dynamic=False, backend="eager")
    before = dynamo_graphs()
    with RecompileLog() as recompiles:
        compiled(torch.ones(2))
        compiled(torch.ones(3))  # a static shape: a second trace
    assert dynamo_graphs() - before == 2
    [entry] = recompiles.entries
    assert entry.startswith("Recompiling function scaled") and "- " in entry and "size mismatch" in entry, entry
    compiled(torch.ones(4))  # after the block: not recorded
    assert len(recompiles.entries) == 1
