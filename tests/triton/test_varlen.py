"""Varlen causal attention (packed rows, end-aligned causal mask) against dense attention per row.

CPU: the per-row SDPA reference, fp32, atol/rtol 1e-5. CUDA: the flash varlen kernel in bf16
against the fp32 reference, atol 2e-2 (bf16 inputs, fp32 accumulation).
"""

import pytest
import torch
import torch.nn.functional as F

from fms.triton.varlen import uses_flash, varlen_causal_attention, varlen_causal_reference


def _rows(lens_q, lens_k, hq, hkv, d, device, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    total_q, total_k = sum(lens_q), sum(lens_k)
    q = torch.randn(total_q, hq, d, generator=gen)
    k = torch.randn(total_k, hkv, d, generator=gen)
    v = torch.randn(total_k, hkv, d, generator=gen)
    cu = lambda lens: torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)  # noqa: E731
    return [x.to(device, dtype) for x in (q, k, v)], cu(lens_q).to(device), cu(lens_k).to(device)


def _dense(q, k, v, cu_q, cu_k, scale):
    """Row by row: query i of a row with Lq queries and Lk keys sees keys j <= i + Lk - Lq."""
    out = []
    for b in range(len(cu_q) - 1):
        qb = q[cu_q[b]:cu_q[b + 1]].float().transpose(0, 1)  # (Hq, Lq, D)
        kb = k[cu_k[b]:cu_k[b + 1]].float().transpose(0, 1)
        vb = v[cu_k[b]:cu_k[b + 1]].float().transpose(0, 1)
        group = qb.shape[0] // kb.shape[0]
        kb, vb = kb.repeat_interleave(group, 0), vb.repeat_interleave(group, 0)
        lq, lk = qb.shape[1], kb.shape[1]
        scores = qb @ kb.transpose(1, 2) * scale
        hidden = torch.arange(lk)[None, :] > torch.arange(lq)[:, None] + (lk - lq)
        scores = scores.masked_fill(hidden.to(scores.device), float("-inf"))
        out.append((F.softmax(scores, -1) @ vb).transpose(0, 1))
    return torch.cat(out)


CASES = [
    ([5, 1, 17], [5, 1, 17]),  # fresh prefills of unequal length
    ([3, 8, 1], [40, 8, 9]),  # chunks after cached context (keys longer than queries)
    ([130, 2], [300, 2]),  # more than one flash query block
]


@pytest.mark.parametrize("lens_q, lens_k", CASES)
@pytest.mark.parametrize("hq, hkv", [(4, 4), (8, 2)])
def test_reference_matches_dense_rows(lens_q, lens_k, hq, hkv):
    (q, k, v), cu_q, cu_k = _rows(lens_q, lens_k, hq, hkv, 16, "cpu", torch.float32, seed=sum(lens_k))
    out = varlen_causal_reference(q, k, v, cu_q, cu_k, 0.25)
    torch.testing.assert_close(out, _dense(q, k, v, cu_q, cu_k, 0.25), atol=1e-5, rtol=1e-5)


def test_reference_refuses_fewer_keys_than_queries():
    (q, k, v), cu_q, cu_k = _rows([4], [3], 2, 2, 8, "cpu", torch.float32, seed=0)
    with pytest.raises(ValueError, match="4 queries but only 3 keys"):
        varlen_causal_reference(q, k, v, cu_q, cu_k, 1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the flash varlen kernel runs on CUDA only")
@pytest.mark.parametrize("lens_q, lens_k", CASES)
@pytest.mark.parametrize("hq, hkv, d", [(8, 2, 64), (32, 8, 128)])
def test_flash_kernel_matches_dense_rows(lens_q, lens_k, hq, hkv, d):
    (q, k, v), cu_q, cu_k = _rows(lens_q, lens_k, hq, hkv, d, "cuda", torch.bfloat16, seed=len(lens_q))
    assert uses_flash(q)
    max_lens = torch.tensor([max(lens_q), max(lens_k)])
    out = varlen_causal_attention(q, k, v, cu_q, cu_k, max_lens, d**-0.5)
    torch.testing.assert_close(out.float(), _dense(q, k, v, cu_q.cpu(), cu_k.cpu(), d**-0.5), atol=2e-2, rtol=2e-2)
    # one opaque op under torch.compile: no graph break, same result
    compiled = torch.compile(varlen_causal_attention, fullgraph=True, dynamic=True)
    torch.testing.assert_close(compiled(q, k, v, cu_q, cu_k, max_lens, d**-0.5), out)
