"""Decode projections at a few to a few hundred rows (the engine's batch buckets above MAX_ROWS) as a split-K Triton
matrix product, optionally taking the SwiGLU product of its input on the way.

At 8-256 rows a decode step's projection still reads its whole weight once for little arithmetic, so its speed is
the weight's read rate. cuBLAS's choices for the small weights of a 1B model leave most of the GPU idle: a
2048-wide output in 128-wide tiles is 16 programs on a 132-SM H100 (session 20's profile: o at 37% of the copy
bandwidth, qkv 46%, down 54% with its own split-K reduce). Here each program owns BLOCK_N output columns of every
row (BLOCK_M = the rows, padded to a power of two >= 16 for tl.dot) and one of SPLIT_K slices of K, so a small
output still spreads over the GPU; SPLIT_K > 1 writes fp32 partial sums that a second kernel adds in a fixed order
(the same result every run) and rounds once.

Which projections take it is a per-GPU table's choice (fms.triton.gemv: `fms bench gemv --rows R --write_table`),
measured against cuBLAS: a shape the table does not list stays on cuBLAS.
"""

import torch

from fms.triton.support import cdiv, check_rows_input, is_power_of_two, next_power_of_two, positive_ints, tl, triton

# The most rows the kernel takes: its (BLOCK_M, BLOCK_N) fp32 accumulator lives in registers.
MAX_DOT_ROWS = 256
MIN_BLOCK_M = 16  # tl.dot's smallest tile side
HALF_DTYPES = (torch.bfloat16, torch.float16)  # fp32 would run as tf32 in tl.dot: it stays on cuBLAS

