"""Torch references of the SSD (Mamba2) scan and of one recurrent step: what the Triton kernels in
fms.triton.ssd_scan and fms.triton.mamba_decode are tested against, and the CPU path."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

# ---------------------------------------------------------------------------------------------------------------
# SSD scan. Notation for every implementation below:
#   x [b, T, nh, P]  dt [b, T, nh] (fp32, after softplus/clamp, 0 at padding)  A [nh] (fp32, negative)
#   B, C [b, T, G, N]  state [b, nh, P, N] (fp32)     head h reads group h // (nh // G)
#   S_t = exp(dt_t*A) * S_{t-1} + dt_t * x_t ⊗ B_t ;   y_t = S_t · C_t      (the D skip is added by the caller)
# A scan returns (y [b, T, nh, P] fp32, final state [b, nh, P, N] fp32 or None when not asked for).
# emit=(seq [K], num_tokens [K]) also asks for the states on the way (prefix-cache checkpoints): state k is
# sequence seq[k]'s state after its first num_tokens[k] tokens (1 <= num_tokens[k] <= its length), computed
# in the same pass; the scan then returns (y, final state, states [K, nh, P, N] fp32).
# ---------------------------------------------------------------------------------------------------------------

SsdScan = Callable[..., tuple[Tensor, Tensor | None]]


def _segment_sum(a: Tensor) -> Tensor:
    """seg[..., i, j] = a[j+1] + ... + a[i] for i >= j, -inf above the diagonal.

    Summing the masked terms directly (rather than cumsum[i] - cumsum[j]) avoids cancellation when the
    cumulative log-decay is large and the difference small.
    """
    Q = a.shape[-1]
    ones = torch.ones(Q, Q, dtype=torch.bool, device=a.device)
    terms = a[..., :, None].expand(*a.shape, Q).masked_fill(~ones.tril(-1), 0.0)  # [..., i, j] = a[i] if i > j
    return terms.cumsum(-2).masked_fill(~ones.tril(), -math.inf)


def ssd_scan_reference(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    initial_state: Tensor | None = None,
    output_final_state: bool = True,
    emit: tuple[Tensor, Tensor] | None = None,
):
    """Chunked SSD scan in pure PyTorch, fp32. Ground truth and the CPU path.

    Within a chunk the recurrence is unrolled into a masked (C·B) * decay matrix; across chunks the state is
    carried by a short loop (one step per chunk), which also yields the final state. An emitted state inside
    a chunk is that chunk's entering state and inputs decayed to its step, from the same matrices.
    """
    b, T, nh, P = x.shape
    G, N = B.shape[2], B.shape[3]
    R = nh // G
    Q = chunk_size
    num_chunks = -(-T // Q)
    pad = num_chunks * Q - T

    # Zero-padded tail steps have dt = 0: no decay, no input, so they leave the final state as it is.
    xdt = F.pad(x.float() * dt[..., None], (0, 0, 0, 0, 0, pad))
    log_decay = F.pad(dt * A, (0, 0, 0, pad))
    B = F.pad(B.float(), (0, 0, 0, 0, 0, pad))
    C = F.pad(C.float(), (0, 0, 0, 0, 0, pad))

    xdt = xdt.view(b, num_chunks, Q, G, R, P)  # (b, c, l, g, r, p); head = g*R + r
    B = B.view(b, num_chunks, Q, G, N)  # (b, c, l, g, n)
    C = C.view(b, num_chunks, Q, G, N)
    log_decay = log_decay.view(b, num_chunks, Q, nh).permute(0, 1, 3, 2)  # (b, c, h, l)

    # decay[..., i, j] = prod_{k=j+1..i} exp(dt_k*A): how much of step j's input survives to step i.
    decay = torch.exp(_segment_sum(log_decay)).view(b, num_chunks, G, R, Q, Q)  # (b, c, g, r, i, j)

    # 1. Contributions from inside the chunk (a causal, decayed "attention" with q=C, k=B, v=x*dt).
    scores = torch.einsum("bcign,bcjgn->bcgij", C, B)  # (b, c, g, i, j)
    y = torch.einsum("bcgrij,bcjgrp->bcigrp", scores[:, :, :, None] * decay, xdt)  # (b, c, l, g, r, p)

    # 2. Each chunk's own contribution to the state at its last step.
    decay_to_end = decay[..., Q - 1, :]  # (b, c, g, r, j)
    chunk_input = torch.einsum("bcgrj,bcjgn,bcjgrp->bcgrpn", decay_to_end, B, xdt).reshape(b, num_chunks, nh, P, N)
    chunk_decay = torch.exp(log_decay.sum(-1))  # (b, c, h): decay across a whole chunk

    # 3. Carry the state across chunks; remember the state entering each chunk.
    state = x.new_zeros(b, nh, P, N, dtype=torch.float32) if initial_state is None else initial_state.float()
    entering = []
    for c in range(num_chunks):
        entering.append(state)
        state = chunk_decay[:, c, :, None, None] * state + chunk_input[:, c]
    entering_states = torch.stack(entering, dim=1).view(b, num_chunks, G, R, P, N)

    # 4. Contribution of the entering state to each step, decayed from the chunk start to that step.
    decay_from_start = torch.exp(log_decay.cumsum(-1)).view(b, num_chunks, G, R, Q).permute(0, 1, 4, 2, 3)
    y = y + torch.einsum("bcign,bcgrpn->bcigrp", C, entering_states) * decay_from_start[..., None]

    y = y.reshape(b, num_chunks * Q, nh, P)[:, :T]  # (b, T, nh, p)
    final = state if output_final_state else None
    if emit is None:
        return y, final
    seq, last = emit[0].long(), check_emit(emit, b, T) - 1  # last: index of the last step each state includes
    c, e = last // Q, last % Q
    # inputs of the chunk up to step e, each decayed to e (decay[..., e, j] is 0 for j > e)
    decay_to_e = decay[seq, c, :, :, e]  # (K, g, r, j)
    own = torch.einsum("kgrj,kjgn,kjgrp->kgrpn", decay_to_e, B[seq, c], xdt[seq, c])
    entering_to_e = entering_states[seq, c] * decay_from_start[seq, c, e][..., None, None]  # (K, g, r, p, n)
    return y, final, (own + entering_to_e).reshape(-1, nh, P, N)


def check_emit(emit: tuple[Tensor, Tensor], num_seqs: int, lengths) -> Tensor:
    """Validate emit=(seq, num_tokens) (host tensors, or any device off the hot path); -> num_tokens (int64).

    lengths: every sequence's length (an int), or a [num_seqs] tensor of them."""
    seq, num_tokens = emit
    if seq.dim() != 1 or seq.shape != num_tokens.shape or seq.is_floating_point() or num_tokens.is_floating_point():
        raise ValueError(f"emit must be two integer tensors [K] (sequence, tokens), got {tuple(seq.shape)} "
                         f"{seq.dtype} and {tuple(num_tokens.shape)} {num_tokens.dtype}")
    num_tokens = num_tokens.long()
    if seq.numel() and seq.device.type == "cpu" and not torch.compiler.is_compiling():
        length = torch.as_tensor(lengths, device=seq.device).long().expand(num_seqs)
        bad = (seq < 0) | (seq >= num_seqs)
        if not bad.any():
            bad = (num_tokens < 1) | (num_tokens > length[seq.long()])
        if bad.any():
            raise ValueError(f"emit asks for sequence {seq.tolist()} after {num_tokens.tolist()} tokens; allowed: "
                             f"sequences 0..{num_seqs - 1}, after 1 to the sequence's length tokens")
    return num_tokens


