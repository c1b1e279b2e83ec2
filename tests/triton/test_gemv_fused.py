"""The GEMV kernel with a block's RMSNorm fused before it and its residual add after (KernelConfig.fuse_norm), and
the one-launch RMSNorm over rows that the op runs unfused for more rows (fms.triton.rmsnorm).

On CPU the kernels run in Triton's interpreter with small blocks; on CUDA with the tuned ones. The reference is
float64 of the same inputs: x / rms(x) * g, the product, + residual, with no rounding between the steps. The
kernel skips the reference's two roundings of the normalised row (it scales the dot products by 1/rms at the end),
so in bf16 it is compared with the float64 value, within 2 bf16 ulps of the output scale.
"""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="triton is not installed; the GEMV kernel needs it")

from fms.triton import gemv as gemv_mod
from fms.triton.rmsnorm import rms_norm_reference, rms_norm_rows
from tests.triton.test_gemv import _reference64

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
SMALL_BLOCKS = (4, 32, 1, 1)  # interpreter speed: every program is Python
EPS = 1e-5
FUSION_ARGS = ("norm_weight", "residual", "residual_scale")  # what a launch fused (eps and out_shape aside)


def _launch(x, w, b=None, silu_mul=False, **fusion):
    return gemv_mod._launch(x, w, b, silu_mul, None if CUDA else SMALL_BLOCKS, **fusion)


def _exact(x, w, b=None, silu_mul=False, g=None, eps=EPS, residual=None, scale=1.0):
    """The fused expression in float64 with no intermediate rounding: the norm, then tests/triton/test_gemv.py's
    float64 product, then the residual."""
    x = x.double()
    if g is not None:
        x = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * g.double()
    y = _reference64(x, w, b, silu_mul)
    return y if residual is None else residual.double() + scale * y


def _inputs(n, k, dtype, rows=1, silu_mul=False, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(DEVICE, dtype)
    x = (3 * torch.randn(rows, 2 * k if silu_mul else k, generator=g)).to(DEVICE, dtype)  # rms far from 1
    norm = (1 + 0.5 * torch.randn(k, generator=g)).to(DEVICE, dtype)
    residual = torch.randn(rows, n, generator=g).to(DEVICE, dtype)
    b = torch.randn(n, generator=g).to(DEVICE, dtype) if bias else None
    return x, w, b, norm, residual


@pytest.mark.parametrize("n,k", [(24, 64), (13, 96), (5, 40)])  # N, K not multiples of the blocks
@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("bias", [False, True])
def test_norm_before_the_product_fp32(n, k, rows, bias):
    x, w, b, norm, _ = _inputs(n, k, torch.float32, rows, bias=bias)
    out = _launch(x, w, b, norm_weight=norm, eps=EPS)
    assert out.shape == (rows, n) and out.dtype == torch.float32
    ref = _exact(x, w, b, g=norm)
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)
    # and the layers' unfused expression (what the model runs otherwise) is the same function
    torch.testing.assert_close(gemv_mod.gemv_reference(x, w, b, norm_weight=norm, eps=EPS).double(), ref,
                               atol=1e-4, rtol=1e-4)
    # the norm changes the answer: a kernel that ignored it would fail above
    assert (_exact(x, w, b) - ref).abs().max() > 0.1


@pytest.mark.parametrize("n,k", [(24, 64), (13, 40)])
@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("silu_mul", [False, True])
@pytest.mark.parametrize("scale", [1.0, 0.22])
def test_residual_after_the_product_fp32(n, k, rows, silu_mul, scale):
    x, w, b, _, residual = _inputs(n, k, torch.float32, rows, silu_mul=silu_mul, bias=True, seed=1)
    out = _launch(x, w, b, silu_mul, residual=residual, residual_scale=scale)
    ref = _exact(x, w, b, silu_mul, residual=residual, scale=scale)
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gemv_mod.gemv_reference(x, w, b, silu_mul, residual=residual,
                                                       residual_scale=scale).double(), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("rows", [1, 2])
