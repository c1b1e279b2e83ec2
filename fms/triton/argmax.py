"""Each row's first maximum, x (B, V) -> (B,) int64 as x.argmax(-1), for the greedy token of a decode step.

Two passes. A Triton kernel reads the rows once, one program per (row, column part), and writes each part's maximum
and the column of its first maximum. Then torch picks each row's first part holding the row maximum (B x parts
values) and gathers that part's column. The first maximum of the first part holding the row maximum is the row's
first maximum, so ties resolve as in argmax, and a NaN counts as the maximum there, as in argmax: a part with a NaN
reports its first NaN.

Why a kernel of our own: inductor does not split an argmax reduction (torch 2.11), and the column-split torch
version (fms.runtime.sampler.argmax_rows) compiled to one reduction over (B x 64, V / 64) that read a batch-128 step's
32.8 MB of bf16 logits at 0.61 TB/s on the H100 (53.8 us a step, final_project section 28). Here the parts are sized
from the batch so that every SM gets programs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fms.triton.support import HAS_TRITON, can_run_triton, env_switch, sm_count, tl, triton

__all__ = ["ARGMAX_ENV", "KERNEL_ON", "argmax_rows_triton", "argmax_rows_op", "kernel_on_from_env", "num_parts"]

# FMS_ARGMAX_KERNEL, read once when fms is imported (as FMS_GEMV is by get_model, so shell A/B runs stay
# reproducible): "1" sends the decode step's argmax (fms.runtime.sampler.argmax_rows) through this kernel where it
# can run; "0", unset or empty keep the torch version. Off until timed on a GPU.
ARGMAX_ENV = "FMS_ARGMAX_KERNEL"
_BLOCK = 1024
_MAX_PARTS = 64
_PROGRAMS_PER_SM = 4


def kernel_on_from_env(value: str | None = None) -> bool:
    """FMS_ARGMAX_KERNEL (or value): "1" on; "0", unset or empty off; anything else a ValueError naming it."""
    return env_switch(ARGMAX_ENV, "the Triton argmax kernel", "torch's argmax", value)


KERNEL_ON = kernel_on_from_env()


def num_parts(batch: int, vocab: int, num_sms: int) -> int:
    """Column parts per row (batch >= 1): enough (batch x parts) programs for every SM, at most _MAX_PARTS, each
    part at least _BLOCK columns, a power of two."""
    want = max(1, -(-_PROGRAMS_PER_SM * num_sms // batch))
    parts = 1
    while parts < want and parts < _MAX_PARTS and parts * 2 * _BLOCK <= vocab:
        parts *= 2
    return parts


if HAS_TRITON:

    @triton.jit(do_not_specialize=["parts"])
    def _part_argmax_kernel(x_ptr, stride_row, vocab, cols_per_part, part_max_ptr, part_idx_ptr, parts,
                            BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        part = tl.program_id(1)
        lo = part * cols_per_part
        hi = tl.minimum(lo + cols_per_part, vocab)
        best = tl.full((), float("-inf"), tl.float32)
        best_idx = lo  # a part of -inf only reports its first column, as argmax does
        nan_idx = vocab  # none yet
        cols = tl.arange(0, BLOCK)
        for start in range(lo, hi, BLOCK):
            offs = start + cols
            inside = offs < hi
            v = tl.load(x_ptr + row * stride_row + offs, mask=inside, other=float("-inf")).to(tl.float32)
            is_nan = (v != v) & inside
            nan_idx = tl.minimum(nan_idx, tl.min(tl.where(is_nan, offs, vocab)))
            v = tl.where(is_nan, float("-inf"), v)
            block_max = tl.max(v)
            block_idx = tl.min(tl.where(inside & (v == block_max), offs, vocab))
            take = block_max > best  # strictly: an equal maximum later in the row keeps the earlier column
            best = tl.where(take, block_max, best)
            best_idx = tl.where(take, block_idx, best_idx)
        has_nan = nan_idx < vocab
        out = row * parts + part
        tl.store(part_max_ptr + out, tl.where(has_nan, float("nan"), best))
        tl.store(part_idx_ptr + out, tl.where(has_nan, nan_idx, best_idx).to(tl.int64))


def argmax_rows_triton(x: Tensor, parts: int | None = None) -> Tensor:
    """x (B, V) floating, unit column stride -> (B,) int64, equal to x.argmax(-1). parts: column parts per row
    (None: num_parts for this device), each widened to whole 1,024-column blocks (so there may be fewer)."""
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"argmax_rows_triton takes a (B, V) floating tensor, got {tuple(x.shape)} {x.dtype}")
    if x.shape[1] == 0 or x.stride(1) != 1:
        raise ValueError(f"argmax_rows_triton needs V >= 1 columns of stride 1, got shape {tuple(x.shape)} "
                         f"strides {x.stride()}")
    if not can_run_triton(x.device):
        raise RuntimeError(f"the Triton argmax kernel cannot run on {x.device} (CUDA, or TRITON_INTERPRET=1)")
    batch, vocab = x.shape
    if parts is not None and (isinstance(parts, bool) or not isinstance(parts, int) or parts < 1):
        raise ValueError(f"parts={parts!r} must be None or an int >= 1")
    if batch == 0:
        return torch.empty(0, dtype=torch.int64, device=x.device)
    if parts is None:
        parts = num_parts(batch, vocab, sm_count(x.device))
    # Whole blocks per part: cols_per_part stays a multiple of 16 whatever the part count (Triton would tell
    # multiples of 16 apart, and compile again at each CUDA-graph batch size), and no part starts past the row.
    cols_per_part = -(-vocab // parts)
    cols_per_part = -(-cols_per_part // _BLOCK) * _BLOCK
    parts = -(-vocab // cols_per_part)
    part_max = torch.empty(batch, parts, dtype=torch.float32, device=x.device)
    part_idx = torch.empty(batch, parts, dtype=torch.int64, device=x.device)
    _part_argmax_kernel[(batch, parts)](x, x.stride(0), vocab, cols_per_part, part_max, part_idx, parts,
                                        BLOCK=_BLOCK, num_warps=4)
    best_part = part_max.argmax(dim=-1, keepdim=True)  # the first part holding the maximum (or a NaN)
    return part_idx.gather(1, best_part)[:, 0]


# Opaque to torch.compile: the launch's part sizing reads the batch size, which the compiled decode step keeps
# symbolic.
@torch.library.custom_op("fms::argmax_rows", mutates_args=())
def argmax_rows_op(x: Tensor) -> Tensor:
    """x (B, V) -> (B,) int64 first maxima: the Triton kernel where it can run, x.argmax(-1) elsewhere."""
    if can_run_triton(x.device) and x.stride(1) == 1:
        return argmax_rows_triton(x)
    return x.argmax(dim=-1)


@argmax_rows_op.register_fake
def _(x):
    return x.new_empty(x.shape[0], dtype=torch.int64)
