"""The hybrid profile (fms.bench.hybrid*) on the CPU with granite_hybrid h-micro-test, the SSD scan inputs
(fms.bench.ssd), and scan_path (fms.bench.switches), which sets one module's KernelConfig.ssd_scan."""

import json
import math

import pytest
import torch

from fms.models import get_config
from fms.modules import ssm
from fms.modules.kernel_config import KernelConfig
from fms.modules.ssm import Mamba2Mixer, select_ssd_scan, ssd_scan_recurrent, ssd_scan_reference
from fms.bench import hybrid
from fms.bench.switches import scan_of_path, scan_path
from fms.bench.hybrid import HybridProfileConfig, run_hybrid_profile
from fms.bench.ssd import rel_err, scan_fn, scan_inputs
from fms.bench.timing import graph_failure

SMALL = dict(variant="h-micro-test", dtype="fp32", device="cpu", context_lengths=[24], batch_sizes=[1], repeats=1,
             warmup=1)


def run(tmp_path, run_name, **options) -> dict:
    run_hybrid_profile(HybridProfileConfig(**{**SMALL, **options}, output_dir=str(tmp_path), run_name=run_name))
    return json.loads((tmp_path / f"{run_name}.json").read_text())


def test_cpu_run_writes_prefill_split_and_memory(tmp_path):
    results = run(tmp_path, "run", paths=["reference", "recurrent"])
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

    # the default sections include the mixer, which then reuses the built model's first Mamba layer
    assert results["config"]["sections"] == ["prefill", "split", "memory", "mixer"]
    assert results["model"]["mixer"] == "layer 0 of the built model"
    assert {r["path"] for r in results["mixer"]} == {"reference", "recurrent"}


def test_mixer_section_times_each_scan_path_alone_without_building_the_model(tmp_path, monkeypatch):
    monkeypatch.setattr(hybrid, "get_model", lambda *a, **k: pytest.fail("sections mixer built the whole model"))
    # 80 tokens span two 64-token chunks; the recurrent path stops at 64
    results = run(tmp_path, "mixer", sections=["mixer"], context_lengths=[24, 80], batch_sizes=[1, 2],
                  max_recurrent_context=64)
    assert results["prefill"] == [] and results["speedups"] == [] and results["memory"] is None
    assert results["split"] == {"prefill": [], "decode": []}
    assert results["model"]["num_parameters"] is None and results["model"]["mixer"].startswith("standalone")
    assert results["model"]["mamba_config"]["num_heads"] == 8

    rows = {(r["path"], r["batch_size"], r["context_len"]): r for r in results["mixer"]}
    assert set(rows) == ({("reference", b, c) for b in (1, 2) for c in (24, 80)}
                         | {("recurrent", b, 24) for b in (1, 2)})
    for (path, batch, context), row in rows.items():
        for figure in ("scan", "mixer"):
            ms = row[f"{figure}_ms"]
            assert ms > 0 and math.isfinite(ms), (path, batch, context, figure)
            assert len(row[f"{figure}_times_ms"]) == 1 and row[f"{figure}_times_ms"][0] == ms
            assert row[f"{figure}_tokens_per_s"] == pytest.approx(batch * context / ms * 1e3)
            # no CUDA graphs on the CPU
            assert row[f"{figure}_graph_ms"] is None and row[f"{figure}_graph_times_ms"] is None
            assert row[f"{figure}_graph_tokens_per_s"] is None
        if path == "recurrent":  # the timed scans' own outputs agree with the reference's
            assert 0 <= row["scan_rel_err_vs_reference"] < 1e-4
        else:
            assert row["scan_rel_err_vs_reference"] is None

    reasons = {(s.get("path"), s.get("figure"), s.get("batch_size"), s.get("context_len")): s["reason"]
               for s in results["skipped"]}
    assert all(s["section"] == "mixer" for s in results["skipped"]) and len(reasons) == 4
    assert "CUDA only" in reasons[("fast", None, None, None)]
    assert "CUDA graphs need a CUDA device" in reasons[(None, "scan_graph, mixer_graph", None, None)]
    for batch in (1, 2):
        assert "max_recurrent_context (64)" in reasons[("recurrent", None, batch, 80)]

    speedups = {(s["batch_size"], s["context_len"]): s for s in results["mixer_speedups"]}
    assert set(speedups) == {(b, c) for b in (1, 2) for c in (24, 80)}
    for (batch, context), s in speedups.items():
        for figure in ("scan", "mixer"):
            ratio = s[f"{figure}_reference_vs_recurrent"]
            if context == 24:
                assert ratio == pytest.approx(rows[("recurrent", batch, context)][f"{figure}_ms"]
                                              / rows[("reference", batch, context)][f"{figure}_ms"])
            else:
                assert ratio is None
        assert all(v is None for k, v in s.items() if "fast" in k or "graph" in k)


