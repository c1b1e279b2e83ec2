"""KernelConfig(fuse_norm=True): a pre-norm block hands its RMSNorm to the projection after it and its residual add
to the projection before, for the GEMV kernel to fuse (fms.triton.gemv). Checked here: which layers fuse what in
each model, that the logits stay those of the unfused model, that rows the kernel does not take (a prefill) run the
unfused expressions bit for bit, that tensor-parallel row shards never fuse, and the compiled decode step.

On CPU the kernel runs in Triton's interpreter: `fits` (CUDA rows only) is widened to rows of the weight's dtype,
as in tests/modules/test_kernel_config.py, and every launch is logged with what it fused.
"""

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed; the GEMV kernel needs it")

from fms.models import get_model
from fms.modules import linear as linear_mod
from fms.modules.kernel_config import KernelConfig
from fms.triton import gemv as gemv_mod
from tests.triton_interpreter import fits_cpu_rows

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
ATOL, RTOL = 1e-4, 1e-4  # fp32 logits through the kernel and through F.linear (sums in another order)


@pytest.fixture
def launches(monkeypatch):
    """The kernel launches of the layers as (silu_mul, fused parts); on CPU every row of the weight's dtype fits,
    and the kernel runs in the interpreter with small blocks."""
    log, launch = [], gemv_mod._launch

    def logged(x, weight, bias, silu_mul, blocks=None, **fusion):
        parts = tuple(name for name in ("norm_weight", "residual") if fusion.get(name) is not None)
        log.append(("swiglu" if silu_mul else "linear", parts))
        return launch(x, weight, bias, silu_mul, blocks, **fusion)

    monkeypatch.setattr(gemv_mod, "_launch", logged)
    cuda_choice = gemv_mod.tuned_choice
    monkeypatch.setattr(linear_mod, "fits", fits_cpu_rows(linear_mod.fits))
    monkeypatch.setattr(gemv_mod, "tuned_choice",
                        lambda x, *a: cuda_choice(x, *a) if x.is_cuda else (32, 64, 1, 1))
    return log


def _pair(arch, variant):
    """The same model (weights from one seed) without and with fuse_norm."""
    return [get_model(arch, variant, device_type=DEVICE, data_type="fp32", seed=3, kernels=KernelConfig(fuse_norm=fuse))
            for fuse in (False, True)]


# per attention layer with SwiGLU: qkv with the norm, attention output with the residual, gate|up with the norm,
# the SwiGLU down projection with the residual
FUSED_LAYER = [("linear", ("norm_weight",)), ("linear", ("residual",)), ("linear", ("norm_weight",)),
               ("swiglu", ("residual",))]
PLAIN_LAYER = [("linear", ()), ("linear", ()), ("linear", ()), ("swiglu", ())]
HEAD = [("linear", ())]  # the LM head after the final norm: not fused


@torch.no_grad()
@pytest.mark.parametrize("arch", ["llama", "granite"])  # granite: residual_multiplier 0.22
def test_one_token_fuses_three_kernels_per_layer_with_the_same_logits(launches, arch):
    plain, fused = _pair(arch, "nano")
    assert all(block.fuse_mixer and block.fuse_ff for block in fused.layers)
    assert not any(block.fuse_mixer or block.fuse_ff for block in plain.layers)
    ids = torch.tensor([[17], [250]], device=DEVICE)  # two rows of one token: the kernel's most
    expected = plain(ids)
    assert launches == PLAIN_LAYER * plain.config.num_layers + HEAD
    launches.clear()
    got = fused(ids)
    assert launches == FUSED_LAYER * fused.config.num_layers + HEAD
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)
    assert expected.std() > 0.1  # not a constant output


@torch.no_grad()
def test_rows_the_kernel_does_not_take_run_the_unfused_expressions_bit_for_bit(launches):
    plain, fused = _pair("granite", "nano")
    ids = torch.tensor([[17, 3, 250, 9]], device=DEVICE)  # a prefill: four rows
    assert torch.equal(fused(ids), plain(ids)) and launches == []


@torch.no_grad()
def test_hybrid_fuses_the_feedforward_of_every_layer_and_the_attention_of_attention_layers(launches):
    plain, fused = _pair("granite_hybrid", "h-nano")
    kinds = [fused.layer_type(i) for i in range(fused.config.num_layers)]
    assert "mamba" in kinds and "attention" in kinds
    assert [block.fuse_mixer for block in fused.layers] == [k == "attention" for k in kinds]
    assert all(block.fuse_ff for block in fused.layers)
    ids = torch.tensor([[17]], device=DEVICE)
    expected = plain(ids)
    launches.clear()
    got = fused(ids)
    fused_ff = [("linear", ("norm_weight",)), ("swiglu", ("residual",))]
    want = []
    for kind in kinds:
        if kind == "attention":
            want += FUSED_LAYER
        else:  # the Mamba mixer's own projections (in_proj, out_proj) are not fused
            want += [("linear", ()), ("linear", ())] + fused_ff
    assert launches == want + HEAD
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)


