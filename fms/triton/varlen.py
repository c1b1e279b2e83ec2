"""Causal attention over rows of different lengths packed back to back, with no padding.

Layout (flash-attention's "varlen" form):

    q : (total_q, Hq, D)    row b's queries are q[cu_q[b] : cu_q[b+1]]
    k : (total_k, Hkv, D)   row b's keys    are k[cu_k[b] : cu_k[b+1]]  (same for v)

A row's queries are its last tokens: with Lq queries and Lk keys, query i sits at key position
Lk - Lq + i and sees keys 0 .. Lk - Lq + i (causal, aligned at the end). A fresh prefill has
Lq == Lk; a chunk of a longer prompt, or a continuation after a cached prefix, has Lk > Lq.

On CUDA (fp16/bf16) this is the flash-attention varlen kernel that ships inside PyTorch, behind a
custom op so that torch.compile treats it as one opaque call; elsewhere a per-row SDPA reference,
behind a custom op too when compiled (its loop reads the row offsets on the host, a graph break).

Where flash varlen cannot run (fp32 on CUDA, the CPU), a padded step is cheaper as one batched SDPA
call over the rows padded to the longest (padded_causal_attention): the per-row loop costs one call
per row per layer and a device-to-host copy of the offsets per layer.
"""

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel


FLASH_DTYPES = (torch.float16, torch.bfloat16)
# SDPA backends for CUDA calls (fms.modules.attention uses them too): not cuDNN, which builds an execution plan
# per new shape (measured on the H100, torch 2.11: ~3.7 ms of host time per call when prefill shapes change)
CUDA_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _varlen_flash_forward(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_lens: Tensor,
                          scale: float) -> Tensor:
    # max_lens lives on the host: reading it does not wait for the GPU (the kernel sizes its grid by it)
    max_q, max_k = max_lens.tolist()
    out = torch.ops.aten._flash_attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, True, False, scale=scale)
    return out[0]


@torch.library.custom_op("fms::varlen_causal_attention", mutates_args=())
def _varlen_flash(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_lens: Tensor,
                  scale: float) -> Tensor:
    return _varlen_flash_forward(q, k, v, cu_q, cu_k, max_lens, scale)


@_varlen_flash.register_fake
def _(q, k, v, cu_q, cu_k, max_lens, scale):
    return torch.empty_like(q)


def varlen_causal_reference(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, scale: float) -> Tensor:
    """One SDPA call per row with an end-aligned causal mask (CPU path and the test reference)."""
    out = torch.empty_like(q)
    bounds_q, bounds_k = cu_q.tolist(), cu_k.tolist()
    for b in range(len(bounds_q) - 1):
        q0, q1, k0, k1 = bounds_q[b], bounds_q[b + 1], bounds_k[b], bounds_k[b + 1]
        lq, lk = q1 - q0, k1 - k0
        if lq == 0:
            continue
        if lk < lq:
            raise ValueError(f"row {b} has {lq} queries but only {lk} keys; a query's own key must be among them")
        qb, kb, vb = (t.transpose(0, 1)[None] for t in (q[q0:q1], k[k0:k1], v[k0:k1]))  # (1, H, L, D)
        q_pos = torch.arange(lk - lq, lk, device=q.device)  # a row's queries are its last lq tokens
        visible = torch.arange(lk, device=q.device)[None, :] <= q_pos[:, None]  # (lq, lk): causal
        o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=visible, scale=scale,
                                           enable_gqa=qb.shape[1] != kb.shape[1])
        out[q0:q1] = o[0].transpose(0, 1)
    return out


@torch.library.custom_op("fms::varlen_causal_reference", mutates_args=())
def _varlen_reference_op(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, scale: float) -> Tensor:
    return varlen_causal_reference(q, k, v, cu_q.cpu(), cu_k.cpu(), scale)


@_varlen_reference_op.register_fake
def _(q, k, v, cu_q, cu_k, scale):
    return torch.empty_like(q)


def uses_flash(q: Tensor) -> bool:
    head_dim = q.shape[-1]
    return q.is_cuda and q.dtype in FLASH_DTYPES and head_dim <= 256 and head_dim % 8 == 0


def varlen_causal_attention(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_lens: Tensor,
                            scale: float) -> Tensor:
    """(total_q, Hq, D) attention output; cu_q/cu_k (B+1,) int32 offsets, max_lens (2,) host int64
    [longest query run, longest key run]."""
    flash = uses_flash(q)
    if torch.compiler.is_compiling():  # opaque ops in a traced graph
        if flash:
            return _varlen_flash(q, k, v, cu_q, cu_k, max_lens, scale)
        return _varlen_reference_op(q, k, v, cu_q, cu_k, scale)
    if flash:  # eagerly (the layers compile scope's attention op) without the custom op's dispatch
        return _varlen_flash_forward(q, k, v, cu_q, cu_k, max_lens, scale)
    return varlen_causal_reference(q, k, v, cu_q.cpu(), cu_k.cpu(), scale)


def padded_causal_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, mask: Tensor | None = None) -> Tensor:
    """One SDPA call over padded rows: q (B, Hq, T, D), k/v (B, Hkv, L, D) -> (B, Hq, T, D).

    mask: (B, 1, T, L) bool, True where a query sees a key; None means causal with T == L (a fresh
    step whose keys are its own tokens). Grouped-query heads: off CUDA SDPA broadcasts them
    (enable_gqa); on CUDA the key heads are repeated unless the flash kernel takes the call, since
    the memory-efficient kernel (the fast one for fp32, and the one that takes a mask) refuses
    enable_gqa and SDPA would fall back to its unfused math form.
    """
    hq, hkv = q.shape[1], k.shape[1]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    if mask is None and k.shape[2] != q.shape[2]:
        raise ValueError(f"causal attention without a mask needs as many keys as queries, got {k.shape[2]} "
                         f"keys for {q.shape[2]} queries; give a mask")
    flash_can = mask is None and q.dtype in FLASH_DTYPES
    if q.is_cuda and hq != hkv and not flash_can:
        k, v = k.repeat_interleave(hq // hkv, dim=1), v.repeat_interleave(hq // hkv, dim=1)
    kwargs = dict(attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=k.shape[1] != hq)
    if not q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, **kwargs)
    with sdpa_kernel(CUDA_SDPA_BACKENDS):
        return F.scaled_dot_product_attention(q, k, v, **kwargs)
