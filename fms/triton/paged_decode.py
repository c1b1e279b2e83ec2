"""Decode-step attention over a paged KV pool: a split-KV Triton kernel and its torch reference."""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from fms.triton.kv_write import kv_write_reference
from fms.triton.support import (
    DEFAULT_NUM_SMS,
    HAS_TRITON,
    can_run_triton,
    cdiv,
    env_switch,
    is_power_of_two,
    next_power_of_two,
    sm_count,
    tl,
    triton,
)

# Pool layout read by this module (one layer):
#
#   k_pool[kv_head, slot, :]      slot = physical_page * page_size + offset_in_page
#
#   logical page j of sequence b ──page_table[b, j]──> physical page p
#   token position t of sequence b lives at slot page_table[b, t // page_size] * page_size
#                                                + t % page_size
#
# Each (kv_head, physical page) is one contiguous [page_size, head_dim] block, which the
# kernel streams with full-width loads.

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MIN_PAGE_SIZE, _MAX_PAGE_SIZE = 16, 256
_MIN_HEAD_DIM, _MAX_HEAD_DIM = 16, 256
# Split sizing: programs to aim for per SM when the batch alone cannot fill the GPU, and a cap.
# A split owns at least one key block: its fixed cost (a G x D fp32 partial written and merged,
# ~1 KB per query head) is small next to the 2 * BLOCK_N * D * 2 bytes of K/V it streams, and at
# short contexts fewer blocks per program means fewer dependent load latencies in a row.
_PROGRAMS_PER_SM = 2
_MAX_SPLITS = 64
# The split count follows the batch, and each CUDA-graph batch size of the engine would otherwise compile kernels of
# its own at start-up. So nothing Triton compiles for depends on it: num_splits is not specialized (Triton would
# tell multiples of 16 apart), the partial log-sum-exps' split axis is padded to a multiple of 16 (so their strides
# stay multiples of 16), and the merge kernel's tile covers _MAX_SPLITS splits, its unused rows masked. Then the
# split kernel compiles twice (with and without a split) and the merge kernel once, for every batch
# (tests/triton/test_paged_decode.py counts the launch keys).
_LSE_SPLIT_ALIGN = 16

# FMS_FUSE_KV_WRITE, read once when fms is imported (as FMS_ARGMAX_KERNEL): "1" lets the paged op's eager one-token
# steps on CUDA (the default compile scope's decode step, and uncompiled decoding) hand the step's K/V to this kernel
# (new_kv), which stores them as it attends, instead of a K/V write kernel before it: one launch fewer per attention
# layer and step. "0", unset or empty keep the separate write. Off until timed on a GPU.
FUSE_KV_WRITE_ENV = "FMS_FUSE_KV_WRITE"


def fuse_kv_write_from_env(value: str | None = None) -> bool:
    """FMS_FUSE_KV_WRITE (or value): "1" on; "0", unset or empty off; anything else a ValueError naming it."""
    return env_switch(FUSE_KV_WRITE_ENV, "the decode kernel writes the step's K/V", "a K/V write kernel first", value)


FUSE_KV_WRITE = fuse_kv_write_from_env()

# head_dim -> (key rows per inner-loop step, num_warps, num_stages) of the decode kernel. 64 rows at
# head_dim >= 128 keep a 16 KB bf16 tile per K and V, small enough for 3 pipeline stages; 128 rows
# below. A head_dim not listed takes the entry of the next listed one up (or the largest).
DECODE_LAUNCH = {
    64: (128, 4, 3),
    128: (64, 4, 3),
}


@functools.cache  # looked up by every eager launch
def default_launch(head_dim: int) -> tuple[int, int, int]:
    """(block_n, num_warps, num_stages) of the decode kernel at this head_dim (DECODE_LAUNCH)."""
    fits = [d for d in sorted(DECODE_LAUNCH) if d >= head_dim]
    return DECODE_LAUNCH[fits[0] if fits else max(DECODE_LAUNCH)]