@torch.no_grad()
def test_a_layernorm_block_fuses_the_residual_only(launches):
    """GPT-2 (LayerNorm, GELU MLP): the attention output takes the residual; the LayerNorm is not an RMSNorm and
    runs before the qkv projection as written; the GELU MLP does not take the block's norm."""
    plain, fused = _pair("gpt2", "nano")
    assert all(block.fuse_mixer and not block.fuse_ff for block in fused.layers)
    ids = torch.tensor([[17]], device=DEVICE)
    expected = plain(ids)
    launches.clear()
    got = fused(ids)
    layer = [("linear", ()), ("linear", ("residual",)), ("linear", ()), ("linear", ())]
    assert launches == layer * fused.config.num_layers + HEAD
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)


@torch.no_grad()
def test_set_kernels_turns_fusion_on_and_off_per_model(launches):
    plain, fused = _pair("llama", "nano")
    fused.set_kernels(KernelConfig())
    assert not any(block.fuse_mixer or block.fuse_ff for block in fused.layers)
    plain.set_kernels(KernelConfig(fuse_norm=True))
    assert all(block.fuse_mixer and block.fuse_ff for block in plain.layers)
    plain(torch.tensor([[5]], device=DEVICE))
    assert launches[0] == ("linear", ("norm_weight",))
    launches.clear()  # gemv off: no kernel, so nothing to fuse into; the same logits as before
    plain.set_kernels(KernelConfig(gemv=False, fuse_norm=True))
    fused.set_kernels(KernelConfig(gemv=False))
    ids = torch.tensor([[5]], device=DEVICE)
    assert torch.equal(plain(ids), fused(ids)) and launches == []


@torch.no_grad()
def test_a_row_parallel_layer_never_fuses_and_adds_the_residual_after_its_all_reduce(launches):
    """Its input is this rank's slice of the features and its product a partial sum: a norm over the slice or a
    residual before the all-reduce would be wrong. A stand-in group doubles the partial (two ranks that agree)."""
    from types import SimpleNamespace

    from fms.modules.layernorm import RMSNorm
    from fms.modules.parallel import RowParallelLinear

    tp = SimpleNamespace(all_reduce=lambda t: t.mul_(2), rank=0, world_size=2)
    torch.manual_seed(0)
    layer = RowParallelLinear(64, 24, tp, (0, 32)).to(DEVICE)
    x = torch.randn(1, 1, 32, device=DEVICE)
    residual = torch.randn(1, 1, 24, device=DEVICE)
    norm = RMSNorm(32).to(DEVICE)
    product = 2 * torch.nn.functional.linear(x, layer.weight)
    torch.testing.assert_close(layer.forward_fused(x, residual=residual, residual_scale=0.5),
                               residual + 0.5 * product, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(layer.forward_fused(x, norm=norm),
                               2 * torch.nn.functional.linear(norm(x), layer.weight), atol=ATOL, rtol=RTOL)
    gate_up = torch.randn(1, 1, 64, device=DEVICE)
    gate, up = gate_up.split(32, dim=-1)
    down = 2 * torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, layer.weight)
    torch.testing.assert_close(layer.forward_swiglu(gate_up, residual, 0.5), residual + 0.5 * down,
                               atol=ATOL, rtol=RTOL)
    assert all(parts == () for _, parts in launches)  # the kernel may run the bare product, never a fused one


@torch.no_grad()
@pytest.mark.parametrize("unbacked", [False, True])
def test_compiled_decode_with_fusion_gives_the_eager_tokens(launches, unbacked):
    """The engine's compiled decode (scope "layers": each layer's halves around the attention op) with fuse_norm:
    the fused op calls trace into one graph per half, and the tokens equal an eager, unfused decode."""
    from fms.runtime.decode import DecodeWindowRunner
    from tests.runtime.test_compile_counts import _cache, _traces, _windows_equal_eager

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    plain = get_model("llama", "nano", seed=0, device_type=DEVICE, data_type=torch.float32, head_dim=32)
    fused = get_model("llama", "nano", seed=0, device_type=DEVICE, data_type=torch.float32, head_dim=32,
                      kernels=KernelConfig(fuse_norm=True))
    runner = DecodeWindowRunner(fused, _cache(fused), "paged", max_steps=3, graph_batch_sizes=None,
                                compile_model=True, compile_scope="layers", unbacked_batch=unbacked)
    runner._set_compiled(True, "aot_eager")
    # the cache's most rows (the op's unfused path), then the kernel's two (and one, with an unbacked batch, where the
    # fused residual's shape check must not break the graph); the eager runner runs the unfused model
    _windows_equal_eager(fused, runner, (4, 2, 1) if unbacked else (4, 2), eager_model=plain)
    # as without fusion (tests/runtime/test_compile_counts.py): the layer's two halves, the step's inputs, its
    # bookkeeping, one symbolic-batch trace each
    assert _traces() == 4
    assert ("linear", ("norm_weight",)) in launches and ("swiglu", ("residual",)) in launches
    torch._dynamo.reset()
