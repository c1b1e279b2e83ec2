"""scripts/profile_hybrid.py on the CPU with granite_hybrid h-micro-test, and the scan switch in fms.modules.ssm."""

import json

import pytest
import torch

from fms.modules import ssm
from fms.modules.ssm import select_ssd_scan, ssd_scan_recurrent, ssd_scan_reference, use_ssd_scan
from tests.script_loader import load_script

script = load_script("profile_hybrid")

SMALL = ["--variant", "h-micro-test", "--dtype", "fp32", "--device", "cpu", "--context_lengths", "24",
         "--batch_sizes", "1", "--repeats", "1", "--warmup", "1"]


def test_cpu_run_writes_prefill_split_and_memory(tmp_path):
    argv = [*SMALL, "--paths", "reference,recurrent", "--output_dir", str(tmp_path), "--run_name", "run"]
    assert script.main(argv) == 0
    results = json.loads((tmp_path / "run.json").read_text())
    for key in ("command", "device", "torch_version", "git_commit"):
        assert results["meta"][key]
    assert results["config"]["variant"] == "h-micro-test" and results["config"]["dtype"] == "fp32"

    prefill = {r["path"]: r for r in results["prefill"]}
    assert set(prefill) == {"reference", "recurrent"}
    for row in prefill.values():
        assert (row["batch_size"], row["context_len"]) == (1, 24)
        assert row["median_ms"] > 0 and len(row["times_ms"]) == 1
    [speedup] = results["speedups"]
    assert speedup["reference_vs_recurrent"] > 0 and speedup["fast_vs_reference"] is None

    for phase in ("prefill", "decode"):
        [row] = results["split"][phase]
        for key in ("total_ms", "unhooked_total_ms", "mamba_ms", "attention_ms"):
            assert row[key] > 0, (phase, key)
        assert row["mamba_ms"] + row["attention_ms"] <= row["total_ms"]
        assert row["other_ms"] == pytest.approx(row["total_ms"] - row["mamba_ms"] - row["attention_ms"])
    assert results["split"]["decode"][0]["attn_name"] == "paged"

    memory = results["memory"]
    assert memory["mamba_layers"] == 4 and memory["attention_layers"] == 2
    assert memory["mamba_state_bytes_per_sequence"] > 0 and memory["kv_bytes_per_token"] > 0
    # 2 attention layers x (K and V) x 2 kv heads x head_dim 32 x 4 bytes
    assert memory["kv_bytes_per_token"] == 2 * 2 * 2 * 32 * 4
    assert memory["per_context"][0]["kv_bytes_per_sequence"] == 24 * memory["kv_bytes_per_token"]


@pytest.mark.parametrize(("extra", "message"), [
    (["--variant", "no-such-variant"], "allowed"),
    (["--variant", "nano"], "Mamba"),
    (["--batch_sizes", "0"], "--batch_sizes"),
    (["--context_lengths", "5000"], "max_position_embeddings"),
    (["--paths", "fast,warp"], "--paths"),
])
def test_bad_arguments_exit_with_a_message(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exc:
        script.main([*SMALL, "--output_dir", str(tmp_path), *extra])
    assert exc.value.code != 0
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(("T", "num_groups", "with_state"), [(1, 1, False), (37, 2, True), (16, 1, True)])
def test_recurrent_scan_equals_reference(T, num_groups, with_state):
    generator = torch.Generator().manual_seed(T)
    b, nh, P, N, chunk = 2, 4, 8, 16, 16

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    x, B, C = randn(b, T, nh, P), randn(b, T, num_groups, N), randn(b, T, num_groups, N)
    dt = torch.nn.functional.softplus(randn(b, T, nh))
    A = -torch.rand(nh, generator=generator) - 0.1
    h0 = randn(b, nh, P, N) if with_state else None
    y_ref, final_ref = ssd_scan_reference(x, dt, A, B, C, chunk, h0)
    y_rec, final_rec = ssd_scan_recurrent(x, dt, A, B, C, chunk, h0)
    torch.testing.assert_close(y_rec, y_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(final_rec, final_ref, atol=1e-4, rtol=1e-4)
    assert ssd_scan_recurrent(x, dt, A, B, C, chunk, h0, output_final_state=False)[1] is None


def test_use_ssd_scan_switches_and_restores():
    cpu = torch.device("cpu")
    assert select_ssd_scan(cpu) is ssd_scan_reference
    with use_ssd_scan("recurrent"):
        assert select_ssd_scan(cpu) is ssd_scan_recurrent
        with use_ssd_scan("reference"):
            assert select_ssd_scan(cpu) is ssd_scan_reference
        assert select_ssd_scan(cpu) is ssd_scan_recurrent
    assert select_ssd_scan(cpu) is ssd_scan_reference


def test_unknown_scan_name_raises_with_the_allowed_names():
    with pytest.raises(ValueError) as exc, use_ssd_scan("warp"):
        pass
    for name in ("auto", "fla", "reference", "recurrent"):
        assert name in str(exc.value)
    assert select_ssd_scan(torch.device("cpu")) is ssd_scan_reference


def test_fla_scan_errors_clearly_where_it_cannot_run():
    if not ssm._fla_available():
        with pytest.raises(RuntimeError, match="flash-linear-attention"), use_ssd_scan("fla"):
            pass
    else:
        with use_ssd_scan("fla"), pytest.raises(RuntimeError, match="CUDA only"):
            select_ssd_scan(torch.device("cpu"))
