"""torch.library.opcheck over every fms custom op: the schema (mutated arguments declared), the fake (meta)
implementation against the real one (shapes, strides, dtypes, aliasing), and tracing with dynamic shapes. A fake that
disagrees with its op misleads every graph compiled around it (the layers compile scope and the whole-model scope
trace these ops), so each op is checked at the layouts a decode or prefill step hands it.

On CPU the Triton kernels run in Triton's interpreter where the op takes them (paged decode, GEMV, argmax); the Mamba
update and the K/V write take their torch references there; fms::varlen_causal_attention (flash) needs CUDA.
"""

import pytest
import torch
from torch.library import opcheck

pytest.importorskip("triton", reason="triton is not installed; the fms kernels need it")

import fms.modules.attention  # noqa: E402,F401  (registers fms::paged_kv_write)
from fms.triton import argmax, gemv, mamba_decode, paged_decode, varlen  # noqa: E402,F401  (register the ops)
from tests.triton.test_mamba_decode import make_case as mamba_case  # noqa: E402
from tests.triton.test_paged_decode import fused_qkv_slice, make_paged_case  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _checked(op, args):
    results = opcheck(op, args)
    assert set(results.values()) == {"SUCCESS"}, results


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("layout", ["contiguous", "fused_qkv_slice"])
def test_paged_decode(batch, layout):
    case = make_paged_case([5, 40, 9][:batch], 16, 2, 4, 32, torch.float32, seed=6)
    q = case["q"]
    if layout == "fused_qkv_slice":  # as a decode step hands it
        q = fused_qkv_slice(q, case["k_pool"].shape[0])
    _checked(torch.ops.fms.paged_decode.default,
             (q, case["k_pool"], case["v_pool"], case["page_table"], case["seq_lens"], 16, 0.2, 0))


@pytest.mark.parametrize("rows", [1, 2, 5])
@pytest.mark.parametrize("form", ["plain", "silu_mul", "norm", "residual"])
def test_gemv(rows, form):
    g = torch.Generator().manual_seed(rows)
    k, n = 64, 48
    x = torch.randn(rows, 1, 2 * k if form == "silu_mul" else k, generator=g).to(DEVICE)
    weight = torch.randn(n, k, generator=g).to(DEVICE)
    options = {"plain": (None, 0.0, None), "silu_mul": (None, 0.0, None),
               "norm": (torch.rand(k, generator=g).to(DEVICE) + 0.5, 1e-5, None),
               "residual": (None, 0.0, torch.randn(rows, 1, n, generator=g).to(DEVICE))}[form]
    norm_weight, eps, residual = options
    _checked(torch.ops.fms.gemv.default,
             (x, weight, None, form == "silu_mul", 2, norm_weight, eps, residual, 0.5 if residual is not None else 1.0))


@pytest.mark.parametrize("batch", [1, 3])
def test_argmax_rows(batch):
    g = torch.Generator().manual_seed(batch)
    logits = torch.randn(batch, 1, 2500, generator=g).to(DEVICE)[:, 0]  # the decode step's logits[:, 0]
    _checked(torch.ops.fms.argmax_rows.default, (logits,))


def test_mamba_decode_update():
    case = mamba_case([1, 8, 3], [True, False, True])
    _checked(torch.ops.fms.mamba_decode_update.default,
             tuple(case[name] for name in ("ssm_pool", "slots", "x", "dt", "A", "B", "C", "D")))


def test_paged_kv_write():
    g = torch.Generator().manual_seed(0)
    b, t, hkv, d = 3, 2, 2, 16
    # k/v as the attention layer hands them over: views of a (B, T, Hkv, D) projection, transposed
    k, v = (torch.randn(b, t, hkv, d, generator=g).to(DEVICE).transpose(1, 2) for _ in range(2))
    pools = [torch.randn(hkv, 40, d, generator=g).to(DEVICE) for _ in range(2)]
    slots = torch.randperm(40, generator=g)[: b * t].to(DEVICE)
    _checked(torch.ops.fms.paged_kv_write.default, (*pools, k, v, slots))


def test_varlen_causal_reference():
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(12, 4, 16, generator=g), torch.randn(20, 2, 16, generator=g), torch.randn(20, 2, 16, generator=g)
    cu_q, cu_k = torch.tensor([0, 5, 12], dtype=torch.int32), torch.tensor([0, 9, 20], dtype=torch.int32)
    _checked(torch.ops.fms.varlen_causal_reference.default, (q, k, v, cu_q, cu_k, 0.25))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash varlen attention needs a CUDA GPU")
def test_varlen_causal_attention_flash():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(n, h, 64, generator=g).to("cuda", torch.bfloat16) for n, h in ((12, 4), (20, 2), (20, 2)))
    cu_q = torch.tensor([0, 5, 12], dtype=torch.int32, device="cuda")
    cu_k = torch.tensor([0, 9, 20], dtype=torch.int32, device="cuda")
    _checked(torch.ops.fms.varlen_causal_attention.default, (q, k, v, cu_q, cu_k, torch.tensor([7, 11]), 0.125))
