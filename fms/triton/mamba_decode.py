"""Mamba2 decode: one token's SSM state update, in place in the state pool (a Triton kernel and its torch reference)."""

from __future__ import annotations

import torch
from torch import Tensor

from fms.triton.ssd_reference import ssd_step
from fms.triton.support import (
    DEFAULT_NUM_SMS,
    HAS_TRITON,
    can_run_triton,
    cdiv,
    next_power_of_two,
    sm_count,
    tl,
    triton,
)

__all__ = [
    "HAS_TRITON",
    "choose_block_p",
    "mamba_decode_op",
    "mamba_decode_reference",
    "mamba_decode_triton",
    "mamba_decode_update",
]

# State layout read and written here (one Mamba layer; see fms.modules.mamba_layer):
#
#   ssm_pool[slot, head, p, n]   fp32, [num_slots + 1, nh, P, N]
#
#   batch row i ──slots[i]──> slot s       (padded rows may all share the scratch slot)
#   head h reads group g = h // (nh // G) of B[i] and C[i]
#
#   program (i, h, pb) owns the tile ssm_pool[s, h, pb*BLOCK_P : (pb+1)*BLOCK_P, :]: it loads the tile
#   once, stores the new tile once and reduces it against C[i, g] for y[i, h, pb*BLOCK_P : ...].
#
# So a step reads and writes each row's state once (2 passes), where gathering the rows, stepping them
# into a new tensor and scattering it back costs 4.

_X_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_STATE_SIZE = 1024  # one program holds a full row of N in registers
# Elements of the state tile one program holds: 16 KB of fp32, 32 registers per thread at 4 warps.
_MAX_TILE = 4096
_MIN_BLOCK_P = 4
# Programs to aim for per SM when the batch alone cannot fill the GPU.
_PROGRAMS_PER_SM = 2


def choose_block_p(batch_size: int, num_heads: int, head_dim: int, state_size: int,
                   num_sms: int = DEFAULT_NUM_SMS) -> int:
    """Rows of P per program: the largest tile that fits `_MAX_TILE`, halved while there are fewer than
    `_PROGRAMS_PER_SM` programs per SM (small batches), down to `_MIN_BLOCK_P`."""
    block_n = next_power_of_two(state_size)
    block_p = max(1, min(next_power_of_two(head_dim), _MAX_TILE // block_n))
    while block_p > _MIN_BLOCK_P and batch_size * num_heads * cdiv(head_dim, block_p) < _PROGRAMS_PER_SM * num_sms:
        block_p //= 2
    return block_p


def _validate(ssm_pool, slots, x, dt, A, B, C, D) -> None:
    """Shapes, dtypes and devices only: checking slot values would cost a host sync (and break capture)."""
    if ssm_pool.dim() != 4 or ssm_pool.dtype != torch.float32:
        raise ValueError(f"ssm_pool must be fp32 [num_slots, num_heads, head_dim, state_size], "
                         f"got {ssm_pool.dtype} {tuple(ssm_pool.shape)}")
    _, num_heads, head_dim, state_size = ssm_pool.shape
    if x.dim() != 3 or x.shape[1:] != (num_heads, head_dim):
        raise ValueError(f"x must be [batch, num_heads={num_heads}, head_dim={head_dim}], got {tuple(x.shape)}")
    if x.dtype not in _X_DTYPES:
        raise ValueError(f"x dtype {x.dtype} not supported; allowed: {_X_DTYPES}")
    batch_size = x.shape[0]
    if slots.shape != (batch_size,) or slots.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slots must be an int32 or int64 tensor of shape ({batch_size},), "
                         f"got {slots.dtype} {tuple(slots.shape)}")
    if dt.shape != (batch_size, num_heads) or dt.dtype != torch.float32:
        raise ValueError(f"dt must be fp32 [batch={batch_size}, num_heads={num_heads}], "
                         f"got {dt.dtype} {tuple(dt.shape)}")
    if A.shape != (num_heads,) or A.dtype != torch.float32:
        raise ValueError(f"A must be fp32 [num_heads={num_heads}], got {A.dtype} {tuple(A.shape)}")
    if D.shape != (num_heads,) or not D.is_floating_point():
        raise ValueError(f"D must be a float tensor [num_heads={num_heads}], got {D.dtype} {tuple(D.shape)}")
    for name, t in (("B", B), ("C", C)):
        if t.dim() != 3 or t.shape[0] != batch_size or t.shape[2] != state_size or t.dtype not in _X_DTYPES:
            raise ValueError(f"{name} must be [batch={batch_size}, num_groups, state_size={state_size}] of "
                             f"{_X_DTYPES}, got {t.dtype} {tuple(t.shape)}")
    if C.shape != B.shape:
        raise ValueError(f"B and C must have one shape, got {tuple(B.shape)} and {tuple(C.shape)}")
    num_groups = B.shape[1]
    if num_groups < 1 or num_heads % num_groups != 0:
        raise ValueError(f"num_heads={num_heads} must be a multiple of num_groups={num_groups} (B.shape[1])")
    tensors = {"ssm_pool": ssm_pool, "slots": slots, "x": x, "dt": dt, "A": A, "B": B, "C": C, "D": D}
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) != 1:
        raise ValueError(f"all inputs must be on one device, got {devices}")