def default_pages_per_iter(page_size: int, head_dim: int) -> int:
    """Pages loaded per inner-loop step: DECODE_LAUNCH's key block in pages, at least one page."""
    return max(1, default_launch(head_dim)[0] // page_size)


def choose_num_splits(
    batch_size: int,
    num_kv_heads: int,
    max_seq_len: int,
    block_n: int,
    num_sms: int = DEFAULT_NUM_SMS,
) -> int:
    """Split-KV factor for a decode step.

    One program per (sequence, kv head) already fills the GPU at large batch, so no split.
    Otherwise split each sequence's keys until there are about `_PROGRAMS_PER_SM` programs per
    SM, with no more splits than key blocks of `block_n` tokens in `max_seq_len`.
    """
    num_programs = batch_size * num_kv_heads
    if num_programs >= num_sms:
        return 1
    wanted = cdiv(_PROGRAMS_PER_SM * num_sms, num_programs)
    num_blocks = cdiv(max(max_seq_len, 1), block_n)
    return max(1, min(wanted, num_blocks, _MAX_SPLITS))


def _validate(q, k_pool, v_pool, page_table, seq_lens, page_size, window, num_splits, page_logical_start):
    if q.dim() != 3:
        raise ValueError(f"q must be [batch, num_q_heads, head_dim], got shape {tuple(q.shape)}")
    if k_pool.dim() != 3:
        raise ValueError(f"k_pool must be [num_kv_heads, num_slots, head_dim], got shape {tuple(k_pool.shape)}")
    if v_pool.shape != k_pool.shape:
        raise ValueError(f"v_pool shape {tuple(v_pool.shape)} must equal k_pool shape {tuple(k_pool.shape)}")
    if q.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"q dtype {q.dtype} not supported; allowed: {_SUPPORTED_DTYPES}")
    if k_pool.dtype != q.dtype or v_pool.dtype != q.dtype:
        raise ValueError(
            f"dtype mismatch: q {q.dtype}, k_pool {k_pool.dtype}, v_pool {v_pool.dtype}; all must be equal"
        )
    batch_size, num_q_heads, head_dim = q.shape
    num_kv_heads, num_slots, kv_head_dim = k_pool.shape
    if kv_head_dim != head_dim:
        raise ValueError(f"head_dim mismatch: q has {head_dim}, k_pool/v_pool have {kv_head_dim}")
    if not (is_power_of_two(head_dim) and _MIN_HEAD_DIM <= head_dim <= _MAX_HEAD_DIM):
        raise ValueError(
            f"head_dim={head_dim} not supported; must be a power of two in [{_MIN_HEAD_DIM}, {_MAX_HEAD_DIM}]"
        )
    if num_kv_heads == 0 or num_q_heads % num_kv_heads != 0:
        raise ValueError(
            f"num_q_heads={num_q_heads} must be a multiple of num_kv_heads={num_kv_heads}"
        )
    if not isinstance(page_size, int) or not (
        is_power_of_two(page_size) and _MIN_PAGE_SIZE <= page_size <= _MAX_PAGE_SIZE
    ):
        raise ValueError(
            f"page_size={page_size!r} not supported; must be a power of two in [{_MIN_PAGE_SIZE}, {_MAX_PAGE_SIZE}]"
        )
    if num_slots % page_size != 0:
        raise ValueError(f"num_slots={num_slots} in the pool must be a multiple of page_size={page_size}")
    if page_table.dim() != 2 or page_table.shape[0] != batch_size:
        raise ValueError(f"page_table must be [batch={batch_size}, max_pages], got shape {tuple(page_table.shape)}")
    if page_table.dtype != torch.int32:
        raise ValueError(f"page_table dtype must be torch.int32, got {page_table.dtype}")
    if seq_lens.shape != (batch_size,) or seq_lens.dtype != torch.int32:
        raise ValueError(
            f"seq_lens must be an int32 tensor of shape ({batch_size},), got {seq_lens.dtype} {tuple(seq_lens.shape)}"
        )
    if page_logical_start is not None and (
        page_logical_start.shape != (batch_size,) or page_logical_start.dtype != torch.int32
    ):
        raise ValueError(
            f"page_logical_start must be an int32 tensor of shape ({batch_size},), "
            f"got {page_logical_start.dtype} {tuple(page_logical_start.shape)}"
        )
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"window={window!r} must be None or an int >= 1")
    if num_splits is not None and (not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"num_splits={num_splits!r} must be None or an int >= 1")
    tensors = {"q": q, "k_pool": k_pool, "v_pool": v_pool, "page_table": page_table, "seq_lens": seq_lens}
    if page_logical_start is not None:
        tensors["page_logical_start"] = page_logical_start
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) != 1:
        raise ValueError(f"all inputs must be on one device, got {devices}")