def ssd_scan_recurrent(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    initial_state: Tensor | None = None,
    output_final_state: bool = True,
    emit: tuple[Tensor, Tensor] | None = None,
):
    """Token-by-token scan: ssd_step over the sequence, one step per token. The naive baseline for benchmarks.

    Same arguments and results as ssd_scan_reference; `chunk_size` is unused.
    """
    b, T, nh, P = x.shape
    if initial_state is None:
        state = x.new_zeros(b, nh, P, B.shape[-1], dtype=torch.float32)
    else:
        state = initial_state.float()
    ys = []
    num_tokens = None if emit is None else check_emit(emit, b, T)
    emitted = None if emit is None else x.new_zeros(num_tokens.shape[0], nh, P, B.shape[-1], dtype=torch.float32)
    for t in range(T):
        y, state = ssd_step(x[:, t], dt[:, t], A, B[:, t], C[:, t], state)
        ys.append(y)
        if emit is not None:
            k = (num_tokens == t + 1).nonzero()[:, 0]
            emitted[k] = state[emit[0][k].long()]
    out = torch.stack(ys, dim=1), (state if output_final_state else None)
    return out if emit is None else (*out, emitted)


def ssd_step(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    """One recurrent step (decode). x [b, nh, P], dt [b, nh], B/C [b, G, N], state [b, nh, P, N] fp32.

    Returns (y [b, nh, P] fp32 without the D skip, new state fp32); `state` itself is not modified.
    Heads are viewed as (group, head in group) so that B and C are shared without copies:

        h' = exp(dt A) h + dt x ⊗ B        y = h' · C
    """
    b, nh, P = x.shape
    G, N = B.shape[1], B.shape[2]
    R = nh // G  # head g*R + r reads group g of B and C
    decay = torch.exp(dt * A).view(b, G, R, 1, 1)
    xdt = (x.float() * dt[..., None]).view(b, G, R, P, 1)
    B, C = B.float()[:, :, None, None, :], C.float()  # (b, G, 1, 1, N), (b, G, N)
    h = (state.float().view(b, G, R, P, N) * decay).addcmul_(xdt, B)  # a new tensor: state is untouched
    if torch.compiler.is_compiling():
        # a reduction the compiler fuses into the kernel that computes h (h is read once)
        y = (h * C[:, :, None, None, :]).sum(-1)
    else:
        y = torch.einsum("bgrpn,bgn->bgrp", h, C)  # one batched GEMV, no (b, G, R, P, N) product
    return y.reshape(b, nh, P), h.view(b, nh, P, N)