@pytest.mark.parametrize(("batch", "context"), [(1, 24), (2, 150)])
def test_mixer_scan_inputs_are_seeded_and_the_reference_and_recurrent_scans_agree_on_them(batch, context):
    config = get_config("granite_hybrid", "h-micro-test").mamba_config()
    cpu = torch.device("cpu")
    inputs = scan_inputs(config, batch, context, torch.float32, cpu, seed=3)
    x, dt, A, B, C = inputs
    assert x.shape == (batch, context, config.num_heads, config.head_dim) and dt.shape == x.shape[:3]
    assert B.shape == C.shape == (batch, context, config.num_groups, config.state_size) and A.shape == (8,)
    assert all(t.dtype == torch.float32 for t in inputs) and bool((dt > 0).all()) and bool((A < 0).all())
    assert all(torch.equal(a, b) for a, b in zip(inputs, scan_inputs(config, batch, context, torch.float32,
                                                                           cpu, seed=3)))
    assert not torch.equal(x, scan_inputs(config, batch, context, torch.float32, cpu, seed=4)[0])

    # the calls the section times, on these inputs
    y_ref, final_ref = scan_fn("reference", cpu, inputs, config.chunk_size)()
    y_rec, final_rec = scan_fn("recurrent", cpu, inputs, config.chunk_size)()
    assert y_ref.shape == x.shape and final_ref.shape == (batch, config.num_heads, config.head_dim, config.state_size)
    assert torch.allclose(y_rec, y_ref, rtol=1e-4, atol=1e-4 * y_ref.abs().max().item())
    assert torch.allclose(final_rec, final_ref, rtol=1e-4, atol=1e-4 * final_ref.abs().max().item())
    assert rel_err((y_rec, final_rec), (y_ref, final_ref)) < 1e-4

    if context > config.chunk_size:  # the slow heads' state carries into the last chunk, so the check covers it
        tail = [t[:, -config.chunk_size:] for t in (x, dt)] + [A] + [t[:, -config.chunk_size:] for t in (B, C)]
        _, final_tail = ssd_scan_reference(*tail, config.chunk_size)
        assert (final_ref - final_tail).norm() > 1e-2 * final_ref.norm()


def test_mixer_graph_failure_reason_names_the_capture_error():
    with pytest.raises(RuntimeError) as exc:
        try:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
        finally:
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")
    reason = graph_failure(exc.value)
    assert reason.startswith("CUDA graph capture failed: RuntimeError: CUDA error: operation not permitted")
    assert "previous error during capture" in reason


@pytest.mark.parametrize(("extra", "message"), [
    (dict(variant="no-such-variant"), "allowed: "),
    (dict(variant="nano"), "not a granite_hybrid variant with Mamba layers"),
    (dict(batch_sizes=[0]), "batch_sizes must all be >= 1, got [0]"),
    (dict(context_lengths=[5000]), "5000 (+ 3 decode steps) is longer than h-micro-test's max_position_embeddings"),
    (dict(paths=["fast", "warp"]), "paths: unknown path(s) ['warp']; allowed: fast, reference, recurrent"),
    (dict(sections=["prefill", "warp"]), "sections: unknown section(s) ['warp']"),
    (dict(sections=["split"], no_split=True), "no_split leaves no section to run"),
    (dict(attn_name="nope"), "attn_name: unknown attention op 'nope'"),
])
def test_bad_config_names_the_value_and_writes_nothing(tmp_path, extra, message):
    with pytest.raises(ValueError) as exc:
        HybridProfileConfig(**{**SMALL, **extra}, output_dir=str(tmp_path))
    assert message in str(exc.value)
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


def _mixer():
    return Mamba2Mixer(get_config("granite_hybrid", "h-micro-test").mamba_config())


def test_scan_path_sets_one_module_and_restores_it():
    cpu = torch.device("cpu")
    mixer, other = _mixer(), _mixer()
    assert select_ssd_scan(cpu) is ssd_scan_reference  # "auto" off CUDA
    with scan_path(mixer, "recurrent"):
        assert mixer.kernels == KernelConfig(ssd_scan="recurrent")
        assert select_ssd_scan(cpu, mixer.kernels.ssd_scan) is ssd_scan_recurrent
        with scan_path(mixer, "reference"):
            assert mixer.kernels.ssd_scan == "reference"
        assert mixer.kernels.ssd_scan == "recurrent"
        assert other.kernels == KernelConfig()  # no process-wide state: another mixer keeps its own
    assert mixer.kernels == KernelConfig()
    assert scan_of_path("fast") == "triton"


def test_scan_path_restores_after_an_exception_and_keeps_the_gemv_field():
    mixer = _mixer()
    mixer.set_kernels(KernelConfig(gemv=False))
    with pytest.raises(RuntimeError, match="boom"), scan_path(mixer, "recurrent"):
        assert mixer.kernels == KernelConfig(gemv=False, ssd_scan="recurrent")
        assert not mixer.in_proj.kernels.gemv
        raise RuntimeError("boom")
    assert mixer.kernels == KernelConfig(gemv=False) and mixer.out_proj.kernels == KernelConfig(gemv=False)


def test_unknown_scan_path_or_name_raises_with_the_allowed_names():
    mixer = _mixer()
    with pytest.raises(ValueError) as exc, scan_path(mixer, "warp"):
        pass
    assert "'warp'" in str(exc.value) and "fast, reference, recurrent" in str(exc.value)
    assert mixer.kernels == KernelConfig()
    with pytest.raises(ValueError) as exc:
        select_ssd_scan(torch.device("cpu"), "warp")
    for name in ("auto", "triton", "fla", "reference", "recurrent"):
        assert name in str(exc.value)


def test_fla_scan_errors_clearly_where_it_cannot_run():
    if not ssm._fla_available():
        with pytest.raises(RuntimeError, match="flash-linear-attention"):
            _mixer().set_kernels(KernelConfig(ssd_scan="fla"))
    else:
        with pytest.raises(RuntimeError, match="CUDA only"):
            select_ssd_scan(torch.device("cpu"), "fla")