def paged_decode_reference(
    q: Tensor,
    k_pool: Tensor,
    v_pool: Tensor,
    page_table: Tensor,
    seq_lens: Tensor,
    page_size: int,
    scale: float,
    *,
    window: int | None = None,
    page_logical_start: Tensor | None = None,
) -> Tensor:
    """Gather every sequence's pages and attend in fp32; the CPU fallback and test oracle.

    Vectorised over the batch (no host sync): table entries outside a sequence's held pages
    are clamped into range and masked out, so their contents never matter.
    """
    _validate(q, k_pool, v_pool, page_table, seq_lens, page_size, window, None, page_logical_start)
    batch_size, num_q_heads, head_dim = q.shape
    num_kv_heads, num_slots, _ = k_pool.shape
    group_size = num_q_heads // num_kv_heads
    max_pages = page_table.shape[1]
    max_len = max_pages * page_size

    pos = torch.arange(max_len, device=q.device)  # (L,)
    phys = page_table.long().clamp(0, num_slots // page_size - 1)  # (B, P)
    slots = (phys[:, :, None] * page_size + torch.arange(page_size, device=q.device)).reshape(batch_size, max_len)
    lens = seq_lens.long()[:, None]  # (B, 1)
    valid = pos[None, :] < lens  # (B, L)
    if window is not None:
        valid &= pos[None, :] >= lens - window
    if page_logical_start is not None:
        valid &= pos[None, :] >= page_logical_start.long()[:, None] * page_size

    k = k_pool[:, slots].float().transpose(0, 1)  # (B, Hkv, L, D)
    v = v_pool[:, slots].float().transpose(0, 1)  # (B, Hkv, L, D)
    mask = valid[:, None, :, None]  # (B, 1, L, 1)
    # Unused slots may hold anything, NaN included; zero them so masked weights stay 0.
    k = torch.where(mask, k, 0.0)
    v = torch.where(mask, v, 0.0)
    qg = q.float().view(batch_size, num_kv_heads, group_size, head_dim)  # (B, Hkv, G, D)
    scores = torch.einsum("bhgd,bhld->bhgl", qg, k) * scale  # (B, Hkv, G, L)
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bhgl,bhld->bhgd", probs, v)  # (B, Hkv, G, D)
    return out.reshape(batch_size, num_q_heads, head_dim).to(q.dtype)


if HAS_TRITON:

    @triton.jit
    def _split_block_range(seq_len, kv_lo, split, num_splits, PAGE_SIZE: tl.constexpr, PAGES_PER_ITER: tl.constexpr):
        """Key blocks [blk_lo, blk_hi) owned by `split`, counted from the first held page.

        Shared by both kernels so the merge knows which splits wrote a partial result.
        """
        first_page = kv_lo // PAGE_SIZE
        last_page = (seq_len - 1) // PAGE_SIZE
        num_blocks = tl.cdiv(last_page - first_page + 1, PAGES_PER_ITER)
        blocks_per_split = tl.cdiv(num_blocks, num_splits)
        blk_lo = split * blocks_per_split
        blk_hi = tl.minimum(blk_lo + blocks_per_split, num_blocks)
        return first_page, last_page, blk_lo, blk_hi, blocks_per_split, num_blocks

    @triton.jit
    def _kv_lower_bound(seq_len, b, window, page_start_ptr, PAGE_SIZE: tl.constexpr, HAS_PAGE_START: tl.constexpr):
        """First key position the query may see: start of the window and of the held pages."""
        kv_lo = seq_len * 0
        if window > 0:  # window == 0 means no window
            kv_lo = tl.maximum(seq_len - window, 0)
        if HAS_PAGE_START:
            kv_lo = tl.maximum(kv_lo, tl.load(page_start_ptr + b) * PAGE_SIZE)
        return kv_lo

    @triton.jit(do_not_specialize=["num_splits"])
    def _paged_decode_split_kernel(
        q_ptr, k_ptr, v_ptr, page_table_ptr, seq_lens_ptr, page_start_ptr,
        out_ptr, part_out_ptr, part_lse_ptr,
        k_new_ptr, v_new_ptr, new_slot_ptr,
        qk_scale_log2, window, num_splits, max_pages,
        stride_qb, stride_qh,
        stride_kh, stride_ks,
        stride_vh, stride_vs,
        stride_ptb,
        stride_ob, stride_oh,
        stride_pob, stride_poh, stride_pos,
        stride_plb, stride_plh,
        stride_knb, stride_knh,
        stride_vnb, stride_vnh,
        GROUP_SIZE: tl.constexpr,
        GROUP_PAD: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        PAGE_SIZE: tl.constexpr,
        PAGES_PER_ITER: tl.constexpr,
        HAS_PAGE_START: tl.constexpr,
        IS_SPLIT: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        WRITE_KV: tl.constexpr,
    ):
        BLOCK_N: tl.constexpr = PAGE_SIZE * PAGES_PER_ITER
        b = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)

        seq_len = tl.load(seq_lens_ptr + b)
        kv_lo = _kv_lower_bound(seq_len, b, window, page_start_ptr, PAGE_SIZE, HAS_PAGE_START)
        first_page, last_page, blk_lo, blk_hi, _, num_blocks = _split_block_range(
            seq_len, kv_lo, split, num_splits, PAGE_SIZE, PAGES_PER_ITER
        )
        if blk_lo >= blk_hi:
            return  # empty split: the merge kernel never reads its slot

        dims = tl.arange(0, HEAD_DIM)
        k_base = k_ptr + kv_head.to(tl.int64) * stride_kh
        v_base = v_ptr + kv_head.to(tl.int64) * stride_vh
        if WRITE_KV:
            # The step's own K/V (position seq_len - 1, in the last key block): the split that owns that block
            # stores them at the token's slot, and the barrier makes the stores visible to this program's loads
            # below (no other program reads that slot). Holding them in registers through the loop instead took
            # 168 registers a thread and 69-71 KB of shared memory, three programs an SM where this form keeps five
            # (Triton 3.6 for sm_90, the shipped launches: final_project section 29).
            if blk_hi == num_blocks:
                new_slot = tl.load(new_slot_ptr + b).to(tl.int64)
                k_new = tl.load(k_new_ptr + b.to(tl.int64) * stride_knb + kv_head * stride_knh + dims)
                v_new = tl.load(v_new_ptr + b.to(tl.int64) * stride_vnb + kv_head * stride_vnh + dims)
                tl.store(k_base + new_slot * stride_ks + dims, k_new)
                tl.store(v_base + new_slot * stride_vs + dims, v_new)
            tl.debug_barrier()

        # GQA packing: the G query heads of this kv head form the rows of one tile, padded to
        # GROUP_PAD >= 16 rows so both products run on tensor cores.
        rows = tl.arange(0, GROUP_PAD)
        row_ok = rows < GROUP_SIZE
        q_heads = kv_head * GROUP_SIZE + rows
        q = tl.load(
            q_ptr + b * stride_qb + q_heads[:, None] * stride_qh + dims[None, :],
            mask=row_ok[:, None],
            other=0.0,
        )  # (GROUP_PAD, HEAD_DIM)

        cols = tl.arange(0, BLOCK_N)
        page_in_block = cols // PAGE_SIZE
        offset_in_page = cols % PAGE_SIZE
        table_row = page_table_ptr + b.to(tl.int64) * stride_ptb

        m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)

        for blk in range(blk_lo, blk_hi):
            logical_page = first_page + blk * PAGES_PER_ITER + page_in_block  # (BLOCK_N,)
            page_ok = (logical_page <= last_page) & (logical_page < max_pages)
            # Entries past the sequence may be garbage: read page 0 there (in bounds), mask below.
            phys = tl.load(table_row + logical_page, mask=page_ok, other=0)
            slot = phys.to(tl.int64) * PAGE_SIZE + offset_in_page
            pos = logical_page * PAGE_SIZE + offset_in_page
            key_ok = page_ok & (pos < seq_len) & (pos >= kv_lo)
            # Unused slots may hold NaN; the masked load zeroes them so p * v stays finite.
            k = tl.load(k_base + slot[:, None] * stride_ks + dims[None, :], mask=key_ok[:, None], other=0.0)
            v = tl.load(v_base + slot[:, None] * stride_vs + dims[None, :], mask=key_ok[:, None], other=0.0)

            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2  # (GROUP_PAD, BLOCK_N)
            s = tl.where(key_ok[None, :], s, float("-inf"))
            # Every block holds >= 1 visible key, so m_new is finite from the first block on.
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new

        out = acc / l_i[:, None]
        if IS_SPLIT:
            po = (
                part_out_ptr + b * stride_pob + q_heads[:, None] * stride_poh + split * stride_pos + dims[None, :]
            )
            tl.store(po, out, mask=row_ok[:, None])
            pl = part_lse_ptr + b * stride_plb + q_heads * stride_plh + split
            tl.store(pl, m_i + tl.log2(l_i), mask=row_ok)
        else:
            o = out_ptr + b * stride_ob + q_heads[:, None] * stride_oh + dims[None, :]
            tl.store(o, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])

    @triton.jit(do_not_specialize=["num_splits"])
    def _paged_decode_merge_kernel(
        seq_lens_ptr, page_start_ptr, part_out_ptr, part_lse_ptr, out_ptr,
        window, num_splits,
        stride_pob, stride_poh, stride_pos,
        stride_plb, stride_plh,
        stride_ob, stride_oh,
        HEAD_DIM: tl.constexpr,
        PAGE_SIZE: tl.constexpr,
        PAGES_PER_ITER: tl.constexpr,
        SPLIT_PAD: tl.constexpr,
        HAS_PAGE_START: tl.constexpr,
    ):
        b = tl.program_id(0)
        head = tl.program_id(1)
        seq_len = tl.load(seq_lens_ptr + b)
        kv_lo = _kv_lower_bound(seq_len, b, window, page_start_ptr, PAGE_SIZE, HAS_PAGE_START)
        _, _, _, _, blocks_per_split, num_blocks = _split_block_range(
            seq_len, kv_lo, 0, num_splits, PAGE_SIZE, PAGES_PER_ITER
        )
        num_written = tl.cdiv(num_blocks, blocks_per_split)  # splits that own >= 1 block

        splits = tl.arange(0, SPLIT_PAD)
        written = splits < num_written
        dims = tl.arange(0, HEAD_DIM)
        lse = tl.load(part_lse_ptr + b * stride_plb + head * stride_plh + splits, mask=written, other=float("-inf"))
        weight = tl.exp2(lse - tl.max(lse, axis=0))
        weight = weight / tl.sum(weight, axis=0)
        part = tl.load(
            part_out_ptr + b * stride_pob + head * stride_poh + splits[:, None] * stride_pos + dims[None, :],
            mask=written[:, None],
            other=0.0,
        )  # (SPLIT_PAD, HEAD_DIM)
        out = tl.sum(part * weight[:, None], axis=0)
        tl.store(out_ptr + b * stride_ob + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty))


