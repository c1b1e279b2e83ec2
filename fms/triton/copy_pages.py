"""Copy-on-write of K/V pages: page src's slots copied into page dst in every layer's pools, in one launch (a Triton
kernel) instead of two indexing kernels per pool, and its torch reference.

    pools        a list of [Hkv, S, D] tensors of one shape, dtype and strides (every layer's K and V pools)
    pairs        [P, 2] int64 (src page, dst page): pool[:, dst * page_size + j] <- pool[:, src * page_size + j]

The kernel reads each pool's address from a device table of data pointers (`pool_address_table`, built once per
list of pools; the pools must outlive it), so one launch reaches every layer's separately allocated tensor, as
vLLM's copy_blocks does in CUDA. Program (pair, pool, head) copies one page of one head: page_size x D elements.
Source and destination pages must differ (copy-on-write gives a fresh destination page).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from fms.triton.support import HAS_TRITON, can_run_triton, next_power_of_two, tl, triton

__all__ = ["copy_pages_reference", "copy_pages_triton", "copy_pages", "pool_address_table"]


def _validate_pools(pools: Sequence[Tensor]) -> None:
    if not pools:
        raise ValueError("copy_pages needs at least one pool")
    first = pools[0]
    if first.dim() != 3:
        raise ValueError(f"pools must be [Hkv, slots, D], got pool 0 of shape {tuple(first.shape)}")
    for i, pool in enumerate(pools):
        if pool.shape != first.shape or pool.dtype != first.dtype or pool.stride() != first.stride():
            raise ValueError(f"every pool must match pool 0 ({tuple(first.shape)}, {first.dtype}, strides "
                             f"{first.stride()}); pool {i} is {tuple(pool.shape)}, {pool.dtype}, {pool.stride()}")
        if pool.device != first.device:
            raise ValueError(f"every pool must be on {first.device}; pool {i} is on {pool.device}")


def _validate_pairs(first_pool: Tensor, pairs: Tensor, page_size: int) -> None:
    if pairs.dim() != 2 or pairs.shape[1] != 2 or pairs.dtype != torch.int64:
        raise ValueError(f"pairs must be [P, 2] int64 (src page, dst page), got {tuple(pairs.shape)} {pairs.dtype}")
    if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
        raise ValueError(f"page_size must be an int >= 1, got {page_size!r}")
    if first_pool.shape[1] % page_size:
        raise ValueError(f"the pools' {first_pool.shape[1]} slots are not a whole number of {page_size}-slot pages")


def copy_pages_reference(pools: Sequence[Tensor], pairs: Tensor, page_size: int) -> None:
    """Two indexing kernels per pool."""
    offsets = torch.arange(page_size, device=pairs.device)
    src = (pairs[:, 0:1] * page_size + offsets).flatten()
    dst = (pairs[:, 1:2] * page_size + offsets).flatten()
    for pool in pools:
        pool[:, dst] = pool[:, src]


def pool_address_table(pools: Sequence[Tensor]) -> Tensor:
    """The pools' data pointers as an int64 tensor on their device: the kernel's way to every pool in one launch.
    Valid while the pools live and are not reallocated. Checks the pools once, here: a caller that keeps the table
    (the paged cache) does not pay for checking every pool at each copy."""
    _validate_pools(pools)
    return torch.tensor([p.data_ptr() for p in pools], dtype=torch.int64).to(pools[0].device)


if HAS_TRITON:

    @triton.jit
    def _copy_pages_kernel(addr_ptr, pairs_ptr, stride_h, stride_s, PAGE_SIZE: tl.constexpr, D: tl.constexpr,
                           BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, DTYPE: tl.constexpr):
        pair = tl.program_id(0)
        pool = tl.load(addr_ptr + tl.program_id(1)).to(tl.pointer_type(DTYPE))
        h = tl.program_id(2).to(tl.int64)
        src = tl.load(pairs_ptr + 2 * pair) * PAGE_SIZE
        dst = tl.load(pairs_ptr + 2 * pair + 1) * PAGE_SIZE
        s = tl.arange(0, BLOCK_S)
        d = tl.arange(0, BLOCK_D)
        ok = (s[:, None] < PAGE_SIZE) & (d[None, :] < D)
        offsets = h * stride_h + s[:, None].to(tl.int64) * stride_s + d[None, :]
        page = tl.load(pool + src * stride_s + offsets, mask=ok)
        tl.store(pool + dst * stride_s + offsets, page, mask=ok)

    _TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def copy_pages_triton(pools: Sequence[Tensor], pairs: Tensor, page_size: int, addresses: Tensor | None = None) -> None:
    """The Triton kernel (CUDA, or Triton's interpreter with TRITON_INTERPRET=1). addresses: pool_address_table(pools),
    passed by a caller that keeps it (built here otherwise, which checks the pools)."""
    if addresses is None:
        addresses = pool_address_table(pools)
    first = pools[0]
    _validate_pairs(first, pairs, page_size)
    if not can_run_triton(first.device):
        raise RuntimeError(f"the page copy kernel needs Triton and a CUDA device (or TRITON_INTERPRET=1); got device "
                           f"{first.device}, Triton {'installed' if HAS_TRITON else 'not installed'}")
    if first.dtype not in _TL_DTYPES or first.stride(2) != 1:
        raise ValueError(f"the page copy kernel takes fp32/fp16/bf16 pools with contiguous D; got {first.dtype}, "
                         f"strides {first.stride()}")
    if addresses.shape != (len(pools),) or addresses.dtype != torch.int64 or addresses.device != first.device:
        raise ValueError(f"addresses must be [{len(pools)}] int64 on {first.device} (pool_address_table), got "
                         f"{tuple(addresses.shape)} {addresses.dtype} on {addresses.device}")
    if pairs.shape[0] == 0:
        return
    hkv, _, d = first.shape
    _copy_pages_kernel[(pairs.shape[0], len(pools), hkv)](
        addresses, pairs.contiguous(), first.stride(0), first.stride(1), PAGE_SIZE=page_size, D=d,
        BLOCK_S=next_power_of_two(page_size), BLOCK_D=next_power_of_two(d), DTYPE=_TL_DTYPES[first.dtype],
        num_warps=4,
    )


def copy_pages(pools: Sequence[Tensor], pairs: Tensor, page_size: int, addresses: Tensor | None = None) -> None:
    """The kernel on CUDA, the reference elsewhere."""
    if pools and pools[0].is_cuda and HAS_TRITON:
        copy_pages_triton(pools, pairs, page_size, addresses)
    else:
        if addresses is None:  # a table was built by pool_address_table, which checked the pools
            _validate_pools(pools)
        _validate_pairs(pools[0], pairs, page_size)
        copy_pages_reference(pools, pairs, page_size)
