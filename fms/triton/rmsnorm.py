"""RMSNorm over the last dim: the formula (the reference every fused path is checked against) and a one-launch
Triton kernel over rows, which the GEMV op runs for more rows than its kernel takes when it was asked to fuse the
norm (fms.triton.gemv).

Written here rather than taken from torch: F.rms_norm multiplies by the weight before it rounds to the activation
dtype, while the models (and the HF checkpoints they match) round the normalised row first, then multiply.
"""

import torch

from fms.triton.support import tl, triton


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x / sqrt(mean(x^2) + eps)), computed in fp32 (the mean of squares neither overflows in fp16 nor
    loses precision in bf16), rounded to x's dtype, then multiplied by the weight."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


if triton is not None:
    @triton.jit
    def _rms_norm_rows_kernel(x_ptr, g_ptr, out_ptr, K, stride_x, stride_out, eps, BLOCK_K: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_K)
        squares = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_ptr + row * stride_x + k0 + cols, mask=(k0 + cols) < K, other=0.0).to(tl.float32)
            squares += x * x
        rstd = tl.rsqrt(tl.sum(squares, axis=0) / K + eps)
        out_ty = out_ptr.dtype.element_ty
        for k0 in range(0, K, BLOCK_K):
            ok = (k0 + cols) < K
            x = tl.load(x_ptr + row * stride_x + k0 + cols, mask=ok, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + k0 + cols, mask=ok, other=0.0).to(tl.float32)
            h = (x * rstd).to(out_ty).to(tl.float32)  # rounded before the weight, as the reference
            tl.store(out_ptr + row * stride_out + k0 + cols, (h * g).to(out_ty), mask=ok)


def rms_norm_rows(x: torch.Tensor, weight: torch.Tensor, eps: float, block_k: int = 1024) -> torch.Tensor:
    """rms_norm_reference for 2-D rows x (last dim contiguous) with weight of x's dtype: one launch, one program
    per row."""
    m, k = x.shape
    if weight.shape != (k,) or weight.dtype != x.dtype:
        raise ValueError(f"rms_norm_rows needs a weight of shape ({k},) and dtype {x.dtype}, "
                         f"got {tuple(weight.shape)} {weight.dtype}")
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if m:
        x = x if x.stride(-1) == 1 else x.contiguous()
        _rms_norm_rows_kernel[(m,)](x, weight, out, k, x.stride(0), out.stride(0), eps,
                                    BLOCK_K=min(block_k, triton.next_power_of_2(k)))
    return out