def new_output(q: Tensor) -> Tensor:
    """The kernel's output for q (B, Hq, D): contiguous whatever q's strides. empty_like would copy the strides of a q
    sliced from a fused q/k/v projection at a batch of 1 (a dense layout there) and not at larger batches, and a
    compiled function taking the output would then see a stride change between batch sizes (a second compile of
    Granite-4.0-H's decode step on the H100, final_project section 26)."""
    return q.new_empty(q.shape)


def _validate_new_kv(new_kv, q: Tensor, k_pool: Tensor) -> None:
    if not isinstance(new_kv, (tuple, list)) or len(new_kv) != 3:
        raise ValueError("new_kv must be (k, v, slots)")
    k_new, v_new, slots = new_kv
    want = (q.shape[0], k_pool.shape[0], k_pool.shape[2])
    for name, t in (("k", k_new), ("v", v_new)):
        if tuple(t.shape) != want or t.dtype != k_pool.dtype or t.device != q.device:
            raise ValueError(f"new_kv's {name} must be [batch, num_kv_heads, head_dim] = {list(want)} of the pool's "
                             f"dtype {k_pool.dtype} on {q.device}, got {t.dtype} {tuple(t.shape)} on {t.device}")
    if slots.shape != (q.shape[0],) or slots.dtype not in (torch.int32, torch.int64) or slots.device != q.device:
        raise ValueError(f"new_kv's slots must be an int32 or int64 tensor of shape ({q.shape[0]},) on {q.device}, "
                         f"got {slots.dtype} {tuple(slots.shape)} on {slots.device}")