def test_norm_and_residual_together_fp32(rows):
    x, w, b, norm, residual = _inputs(32, 80, torch.float32, rows, seed=2)
    out = _launch(x, w, None, norm_weight=norm, eps=1e-2, residual=residual, residual_scale=0.5)
    torch.testing.assert_close(out.double(), _exact(x, w, g=norm, eps=1e-2, residual=residual, scale=0.5),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("rows", [1, 2])
def test_bf16_norm_is_within_two_ulps_of_the_exact_value(rows):
    n, k = 48, 128
    x, w, _, norm, _ = _inputs(n, k, torch.bfloat16, rows, seed=3)
    out = _launch(x, w, norm_weight=norm, eps=EPS).double()
    ref = _exact(x, w, g=norm)
    ulp = 2.0 ** (torch.floor(torch.log2(ref.abs().max())) - 7)
    assert (out - ref).abs().max() <= 2 * ulp
    # the torch reference rounds the normalised row twice; it is as close, not closer
    assert (gemv_mod.gemv_reference(x, w, norm_weight=norm, eps=EPS).double() - ref).abs().max() <= 4 * ulp


@pytest.mark.parametrize("scale", [1.0, 0.22])
def test_bf16_residual_rounds_as_the_block_does(scale):
    """out = bf16(residual + bf16(scale * bf16(product))): the epilogue rounds each step as the torch expression
    `x + r * sublayer(...)` does, so given the same rounded product it is bit-equal on a GPU."""
    n, k = 40, 96
    x, w, _, _, residual = _inputs(n, k, torch.bfloat16, 2, seed=4)
    product = _launch(x, w)  # the same kernel's product, rounded to bf16
    out = _launch(x, w, residual=residual, residual_scale=scale)
    expected = residual + (product if scale == 1.0 else scale * product)
    if CUDA:
        assert torch.equal(out, expected)
    else:  # Triton's interpreter casts fp32 to bf16 by truncation, not to nearest: an ulp per rounding at most
        size = torch.maximum(expected.float().abs(), residual.float().abs()).clamp_min(2 ** -100)
        ulp = 2.0 ** (torch.floor(torch.log2(size)) - 7)
        assert ((out.float() - expected.float()).abs() <= 2 * ulp).all()


def test_fused_calls_are_refused_with_a_clear_error():
    x, w, _, norm, residual = _inputs(8, 32, torch.float32, 1)
    with pytest.raises(ValueError, match="not both"):
        gemv_mod.gemv(torch.cat([x, x], -1), w, silu_mul=True, norm_weight=norm)
    with pytest.raises(ValueError, match=r"norm_weight must have shape \(32,\) .* got \(31,\)"):
        _launch(x, w, norm_weight=norm[:31])
    with pytest.raises(ValueError, match=r"residual must have the output's shape \(1, 8\), got \(1, 7\)"):
        gemv_mod.gemv(x, w, residual=residual[:, :7])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_rows_equals_the_reference(dtype):
    """The unfused path's norm (more rows than the kernel takes): one launch, the reference's roundings."""
    g = torch.Generator().manual_seed(5)
    x = (4 * torch.randn(5, 72, generator=g)).to(DEVICE, dtype)
    weight = (1 + torch.randn(72, generator=g)).to(DEVICE, dtype)
    out = rms_norm_rows(x, weight, EPS, block_k=32)  # three chunks, the last one partial
    ref = rms_norm_reference(x, weight, EPS)
    assert out.dtype == dtype and out.shape == x.shape
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    else:  # a sum in another order can move 1/rms by an fp32 ulp, which can flip a bf16 rounding: one ulp at most
        # on a GPU; Triton's interpreter truncates where a GPU rounds to nearest: an ulp per rounding (two)
        diff = (out.float() - ref.float()).abs()
        assert (diff <= ref.float().abs() * 2 ** (-7 if CUDA else -6)).all()
        assert not CUDA or (diff == 0).float().mean() > 0.9
    assert rms_norm_rows(x[:0], weight, EPS).shape == (0, 72)
    with pytest.raises(ValueError, match=r"weight of shape \(72,\) and dtype"):
        rms_norm_rows(x, weight[:70], EPS)


@torch.no_grad()
def test_more_rows_run_the_fused_expression_unfused(monkeypatch):
    """gemv with norm and residual over more rows than the kernel takes: no kernel launch, rms_norm_rows, F.linear
    and the add; the same values."""
    launched = []
    monkeypatch.setattr(gemv_mod, "_launch", lambda *a, **k: launched.append(1))
    x, w, b, norm, residual = _inputs(24, 64, torch.float32, 5, bias=True, seed=6)
    out = gemv_mod.gemv(x, w, b, norm_weight=norm, eps=EPS, residual=residual, residual_scale=0.5)
    torch.testing.assert_close(out.double(), _exact(x, w, b, g=norm, residual=residual, scale=0.5),
                               atol=1e-4, rtol=1e-4)
    h, down, _, _, res_down = _inputs(24, 32, torch.float32, 3, silu_mul=True, seed=7)
    out = gemv_mod.gemv(h, down, silu_mul=True, residual=res_down)
    torch.testing.assert_close(out.double(), _exact(h, down, silu_mul=True, residual=res_down), atol=1e-4, rtol=1e-4)
    assert launched == []


@torch.no_grad()
def test_a_fused_call_takes_the_kernel_where_the_table_chose_cublas(monkeypatch):
    """For the bare product a GPU's table may pick cuBLAS; a fused call still takes the kernel (with BLOCKS), since
    cuBLAS would bring back the norm and add kernels the fusion removes."""
    monkeypatch.setattr(gemv_mod, "tuned_choice", lambda *a: gemv_mod.CUBLAS)
    monkeypatch.setattr(gemv_mod, "BLOCKS", SMALL_BLOCKS)
    launched, launch = [], gemv_mod._launch

    def counted(x, weight, bias, silu_mul, blocks=None, **fusion):
        launched.append((blocks, sorted(k for k, v in fusion.items() if v is not None and k in FUSION_ARGS)))
        return launch(x, weight, bias, silu_mul, blocks, **fusion)

    monkeypatch.setattr(gemv_mod, "_launch", counted)
    x, w, _, norm, residual = _inputs(24, 64, torch.float32, 1, seed=8)
    gemv_mod.gemv(x, w)  # bare: cuBLAS, as the table says
    out = gemv_mod.gemv(x, w, norm_weight=norm, eps=EPS, residual=residual)
    assert launched == [(SMALL_BLOCKS, ["norm_weight", "residual", "residual_scale"])]
    torch.testing.assert_close(out.double(), _exact(x, w, g=norm, residual=residual), atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_compiled_fused_op_serves_every_row_count_from_one_graph(monkeypatch):
    """Under torch.compile the fused call is the op fms::gemv too: one graph with a symbolic batch; the kernel for
    2 rows, the unfused expression for 3 and 6, all equal to the reference."""
    from torch._dynamo.testing import CompileCounter

    if not CUDA:
        monkeypatch.setattr(gemv_mod, "BLOCKS", SMALL_BLOCKS)
    launches, launch = [], gemv_mod._launch

    def counted(*a, **fusion):
        launches.append(sorted(k for k, v in fusion.items() if v is not None and k in FUSION_ARGS))
        return launch(*a, **fusion)

    monkeypatch.setattr(gemv_mod, "_launch", counted)
    _, w, _, norm, _ = _inputs(24, 64, torch.float32, seed=9)

    torch._dynamo.reset()
    counter = CompileCounter()

    def step(x, res):
        return gemv_mod.gemv(x, w, norm_weight=norm, eps=EPS, residual=res, residual_scale=0.5)

    compiled = torch.compile(step, backend=counter, dynamic=True, fullgraph=True)
    for batch in (2, 3, 6):
        x = 3 * torch.randn(batch, 1, 64, device=DEVICE)
        res = torch.randn(batch, 1, 24, device=DEVICE)
        launches.clear()
        out = compiled(x, res)
        assert launches == ([["norm_weight", "residual", "residual_scale"]] if batch <= 2 else [])
        torch.testing.assert_close(out.double(), _exact(x, w, g=norm, residual=res, scale=0.5), atol=1e-4, rtol=1e-4)
    assert counter.frame_count == 1
    torch._dynamo.reset()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="the compiled kernel at the 1B model's shapes needs a CUDA GPU")
@torch.no_grad()
@pytest.mark.parametrize("rows", [1, 2])
def test_gpu_fused_kernel_at_llama_1b_shapes(rows):
    """bf16 at Llama-3.2-1B's shapes with the tuned blocks: qkv with the norm, the output projection and the SwiGLU
    down projection with the residual; within 2 ulps of the output scale of the float64 value."""
    cases = ((3072, 2048, dict(norm=True)), (2048, 2048, dict(residual=True)),
             (16384, 2048, dict(norm=True)), (2048, 8192, dict(residual=True, silu_mul=True)))
    for i, (n, k, how) in enumerate(cases):
        x, w, _, norm, residual = _inputs(n, k, torch.bfloat16, rows, silu_mul=how.get("silu_mul", False), seed=i)
        fusion = dict(norm_weight=norm, eps=EPS) if how.get("norm") else dict(residual=residual, residual_scale=1.0)
        out = gemv_mod.gemv(x, w, silu_mul=how.get("silu_mul", False), **fusion).double()
        ref = _exact(x, w, silu_mul=how.get("silu_mul", False), g=norm if how.get("norm") else None,
                     residual=residual if how.get("residual") else None)
        ulp = 2.0 ** (torch.floor(torch.log2(ref.abs().max())) - 7)
        assert (out - ref).abs().max() <= 2 * ulp, (n, k, how)
