"""The Mamba2 SSD prefill scan as one Triton kernel that reads each B/C group once (grouped heads).

Why our own kernel: fla's chunk_simple_gla (the previous fast path) wants one q/k per head, so a
Mamba2 layer's single B/C group is copied to all 48 heads before the call (at batch 8 x 4k tokens,
0.8 GB of extra traffic) and its q·k products are computed per head from those copies. Here each
program loads its group's B and C straight from the conv output (strided, no copy) and keeps the
state on chip across the whole sequence.

One program per (sequence, head, block of head_dim rows); it walks its sequence chunk by chunk:

    chunk c (BLOCK_T steps)          cs = cumsum(dt * A)      (log decay from the chunk start)
      y   = (C·Sᵀ) * exp(cs)                                 the state entering the chunk, decayed
          + ((C·Bᵀ) ∘ L) · (x*dt)    L[i, j] = exp(cs_i - cs_j) for j <= i, else 0
      S   = exp(cs_last) * S + (x*dt * exp(cs_last - cs))ᵀ · B

    S (held as Sᵀ [N, BLOCK_P], fp32) stays in registers; x [b, T, nh, P], B/C [b, T, G, N] and y are read and
    written once. Padded steps have dt = 0 (and are masked past a sequence's end), so they neither
    decay nor feed the state.

A short batch would leave SMs idle with one long chain per (sequence, head), so rows are cut into
segments (padded rows only):

    row:        | segment 0 | segment 1 | segment 2 |
    launch 1:     S0, d0       S1, d1                  each segment's state from zero, and its total decay
    launch 2:     from h0    | from d0·h0 + S0 | from d1·(d0·h0 + S0) + S1   (chained in each prologue)

Checkpoints (emit=, fms.triton.ssd_reference's notation): the state a sequence holds after some of its
tokens is stored when a chunk ends there, in the same pass. Chunks are laid so that they do: a sequence
with states to emit starts its walk `shift` steps early (masked, identity steps), so that every chunk
ends at a requested count of tokens (they must be congruent modulo block_t, as page boundaries are):

    tokens:     0 1 2 3 4 5 6 7 8 9 ...       states after 6 and after 10 tokens, block_t 4 -> shift 2
    chunks:  [. . 0 1][2 3 4 5][6 7 8 9]      chunk ends at 2, 6, 10 tokens: store after the 2nd and 3rd

Same arguments and results as ssm.ssd_scan_reference (notation at the top of the SSD section there);
`cu_seqlens` packs sequences in one row as fla's does.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fms.triton.ssd_reference import check_emit
from fms.triton.support import (
    HAS_TRITON,
    can_run_triton,
    cdiv,
    is_power_of_two,
    next_power_of_two,
    sm_count,
    tl,
    triton,
)

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_DIM = 256  # head_dim and state_size: one program holds a [head_dim rows, state_size] fp32 state
_MIN_BLOCK = 16  # the smallest tl.dot tile side
_MIN_SEGMENT_LEN = 512  # steps: below this a segment's extra state pass costs more than its parallelism gains
_MAX_BLOCK_P = 64  # a [state_size, 64] fp32 state tile is 32 KB of registers at state_size 128
_PROGRAMS_PER_SM = 3


def _block(size: int) -> int:
    return max(_MIN_BLOCK, next_power_of_two(size))


def choose_block_p(num_sequences: int, num_heads: int, head_dim: int, num_sms: int, can_segment: bool) -> int:
    """Rows of head_dim per program: the whole head up to _MAX_BLOCK_P rows (C·Bᵀ, computed per program, is then
    shared by the most rows). Packed sequences (no segments) split the head instead when the (sequence, head)
    programs alone leave SMs idle, down to the smallest dot tile."""
    block_p = min(_block(head_dim), _MAX_BLOCK_P)
    while (not can_segment and block_p > _MIN_BLOCK
           and num_sequences * num_heads * cdiv(head_dim, block_p) < num_sms):
        block_p //= 2
    return block_p


def choose_num_segments(num_programs: int, seq_len: int, num_sms: int) -> int:
    """Segments per row (padded batch only): about _PROGRAMS_PER_SM programs per SM, a power of two, in segments
    of at least _MIN_SEGMENT_LEN steps; at batch 8 of a 48-head mixer the rows alone are enough (H100 sweep,
    final_project section 7)."""
    wanted = max(1, _PROGRAMS_PER_SM * num_sms // num_programs)
    segments = 1 << (wanted.bit_length() - 1)  # round down to a power of two
    return max(1, min(segments, seq_len // _MIN_SEGMENT_LEN))


if HAS_TRITON:

    # The lengths and the batch strides change with every prompt length (a packed serving step has a new total
    # length each time): specializing on them would compile the kernel again in the middle of serving.
    @triton.jit(do_not_specialize=["seq_len", "segment_len", "sx_b", "sdt_b", "sb_b", "sc_b", "sy_b"])
    def _ssd_scan_kernel(
        x_ptr, dt_ptr, a_ptr, b_ptr, c_ptr, y_ptr, h0_ptr, ht_ptr, cu_ptr, local_ptr, local_decay_ptr,
        emit_cu_ptr, emit_len_ptr, emit_shift_ptr, emit_ptr,
        seq_len, segment_len, num_segments,
        sx_b, sx_t, sx_h,
        sdt_b, sdt_t,
        sb_b, sb_t, sb_g,
        sc_b, sc_t, sc_g,
        sy_b, sy_t, sy_h,
        HEADS_PER_GROUP: tl.constexpr,
        P: tl.constexpr,
        N: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_T: tl.constexpr,
        HAS_H0: tl.constexpr,
        STORE_HT: tl.constexpr,
        IS_VARLEN: tl.constexpr,
        STATE_ONLY: tl.constexpr,
        IS_SEGMENTED: tl.constexpr,
        HAS_EMIT: tl.constexpr,
    ):
        # program (seq, segment): segment k of a row covers steps k*segment_len .. (k+1)*segment_len - 1
        pid = tl.program_id(0)
        seq = pid // num_segments
        segment = pid % num_segments
        head = tl.program_id(1)
        p0 = tl.program_id(2) * BLOCK_P
        group = head // HEADS_PER_GROUP
        if IS_VARLEN:  # sequences back to back in row 0 (one segment each)
            start = tl.load(cu_ptr + seq).to(tl.int64)
            end = tl.load(cu_ptr + seq + 1).to(tl.int64)
            row = 0
        else:
            start = segment * segment_len
            end = tl.minimum(start + segment_len, seq_len)
            row = seq.to(tl.int64)

        offs_p = p0 + tl.arange(0, BLOCK_P)
        offs_n = tl.arange(0, BLOCK_N)
        is_p = offs_p < P  # head_dim and state_size are padded up to powers of two; the padding is zeros
        is_n = offs_n < N
        offs_t = tl.arange(0, BLOCK_T)
        causal = offs_t[:, None] >= offs_t[None, :]
        a = tl.load(a_ptr + head)

        # Sᵀ [N, BLOCK_P] for rows p0 .. p0+BLOCK_P of S [P, N] (fp32). Every operand is loaded or kept in
        # the layout its dot wants, so the kernel has no tl.trans.
        # h0 and ht hold one state per sequence; local (the segments' own states) one per (sequence, segment
        # but the last), at row seq * (num_segments - 1) + segment, with its log decay in local_decay.
        state_size = tl.num_programs(1) * P * N
        in_head = head * P * N + offs_n[:, None] + offs_p[None, :] * N
        seq_off = seq.to(tl.int64) * state_size + in_head
        is_np = is_n[:, None] & is_p[None, :]
        if HAS_H0 and not STATE_ONLY:
            state_t = tl.load(h0_ptr + seq_off, mask=is_np, other=0.0)
        else:
            state_t = tl.zeros([BLOCK_N, BLOCK_P], dtype=tl.float32)
        if IS_SEGMENTED and not STATE_ONLY:
            # the state entering this segment: the earlier segments' own states chained onto the initial one
            first_local = seq.to(tl.int64) * (num_segments - 1)
            for k in range(0, segment):
                log_decay = tl.load(local_decay_ptr + (first_local + k) * tl.num_programs(1) + head)
                own = tl.load(local_ptr + (first_local + k) * state_size + in_head, mask=is_np, other=0.0)
                state_t = state_t * tl.exp(log_decay) + own
        log_decay_sum = 0.0

        x_base = x_ptr + row * sx_b + head * sx_h
        dt_base = dt_ptr + row * sdt_b + head
        b_base = b_ptr + row * sb_b + group * sb_g
        c_base = c_ptr + row * sc_b + group * sc_g
        y_base = y_ptr + row * sy_b + head * sy_h

        first = start
        if HAS_EMIT:  # emitted states k_emit .. k_end-1 belong to this sequence, sorted by token count
            k_emit = tl.load(emit_cu_ptr + seq)
            k_end = tl.load(emit_cu_ptr + seq + 1)
            next_len = tl.load(emit_len_ptr + k_emit, mask=k_emit < k_end, other=-1)
            first = start - tl.load(emit_shift_ptr + seq)
        for t0 in range(first, end, BLOCK_T):
            t = t0 + offs_t
            is_in = (t >= start) & (t < end)
            dt = tl.load(dt_base + t * sdt_t, mask=is_in, other=0.0)
            cs = tl.cumsum(dt * a, axis=0)  # log decay from the chunk start, [BLOCK_T]
            cs_last = tl.sum(dt * a, axis=0)  # steps past the end add 0
            x = tl.load(x_base + t[:, None] * sx_t + offs_p[None, :], mask=is_in[:, None] & is_p[None, :], other=0.0)
            b_t = tl.load(b_base + t[None, :] * sb_t + offs_n[:, None], mask=is_n[:, None] & is_in[None, :], other=0.0)
            xdt = x.to(tl.float32) * dt[:, None]  # [BLOCK_T, BLOCK_P]

            if not STATE_ONLY:
                cm = tl.load(c_base + t[:, None] * sc_t + offs_n[None, :], mask=is_in[:, None] & is_n[None, :],
                             other=0.0)
                # the entering state, decayed to each step (fp32 operands: the state is not rounded)
                y = tl.dot(cm.to(tl.float32), state_t) * tl.exp(cs)[:, None]
                # inside the chunk: a causal, decayed (C·Bᵀ) applied to x*dt
                scores = tl.dot(cm, b_t)  # [BLOCK_T, BLOCK_T] fp32
                decay = tl.exp(tl.where(causal, cs[:, None] - cs[None, :], float("-inf")))
                # fp32 (TF32) operands: on an H100 bf16 ones were no faster and doubled the error
                y += tl.dot(scores * decay, xdt)
                tl.store(y_base + t[:, None] * sy_t + offs_p[None, :], y, mask=is_in[:, None] & is_p[None, :])

            to_end = xdt * tl.exp(cs_last - cs)[:, None]  # each step's input as it survives to the chunk end
            state_t = state_t * tl.exp(cs_last) + tl.dot(b_t.to(tl.float32), to_end)
            log_decay_sum += cs_last
            if HAS_EMIT:
                if tl.minimum(t0 + BLOCK_T, end) - start == next_len:
                    tl.store(emit_ptr + k_emit.to(tl.int64) * state_size + in_head, state_t, mask=is_np)
                    k_emit += 1
                    next_len = tl.load(emit_len_ptr + k_emit, mask=k_emit < k_end, other=-1)

        if STATE_ONLY:  # launched over segments 0 .. num_segments-1 of each row, num_segments = the caller's k - 1
            tl.store(local_ptr + pid.to(tl.int64) * state_size + in_head, state_t, mask=is_np)
            if tl.program_id(2) == 0:
                tl.store(local_decay_ptr + pid.to(tl.int64) * tl.num_programs(1) + head, log_decay_sum)
        elif STORE_HT:
            if segment == num_segments - 1:
                tl.store(ht_ptr + seq_off, state_t, mask=is_np)


def _validate(x, dt, A, B, C, initial_state, cu_seqlens) -> None:
    if x.dim() != 4:
        raise ValueError(f"x must be [batch, seq_len, num_heads, head_dim], got shape {tuple(x.shape)}")
    b, T, nh, P = x.shape
    if B.dim() != 4 or B.shape[:2] != (b, T) or C.shape != B.shape:
        raise ValueError(f"B and C must be [{b}, {T}, num_groups, state_size], got {tuple(B.shape)} and {tuple(C.shape)}")
    G, N = B.shape[2], B.shape[3]
    if G < 1 or nh % G != 0:
        raise ValueError(f"num_heads={nh} must be a multiple of num_groups={G}")
    if dt.shape != (b, T, nh) or dt.dtype != torch.float32:
        raise ValueError(f"dt must be float32 [{b}, {T}, {nh}], got {dt.dtype} {tuple(dt.shape)}")
    if A.shape != (nh,):
        raise ValueError(f"A must be [{nh}], got {tuple(A.shape)}")
    for name, size in (("head_dim", P), ("state_size", N)):
        if not 1 <= size <= _MAX_DIM:
            raise ValueError(f"{name}={size} not supported by the Triton SSD scan; allowed: 1 to {_MAX_DIM}")
    if x.dtype not in _SUPPORTED_DTYPES or B.dtype != x.dtype or C.dtype != x.dtype:
        raise ValueError(f"x, B, C must share one dtype of {_SUPPORTED_DTYPES}; got {x.dtype}, {B.dtype}, {C.dtype}")
    for name, t in (("x", x), ("B", B), ("C", C)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension, got strides {t.stride()}")
    if cu_seqlens is not None:
        if b != 1:
            raise ValueError(f"packed sequences (cu_seqlens) come as one row, x [1, N, ...]; got batch {b}")
        if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2 or cu_seqlens.is_floating_point():
            raise ValueError(f"cu_seqlens must be an integer tensor [num_sequences + 1], got {cu_seqlens.dtype} "
                             f"{tuple(cu_seqlens.shape)}")
    num_seq = b if cu_seqlens is None else cu_seqlens.shape[0] - 1
    if initial_state is not None and tuple(initial_state.shape) != (num_seq, nh, P, N):
        raise ValueError(f"initial_state must be [{num_seq}, {nh}, {P}, {N}], got {tuple(initial_state.shape)}")


def ssd_scan_triton(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    initial_state: Tensor | None = None,
    output_final_state: bool = True,
    cu_seqlens: Tensor | None = None,
    emit: tuple[Tensor, Tensor] | None = None,
    *,
    block_t: int = 32,
    block_p: int | None = None,
    num_segments: int | None = None,
    num_warps: int = 4,
):
    """SSD scan by _ssd_scan_kernel: returns (y [b, T, nh, P] fp32, final state [num_sequences, nh, P, N] fp32),
    and the emitted states [K, nh, P, N] fp32 when emit is given (see the module docstring; one segment then).

    `chunk_size` (the model's) only matters for the reference; the kernel walks `block_t` steps at a time.
    block_p: head_dim rows per program (None: choose_block_p). num_segments (padded rows only; None:
    choose_num_segments): with k > 1, a first launch computes the state each segment but the last leaves from
    zero (and its total decay); the second scans every segment from its entering state, which each program
    chains from the earlier segments' states itself. Every dot takes fp32 operands (TF32 on a GPU).
    """
    _validate(x, dt, A, B, C, initial_state, cu_seqlens)
    if not can_run_triton(x.device):
        raise RuntimeError(f"the Triton SSD scan runs on CUDA (or under TRITON_INTERPRET=1), got a tensor on {x.device}")
    b, T, nh, P = x.shape
    G, N = B.shape[2], B.shape[3]
    num_seq = b if cu_seqlens is None else cu_seqlens.shape[0] - 1
    num_sms = sm_count(x.device)
    if block_p is None:
        block_p = choose_block_p(num_seq, nh, P, num_sms, can_segment=cu_seqlens is None)
    if not (is_power_of_two(block_p) and _MIN_BLOCK <= block_p <= _block(P)):
        raise ValueError(f"block_p={block_p} must be a power of two in [{_MIN_BLOCK}, {_block(P)}]")
    if not (is_power_of_two(block_t) and _MIN_BLOCK <= block_t <= 256):
        raise ValueError(f"block_t={block_t} must be a power of two in [{_MIN_BLOCK}, 256]")
    p_blocks = cdiv(P, block_p)
    emit_args, order = (None, None, None, None), None
    if emit is not None:
        *emit_args, order, block_t = _emit_plan(emit, num_seq, T, cu_seqlens, block_t, nh, P, N, x.device)
        num_segments = 1  # each program walks its whole sequence: every emitted state is in its registers once
    if num_segments is None:
        num_segments = 1 if cu_seqlens is not None else choose_num_segments(num_seq * nh * p_blocks, T, num_sms)
    if num_segments < 1 or (num_segments > 1 and cu_seqlens is not None):
        raise ValueError(f"num_segments={num_segments} must be >= 1, and 1 with packed sequences (cu_seqlens)")
    # whole chunks per segment; fewer segments when T is short
    segment_len = cdiv(cdiv(T, num_segments), block_t) * block_t
    num_segments = cdiv(T, segment_len)

    dt = dt.contiguous()
    A = A.float().contiguous()
    y = torch.empty(b, T, nh, P, dtype=torch.float32, device=x.device)
    h0 = None if initial_state is None else initial_state.float().contiguous()
    ht = torch.empty(num_seq, nh, P, N, dtype=torch.float32, device=x.device) if output_final_state else None
    cu = None if cu_seqlens is None else cu_seqlens.to(device=x.device, dtype=torch.int32)

    local = local_decay = None
    if num_segments > 1:  # the state each segment but the last leaves behind from zero, and its log decay
        local = torch.empty(b, num_segments - 1, nh, P, N, dtype=torch.float32, device=x.device)
        local_decay = torch.empty(b, num_segments - 1, nh, dtype=torch.float32, device=x.device)

    def launch(segments, rows, state_only):
        _ssd_scan_kernel[(rows, nh, p_blocks)](
            x, dt, A, B, C, y, h0, ht, cu, local, local_decay, *emit_args,
            T, segment_len, segments,
            x.stride(0), x.stride(1), x.stride(2),
            dt.stride(0), dt.stride(1),
            B.stride(0), B.stride(1), B.stride(2),
            C.stride(0), C.stride(1), C.stride(2),
            y.stride(0), y.stride(1), y.stride(2),
            HEADS_PER_GROUP=nh // G, P=P, N=N, BLOCK_P=block_p, BLOCK_N=_block(N), BLOCK_T=block_t,
            HAS_H0=h0 is not None, STORE_HT=ht is not None, IS_VARLEN=cu is not None,
            STATE_ONLY=state_only, IS_SEGMENTED=num_segments > 1, HAS_EMIT=emit is not None, num_warps=num_warps,
        )

    if num_segments > 1:
        launch(num_segments - 1, b * (num_segments - 1), True)
    launch(num_segments, num_seq * num_segments, False)
    if emit is None:
        return y, ht
    sorted_states = emit_args[3]  # row k: the k-th state in the kernel's (sequence, token count) order
    return y, ht, torch.empty_like(sorted_states).index_copy_(0, order, sorted_states)


def _emit_plan(emit, num_seq, T, cu_seqlens, block_t, nh, P, N, device):
    """The kernel's emission arguments: per sequence its states sorted by token count (CSR: emit_cu,
    emit_len), the walk's shift, and the output [K, nh, P, N], rows in the caller's order; -> (args, block_t).

    Every count of one sequence must be congruent modulo block_t, or be the sequence's length (its last
    chunk ends there); block_t is halved (down to 16) until they are."""
    seq, num_tokens = (t.detach().to("cpu", torch.int64) for t in emit)  # host tensors in serving: no sync

    def lengths_of_sequences():
        if cu_seqlens is None:
            return torch.full((num_seq,), T, dtype=torch.int64)
        bounds = cu_seqlens.detach().to("cpu", torch.int64)  # a device sync when cu_seqlens is on the GPU
        return bounds[1:] - bounds[:-1]

    # Page boundaries are all congruent, the end of a chunk included: the lengths (a sync for packed GPU
    # steps) are only read to validate on the host, or when some count is not congruent with the others.
    lengths = lengths_of_sequences() if cu_seqlens is None or cu_seqlens.device.type == "cpu" else None
    if lengths is not None:
        check_emit((seq, num_tokens), num_seq, lengths)
    order = torch.argsort(seq * (T + 1) + num_tokens)  # by sequence, then token count
    seq_sorted, len_sorted = seq[order], num_tokens[order]
    if (seq_sorted[1:] == seq_sorted[:-1]).logical_and(len_sorted[1:] == len_sorted[:-1]).any():
        raise ValueError(f"emit asks twice for one state: sequences {seq.tolist()} after {num_tokens.tolist()} tokens")
    while True:
        # states that must fall on a chunk end: all but those at their sequence's end (its last chunk ends there)
        inner = torch.ones_like(seq_sorted, dtype=torch.bool) if lengths is None else len_sorted != lengths[seq_sorted]
        # each sequence's shift from one of its inner counts (any: they must agree): (count + shift) % block_t == 0
        shift = torch.zeros(num_seq, dtype=torch.int64)
        shift[seq_sorted[inner]] = (-len_sorted[inner]) % block_t
        if bool(((len_sorted + shift[seq_sorted]) % block_t != 0)[inner].any()):
            if block_t > _MIN_BLOCK:
                block_t //= 2
                continue
            if lengths is None:
                lengths = lengths_of_sequences()
                check_emit((seq, num_tokens), num_seq, lengths)
                continue
            raise ValueError(f"emit's token counts {num_tokens.tolist()} of one sequence must differ by multiples "
                             f"of {_MIN_BLOCK} (page boundaries of a page size >= {_MIN_BLOCK}), or be its length")
        break
    emit_cu = torch.zeros(num_seq + 1, dtype=torch.int64)
    emit_cu[1:] = torch.bincount(seq_sorted, minlength=num_seq).cumsum(0)
    states = torch.empty(seq.shape[0], nh, P, N, dtype=torch.float32, device=device)
    to = lambda t: t.to(device=device, dtype=torch.int32)  # noqa: E731
    return to(emit_cu), to(len_sorted), to(shift), states, order.to(device), block_t

