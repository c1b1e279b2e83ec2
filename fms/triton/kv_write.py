"""The paged K/V write: a step's keys and values stored into one layer's pools at their slots, K and V in one launch
(a Triton kernel), and its torch reference (two index_copy_).

    k, v         [B, Hkv, T, D]   any strides (the step's new tokens)
    slot_mapping [B*T]            token b*T + t goes to slot slot_mapping[b*T + t]
    k_pool/v_pool [Hkv, S, D]     k_pool[h, slot_mapping[i]] <- k[b, h, t]

Program (i, h) copies one token's head: D elements of K and D of V. Tokens sharing a slot (padded rows on the
scratch slot) leave one of them there.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fms.triton.support import HAS_TRITON, can_run_triton, next_power_of_two, tl, triton

__all__ = ["kv_write_reference", "kv_write_triton", "kv_write"]


def _validate(k_pool: Tensor, v_pool: Tensor, k: Tensor, v: Tensor, slot_mapping: Tensor) -> None:
    if k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"k and v must be [B, Hkv, T, D] of one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    b, hkv, t, d = k.shape
    for name, pool in (("k_pool", k_pool), ("v_pool", v_pool)):
        if pool.dim() != 3 or pool.shape[0] != hkv or pool.shape[2] != d:
            raise ValueError(f"{name} must be [Hkv={hkv}, slots, D={d}], got {tuple(pool.shape)}")
    if slot_mapping.shape != (b * t,):
        raise ValueError(f"slot_mapping must hold B*T = {b * t} slots, got shape {tuple(slot_mapping.shape)}")


def kv_write_reference(k_pool: Tensor, v_pool: Tensor, k: Tensor, v: Tensor, slot_mapping: Tensor) -> None:
    b, hkv, t, d = k.shape
    k_pool.index_copy_(1, slot_mapping, k.permute(1, 0, 2, 3).reshape(hkv, b * t, d))
    v_pool.index_copy_(1, slot_mapping, v.permute(1, 0, 2, 3).reshape(hkv, b * t, d))


if HAS_TRITON:

    @triton.jit(do_not_specialize=["T"])
    def _kv_write_kernel(k_ptr, v_ptr, k_pool_ptr, v_pool_ptr, slot_ptr, T,
                         stride_kb, stride_kh, stride_kt, stride_kd,
                         stride_vb, stride_vh, stride_vt, stride_vd,
                         stride_kph, stride_kps, stride_kpd,
                         stride_vph, stride_vps, stride_vpd,
                         D: tl.constexpr, BLOCK_D: tl.constexpr):
        i = tl.program_id(0)
        h = tl.program_id(1).to(tl.int64)
        b = (i // T).to(tl.int64)
        t = (i % T).to(tl.int64)
        slot = tl.load(slot_ptr + i).to(tl.int64)
        d = tl.arange(0, BLOCK_D)
        ok = d < D
        key = tl.load(k_ptr + b * stride_kb + h * stride_kh + t * stride_kt + d * stride_kd, mask=ok)
        tl.store(k_pool_ptr + h * stride_kph + slot * stride_kps + d * stride_kpd, key, mask=ok)
        value = tl.load(v_ptr + b * stride_vb + h * stride_vh + t * stride_vt + d * stride_vd, mask=ok)
        tl.store(v_pool_ptr + h * stride_vph + slot * stride_vps + d * stride_vpd, value, mask=ok)


def kv_write_triton(k_pool: Tensor, v_pool: Tensor, k: Tensor, v: Tensor, slot_mapping: Tensor) -> None:
    """The Triton kernel (CUDA, or Triton's interpreter with TRITON_INTERPRET=1)."""
    _validate(k_pool, v_pool, k, v, slot_mapping)
    if not can_run_triton(k.device):
        raise RuntimeError(f"the K/V write kernel needs Triton and a CUDA device (or TRITON_INTERPRET=1); got device "
                           f"{k.device}, Triton {'installed' if HAS_TRITON else 'not installed'}")
    b, hkv, t, d = k.shape
    if b * t == 0:
        return
    _kv_write_kernel[(b * t, hkv)](
        k, v, k_pool, v_pool, slot_mapping, t,
        *k.stride(), *v.stride(), *k_pool.stride(), *v_pool.stride(),
        D=d, BLOCK_D=next_power_of_two(d), num_warps=1 if d <= 128 else 2,
    )


def kv_write(k_pool: Tensor, v_pool: Tensor, k: Tensor, v: Tensor, slot_mapping: Tensor) -> None:
    """The kernel on CUDA, the reference elsewhere."""
    if k.is_cuda and HAS_TRITON:
        kv_write_triton(k_pool, v_pool, k, v, slot_mapping)
    else:
        kv_write_reference(k_pool, v_pool, k, v, slot_mapping)
