"""Single-row projections (batch-1 decode) as a Triton GEMV kernel, optionally fused with SwiGLU.

At one token per step every projection is a matrix-vector product that reads its whole weight
once. On the H100, cuBLAS picks split-K kernels for the small matrices of a 1B model: they add a
reduction launch and stay well under the copy bandwidth (`scripts/bench_gemv.py`). This kernel
gives each program a few full output rows (no split-K) and can compute the SwiGLU product
silu(gate) * up of its input chunk on the fly, which removes the MLP's activation kernel.

`fms.modules.linear.Linear` is an `nn.Linear` (same parameters, same checkpoint names) that takes this kernel for a
single CUDA row and `F.linear` otherwise; `swiglu_down` does the same for the SwiGLU down
projection. The torch expression each replaces is the reference (`gemv_reference`). Whether a layer
uses the kernel at all is its own setting (`KernelConfig.gemv`, fms.modules.kernel_config); this
module only says whether a row can go through it (`fits`).
"""

import torch
import torch.nn.functional as F

from fms.triton.support import tl, triton


if triton is not None:
    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, N, K, stride_w,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SILU_MUL: tl.constexpr,
                     HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        cols = tl.arange(0, BLOCK_K)
        w_ptrs = w_ptr + rows[:, None].to(tl.int64) * stride_w + cols[None, :]
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            col_ok = (k0 + cols) < K
            if SILU_MUL:  # x holds [gate | up], each K long
                gate = tl.load(x_ptr + k0 + cols, mask=col_ok, other=0.0).to(tl.float32)
                up = tl.load(x_ptr + K + k0 + cols, mask=col_ok, other=0.0).to(tl.float32)
                # one rounding to the activation dtype, as the fused elementwise kernel it replaces
                xv = (gate * tl.sigmoid(gate) * up).to(x_ptr.dtype.element_ty).to(tl.float32)
            else:
                xv = tl.load(x_ptr + k0 + cols, mask=col_ok, other=0.0).to(tl.float32)
            if EVEN_K:
                w = tl.load(w_ptrs, mask=row_ok[:, None], other=0.0, eviction_policy="evict_first")
            else:
                w = tl.load(w_ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0,
                            eviction_policy="evict_first")
            acc += w.to(tl.float32) * xv[None, :]
            w_ptrs += BLOCK_K
        y = tl.sum(acc, axis=1)
        if HAS_BIAS:
            y += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=row_ok)


# (BLOCK_N, BLOCK_K, num_warps, num_stages): the best total over the sweep of scripts/bench_gemv.py
# on the H100 for every Llama-3.2-1B projection, the LM head and the fused SwiGLU down projection
# (final_project/results/session5/bench_gemv.json); BLOCK_K shrinks to fit a smaller K
BLOCKS = (2, 1024, 4, 2)


def gemv_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   silu_mul: bool = False) -> torch.Tensor:
    """What the kernel computes, in torch: F.linear(x, weight, bias), with x = silu(gate) * up
    for x = [gate | up] when silu_mul."""
    if silu_mul:
        gate, up = x.split(x.shape[-1] // 2, dim=-1)
        x = F.silu(gate.float()).mul(up.float()).to(x.dtype)
    return F.linear(x, weight, bias)


def fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether x is one CUDA row that the kernel can multiply by weight (N, K), for inference (the
    kernel has no backward; with gradients on, F.linear runs)."""
    return (triton is not None and x.is_cuda and x.numel() == x.shape[-1] and x.dtype == weight.dtype
            and weight.dim() == 2 and weight.stride(1) == 1
            and not (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad)))


def _launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu_mul: bool,
            blocks=None) -> torch.Tensor:
    n, k = weight.shape
    width = 2 * k if silu_mul else k
    if x.numel() != width:
        raise ValueError(f"gemv needs one row of {width} values for a weight of shape {tuple(weight.shape)}"
                         f"{' (silu_mul: [gate | up])' if silu_mul else ''}, got x of shape {tuple(x.shape)}")
    block_n, block_k, warps, stages = blocks or BLOCKS
    block_k = min(block_k, triton.next_power_of_2(k))
    x = x.contiguous()
    out = torch.empty(1, n, device=x.device, dtype=weight.dtype)
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, weight, bias if bias is not None else weight, out, n, k, weight.stride(0), BLOCK_N=block_n,
        BLOCK_K=block_k, SILU_MUL=silu_mul, HAS_BIAS=bias is not None, EVEN_K=k % block_k == 0,
        num_warps=warps, num_stages=stages)
    return out


@torch.library.custom_op("fms::gemv", mutates_args=())
def _gemv_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu_mul: bool) -> torch.Tensor:
    return _launch(x, weight, bias, silu_mul)


@_gemv_op.register_fake
def _(x, weight, bias, silu_mul):
    return weight.new_empty(1, weight.shape[0])


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, silu_mul: bool = False,
         blocks=None) -> torch.Tensor:
    """One row x @ weight.T (+ bias) -> (1, N) with the Triton kernel; x = [gate | up] with silu_mul.

    blocks: (BLOCK_N, BLOCK_K, num_warps, num_stages), for benchmarks; the tuned default otherwise.
    Under torch.compile it is the opaque op fms::gemv; eagerly it launches the kernel directly.
    """
    if torch.compiler.is_compiling():
        return _gemv_op(x, weight, bias, silu_mul)
    return _launch(x, weight, bias, silu_mul, blocks)