if triton is not None:

    @triton.jit
    def _splitk_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, part_ptr, M, N, K, stride_x, stride_w, stride_out,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                       SILU_MUL: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        rm = tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        row_ok = rm < M
        k_len = K // SPLIT_K  # the launcher checks K % (SPLIT_K * BLOCK_K) == 0
        k0 = pid_s * k_len
        x_ptrs = x_ptr + rm[:, None].to(tl.int64) * stride_x + (k0 + rk)[None, :]
        w_ptrs = w_ptr + rn[:, None].to(tl.int64) * stride_w + (k0 + rk)[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for _ in range(0, k_len, BLOCK_K):
            x = tl.load(x_ptrs, mask=row_ok[:, None], other=0.0)
            if SILU_MUL:  # x = [gate | up]: silu(gate) * up in fp32, rounded once, as gemv_reference
                gate = x.to(tl.float32)
                up = tl.load(x_ptrs + K, mask=row_ok[:, None], other=0.0).to(tl.float32)
                x = (gate * tl.sigmoid(gate) * up).to(w_ptr.dtype.element_ty)
            w = tl.load(w_ptrs, mask=(rn < N)[:, None], other=0.0, eviction_policy="evict_first")
            if DOT_F32:  # the CPU's interpreter multiplies bf16 tiles wrongly; 16-bit products are exact in fp32
                acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
            else:
                acc = tl.dot(x, tl.trans(w), acc)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        ok = row_ok[:, None] & (rn < N)[None, :]
        if SPLIT_K == 1:
            if HAS_BIAS:
                acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptr + rm[:, None] * stride_out + rn[None, :], acc.to(out_ptr.dtype.element_ty), mask=ok)
        else:
            tl.store(part_ptr + (pid_s * M + rm[:, None]) * N + rn[None, :], acc, mask=ok)

    @triton.jit
    def _splitk_reduce_kernel(part_ptr, bias_ptr, out_ptr, M, N, stride_out, SPLIT_K: tl.constexpr,
                              HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = i < M * N
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in range(SPLIT_K):  # a fixed order: the same sum on every run
            acc += tl.load(part_ptr + s * M * N + i, mask=ok, other=0.0)
        col = i % N
        if HAS_BIAS:
            acc += tl.load(bias_ptr + col, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + (i // N) * stride_out + col, acc.to(out_ptr.dtype.element_ty), mask=ok)


def check_config(config, k: int, where: str = "split-K config") -> tuple:
    """(BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages) of ints >= 1 (BLOCK_N, BLOCK_K powers of two >= 16) whose
    SPLIT_K * BLOCK_K divides k (when k is given); ValueError naming the value otherwise."""
    if not (isinstance(config, (list, tuple)) and len(config) == 5 and positive_ints(config)):
        raise ValueError(f"{where}: must be [BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages] of ints >= 1, "
                         f"got {config!r}")
    block_n, block_k, split_k = config[:3]
    if any(b < MIN_BLOCK_M or not is_power_of_two(b) for b in (block_n, block_k)):
        raise ValueError(f"{where}: BLOCK_N and BLOCK_K must be powers of two >= 16 (tl.dot tiles), got {config!r}")
    if k and k % (split_k * block_k):
        raise ValueError(f"{where}: K={k} is not a multiple of SPLIT_K * BLOCK_K = {split_k * block_k} "
                         f"(config {config!r})")
    return tuple(config)


def splitk_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu_mul: bool,
                  config, out_shape: tuple | None = None) -> torch.Tensor:
    """x (M, K), or (M, 2K) = [gate | up] with silu_mul, for M from 1 to MAX_DOT_ROWS -> (M, N) = x @ weight.T
    (+ bias), with config = (BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages); or a new tensor of out_shape holding
    the M * N values (not a view: see fms.triton.gemv._rows_linear)."""
    n, k = weight.shape
    check_rows_input("splitk_linear", x, weight, silu_mul, MAX_DOT_ROWS)
    if weight.dtype not in HALF_DTYPES or x.dtype != weight.dtype:
        raise ValueError(f"splitk_linear multiplies bf16 or fp16 (tl.dot would round fp32 to tf32), got x "
                         f"{x.dtype} and weight {weight.dtype}")
    block_n, block_k, split_k, warps, stages = check_config(config, k)
    m = x.shape[0]
    x = x if x.stride(1) == 1 else x.contiguous()
    result = torch.empty(out_shape or (m, n), device=x.device, dtype=weight.dtype)
    out = result.view(m, n)
    part = torch.empty(split_k, m, n, device=x.device, dtype=torch.float32) if split_k > 1 else out
    bias_arg = bias if bias is not None else weight
    block_m = max(MIN_BLOCK_M, next_power_of_two(m))
    _splitk_kernel[(cdiv(n, block_n), split_k)](
        x, weight, bias_arg, out, part, m, n, k, x.stride(0), weight.stride(0), out.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k, SILU_MUL=silu_mul,
        HAS_BIAS=bias is not None, DOT_F32=not x.is_cuda, num_warps=warps, num_stages=stages)
    if split_k > 1:
        block = 1024
        _splitk_reduce_kernel[(cdiv(m * n, block),)](part, bias_arg, out, m, n, out.stride(0), SPLIT_K=split_k,
                                                     HAS_BIAS=bias is not None, BLOCK=block)
    return result


def candidate_configs(rows: int, n: int, k: int, sms: int) -> list[tuple]:
    """The configs `fms bench gemv` sweeps for rows of an (n, k) weight on a GPU of sms SMs: BLOCK_K * SPLIT_K
    dividing k, three stages of both tiles within ~200 KB of shared memory, and between sms / 2 and 16 * sms
    programs (fewer leave SMs idle, more only re-read the input)."""
    block_m = max(MIN_BLOCK_M, next_power_of_two(rows))
    out = []
    for block_n in (32, 64, 128):
        for block_k in (64, 128, 256):
            for split_k in (1, 2, 4, 8, 16):
                if k % (split_k * block_k) or 3 * (block_m + block_n) * block_k * 2 > 200_000:
                    continue
                if sms // 2 <= -(-n // block_n) * split_k <= 16 * sms:
                    out.append((block_n, block_k, split_k, 4, 3))
    return out