def write_new_kv(k_pool: Tensor, v_pool: Tensor, new_kv: tuple[Tensor, Tensor, Tensor]) -> None:
    """The write that new_kv stands for, in torch: row b's k and v ([B, Hkv, D]) into the pools at slots[b] (the
    K/V write's reference, one token per row)."""
    k_new, v_new, slots = new_kv
    kv_write_reference(k_pool, v_pool, k_new[:, :, None], v_new[:, :, None], slots.long())


def paged_decode_attention(
    q: Tensor,
    k_pool: Tensor,
    v_pool: Tensor,
    page_table: Tensor,
    seq_lens: Tensor,
    page_size: int,
    scale: float,
    *,
    window: int | None = None,
    num_splits: int | None = None,
    page_logical_start: Tensor | None = None,
    max_seq_len: int | None = None,
    pages_per_iter: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    new_kv: tuple[Tensor, Tensor, Tensor] | None = None,
) -> Tensor:
    """One query token per sequence attending over its pages in the layer's pool.

    q [B, Hq, D]; k_pool, v_pool [Hkv, num_slots, D]; page_table [B, max_pages] int32;
    seq_lens [B] int32 (including the new token, whose K/V are already in the pool).
    Returns [B, Hq, D] in q's dtype.

    window: keys with q_pos - kv_pos >= window are excluded; pages wholly before it are not read.
    page_logical_start: [B] int32, first logical page still held; earlier pages are not read.
    num_splits: split-KV factor; None chooses one from the batch, kv heads, `max_seq_len`
        (default max_pages * page_size, a host-side bound so no device sync is needed) and
        the SM count.
    pages_per_iter, num_warps, num_stages: kernel tuning knobs; the key block per loop step
        is pages_per_iter * page_size rows. None takes DECODE_LAUNCH's entry for the head_dim.
    new_kv: (k [B, Hkv, D], v [B, Hkv, D], slots [B] int) the step's own keys and values, not yet in the pool: the
        kernel stores row b's at slot slots[b] (the K/V write, without a launch of its own) and attends to them as
        position seq_lens[b] - 1. None: they are in the pool already.

    Runs the Triton kernel on CUDA (or under TRITON_INTERPRET=1), else the torch reference.
    """
    _validate(q, k_pool, v_pool, page_table, seq_lens, page_size, window, num_splits, page_logical_start)
    if pages_per_iter is not None and (not isinstance(pages_per_iter, int) or not is_power_of_two(pages_per_iter)):
        raise ValueError(f"pages_per_iter={pages_per_iter!r} must be None or a power of two >= 1")
    if max_seq_len is not None and (not isinstance(max_seq_len, int) or max_seq_len < 1):
        raise ValueError(f"max_seq_len={max_seq_len!r} must be None or an int >= 1")
    for name, knob in (("num_warps", num_warps), ("num_stages", num_stages)):
        if knob is not None and (isinstance(knob, bool) or not isinstance(knob, int) or knob < 1):
            raise ValueError(f"{name}={knob!r} must be None or an int >= 1")
    if new_kv is not None:
        _validate_new_kv(new_kv, q, k_pool)
    if not can_run_triton(q.device):
        if new_kv is not None:
            write_new_kv(k_pool, v_pool, new_kv)
        return paged_decode_reference(
            q, k_pool, v_pool, page_table, seq_lens, page_size, scale,
            window=window, page_logical_start=page_logical_start,
        )

    batch_size, num_q_heads, head_dim = q.shape
    num_kv_heads = k_pool.shape[0]
    group_size = num_q_heads // num_kv_heads
    max_pages = page_table.shape[1]
    out = new_output(q)
    if batch_size == 0 or max_pages == 0:
        if new_kv is not None:
            write_new_kv(k_pool, v_pool, new_kv)
        return out.zero_()
    # Wide loads need unit stride along head_dim; other strides are passed through.
    q, k_pool, v_pool = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k_pool, v_pool))
    page_table = page_table.contiguous()

    if pages_per_iter is None:
        pages_per_iter = default_pages_per_iter(page_size, head_dim)
    _, default_warps, default_stages = default_launch(head_dim)
    num_warps = default_warps if num_warps is None else num_warps
    num_stages = default_stages if num_stages is None else num_stages
    block_n = page_size * pages_per_iter
    if num_splits is None:
        seq_bound = max_pages * page_size if max_seq_len is None else max_seq_len
        if window is not None:
            seq_bound = min(seq_bound, window + page_size)
        num_sms = sm_count(q.device)
        num_splits = choose_num_splits(batch_size, num_kv_heads, seq_bound, block_n, num_sms)

    is_split = num_splits > 1
    if is_split:
        part_out = torch.empty(batch_size, num_q_heads, num_splits, head_dim, device=q.device, dtype=torch.float32)
        lse_width = cdiv(num_splits, _LSE_SPLIT_ALIGN) * _LSE_SPLIT_ALIGN
        part_lse = torch.empty(batch_size, num_q_heads, lse_width, device=q.device, dtype=torch.float32)
    else:  # never read; any tensor with the right stride count will do
        part_out = out.new_empty(1, 1, 1, dtype=torch.float32)
        part_lse = out.new_empty(1, 1, 1, dtype=torch.float32)
    has_page_start = page_logical_start is not None
    page_start = page_logical_start if has_page_start else seq_lens
    window_arg = 0 if window is None else window
    # fp32 inputs would otherwise run the products in tf32 (~1e-3 error); 16-bit inputs are exact.
    dot_precision = "ieee" if q.dtype == torch.float32 else "tf32"
    if new_kv is not None:
        k_new, v_new, new_slots = (t if t.stride(-1) == 1 else t.contiguous() for t in new_kv)
    else:  # never read
        k_new, v_new, new_slots = q, q, seq_lens

    _paged_decode_split_kernel[(batch_size, num_kv_heads, num_splits)](
        q, k_pool, v_pool, page_table, seq_lens, page_start,
        out, part_out, part_lse,
        k_new, v_new, new_slots,
        scale * math.log2(math.e), window_arg, num_splits, max_pages,
        q.stride(0), q.stride(1),
        k_pool.stride(0), k_pool.stride(1),
        v_pool.stride(0), v_pool.stride(1),
        page_table.stride(0),
        out.stride(0), out.stride(1),
        part_out.stride(0), part_out.stride(1), part_out.stride(2),
        part_lse.stride(0), part_lse.stride(1),
        k_new.stride(0), k_new.stride(1),
        v_new.stride(0), v_new.stride(1),
        GROUP_SIZE=group_size,
        GROUP_PAD=max(16, next_power_of_two(group_size)),
        HEAD_DIM=head_dim,
        PAGE_SIZE=page_size,
        PAGES_PER_ITER=pages_per_iter,
        HAS_PAGE_START=has_page_start,
        IS_SPLIT=is_split,
        DOT_PRECISION=dot_precision,
        WRITE_KV=new_kv is not None,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if is_split:
        split_pad = next_power_of_two(max(num_splits, _MAX_SPLITS))
        _paged_decode_merge_kernel[(batch_size, num_q_heads)](
            seq_lens, page_start, part_out, part_lse, out,
            window_arg, num_splits,
            part_out.stride(0), part_out.stride(1), part_out.stride(2),
            part_lse.stride(0), part_lse.stride(1),
            out.stride(0), out.stride(1),
            HEAD_DIM=head_dim,
            PAGE_SIZE=page_size,
            PAGES_PER_ITER=pages_per_iter,
            SPLIT_PAD=split_pad,
            HAS_PAGE_START=has_page_start,
            num_warps=4 if head_dim * split_pad >= 4096 else 1,
        )
    return out


# An opaque operator for torch.compile: the compiled decode step keeps the launcher's host logic
# (split sizing from the batch size, tensor checks) out of the traced graph, so one symbolic-batch
# compile serves every CUDA-graph bucket.
@torch.library.custom_op("fms::paged_decode", mutates_args=())
def paged_decode_op(q: Tensor, k_pool: Tensor, v_pool: Tensor, page_table: Tensor, seq_lens: Tensor,
                    page_size: int, scale: float, window: int) -> Tensor:
    """paged_decode_attention with window 0 meaning none."""
    return paged_decode_attention(q, k_pool, v_pool, page_table, seq_lens, page_size, scale,
                                  window=window or None)


@paged_decode_op.register_fake
def _(q, k_pool, v_pool, page_table, seq_lens, page_size, scale, window):
    return new_output(q)