def mamba_decode_reference(ssm_pool: Tensor, slots: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor,
                           C: Tensor, D: Tensor) -> Tensor:
    """The torch reference (the CPU path and the test oracle): gather the rows, `ssd_step`, scatter them back.

    With slots repeated (the scratch slot), which row's state the slot keeps is unspecified.
    """
    _validate(ssm_pool, slots, x, dt, A, B, C, D)
    slots = slots.long()
    x = x.float()
    y, h = ssd_step(x, dt, A, B, C, ssm_pool.index_select(0, slots))
    ssm_pool.index_copy_(0, slots, h)
    return y + D.float()[:, None] * x


if HAS_TRITON:

    @triton.jit
    def _mamba_decode_kernel(
        pool_ptr, slots_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, y_ptr,
        head_dim, state_size,
        stride_ps, stride_ph, stride_pp, stride_pn,
        stride_xb, stride_xh, stride_xp,
        stride_dtb, stride_dth,
        stride_bb, stride_bg, stride_bn,
        stride_cb, stride_cg, stride_cn,
        stride_yb, stride_yh,
        HEADS_PER_GROUP: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        row = tl.program_id(0)
        head = tl.program_id(1)
        p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
        n = tl.arange(0, BLOCK_N)
        p_ok = p < head_dim
        n_ok = n < state_size
        group = head // HEADS_PER_GROUP

        slot = tl.load(slots_ptr + row).to(tl.int64)
        dt = tl.load(dt_ptr + row * stride_dtb + head * stride_dth)
        a = tl.load(A_ptr + head)
        d = tl.load(D_ptr + head).to(tl.float32)
        x = tl.load(x_ptr + row * stride_xb + head * stride_xh + p * stride_xp, mask=p_ok, other=0.0).to(tl.float32)
        b = tl.load(B_ptr + row * stride_bb + group * stride_bg + n * stride_bn, mask=n_ok, other=0.0).to(tl.float32)
        c = tl.load(C_ptr + row * stride_cb + group * stride_cg + n * stride_cn, mask=n_ok, other=0.0).to(tl.float32)

        tile_ok = p_ok[:, None] & n_ok[None, :]
        tile = (pool_ptr + slot * stride_ps + head.to(tl.int64) * stride_ph
                + p[:, None] * stride_pp + n[None, :] * stride_pn)
        h = tl.load(tile, mask=tile_ok, other=0.0)  # (BLOCK_P, BLOCK_N); masked lanes stay 0 below
        h = h * tl.exp(dt * a) + (x * dt)[:, None] * b[None, :]
        # dt == 0 (an idle row): the update is an identity, so leave the state's bits alone (and the
        # scratch slot, which every padded row shares, unwritten).
        if dt != 0.0:
            tl.store(tile, h, mask=tile_ok)
        y = tl.sum(h * c[None, :], axis=1) + d * x
        tl.store(y_ptr + row * stride_yb + head * stride_yh + p, y, mask=p_ok)


def mamba_decode_triton(ssm_pool: Tensor, slots: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                        D: Tensor, *, block_p: int | None = None, num_warps: int = 4) -> Tensor:
    """The Triton kernel (CUDA, or Triton's interpreter with TRITON_INTERPRET=1); see mamba_decode_update.

    block_p: rows of head_dim per program (a power of two), None = choose_block_p.
    """
    _validate(ssm_pool, slots, x, dt, A, B, C, D)
    if not can_run_triton(x.device):
        raise RuntimeError(f"the Mamba decode kernel needs Triton and a CUDA device (or TRITON_INTERPRET=1); "
                           f"got device {x.device}, Triton {'installed' if HAS_TRITON else 'not installed'}")
    batch_size, num_heads, head_dim = x.shape
    state_size = ssm_pool.shape[3]
    if state_size > _MAX_STATE_SIZE:
        raise ValueError(f"state_size={state_size} too large for the Mamba decode kernel (at most {_MAX_STATE_SIZE})")
    if block_p is None:
        block_p = choose_block_p(batch_size, num_heads, head_dim, state_size, sm_count(x.device))
    elif not isinstance(block_p, int) or block_p < 1 or block_p & (block_p - 1):
        raise ValueError(f"block_p={block_p!r} must be None or a power of two >= 1")
    if not isinstance(num_warps, int) or num_warps < 1:
        raise ValueError(f"num_warps={num_warps!r} must be an int >= 1")
    y = torch.empty(batch_size, num_heads, head_dim, device=x.device, dtype=torch.float32)
    if batch_size == 0:
        return y
    grid = (batch_size, num_heads, cdiv(head_dim, block_p))
    _mamba_decode_kernel[grid](
        ssm_pool, slots, x, dt, A, B, C, D, y,
        head_dim, state_size,
        *ssm_pool.stride(),
        *x.stride(),
        *dt.stride(),
        *B.stride(),
        *C.stride(),
        y.stride(0), y.stride(1),
        HEADS_PER_GROUP=num_heads // B.shape[1],
        BLOCK_P=block_p,
        BLOCK_N=next_power_of_two(state_size),
        num_warps=num_warps,
    )
    return y


def _by_device(ssm_pool, slots, x, dt, A, B, C, D) -> Tensor:
    # By device, not TRITON_INTERPRET: a CPU test process that sets it keeps the fast reference here.
    if x.is_cuda and HAS_TRITON:
        return mamba_decode_triton(ssm_pool, slots, x, dt, A, B, C, D)
    return mamba_decode_reference(ssm_pool, slots, x, dt, A, B, C, D)


# An opaque, mutating operator for torch.compile: the kernel updates the pool in place (no functional
# copy of the pool in the graph) and the launcher's host logic stays out of the trace.
@torch.library.custom_op("fms::mamba_decode_update", mutates_args=("ssm_pool",))
def mamba_decode_op(ssm_pool: Tensor, slots: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                    D: Tensor) -> Tensor:
    """mamba_decode_update as a custom op: the Triton kernel on CUDA, the torch reference elsewhere."""
    return _by_device(ssm_pool, slots, x, dt, A, B, C, D)


@mamba_decode_op.register_fake
def _(ssm_pool, slots, x, dt, A, B, C, D):
    return x.new_empty(x.shape, dtype=torch.float32)


def mamba_decode_update(ssm_pool: Tensor, slots: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                        D: Tensor) -> Tensor:
    """One decode step of the SSM recurrence for each batch row, in place in the pool; -> y [b, nh, P] fp32.

    ssm_pool [S, nh, P, N] fp32; slots [b] int (row i's state is ssm_pool[slots[i]]); x [b, nh, P];
    dt [b, nh] fp32 (after softplus and clamping; 0 for an idle row); A [nh] fp32 (negative); B, C [b, G, N]
    with nh % G == 0; D [nh]. For row i, head h, group g = h // (nh // G), s = slots[i]:

        ssm_pool[s, h] <- exp(dt A) ssm_pool[s, h] + (dt x[i, h]) ⊗ B[i, g]      (P x N)
        y[i, h] = ssm_pool[s, h] · C[i, g] + D[h] x[i, h]

    A row with dt = 0 leaves its state bit for bit. Rows sharing a slot (padded rows on the scratch slot)
    get garbage there, and no other slot is touched. The Triton kernel on CUDA, the torch reference
    elsewhere; under torch.compile the opaque op fms::mamba_decode_update, eagerly the same body called
    directly (the custom op's dispatch costs host time in every layer).
    """
    if torch.compiler.is_compiling():
        return mamba_decode_op(ssm_pool, slots, x, dt, A, B, C, D)
    return _by_device(ssm_pool, slots, x, dt, A, B, C, D)
