"""Linear layers that send one or two CUDA rows (decode at batch 1 and 2) through the GEMV kernel of fms.triton.gemv
(when compiled, any number of one-token rows: the op picks the kernel or cuBLAS at run time; a compiled prefill
takes F.linear, fms.triton.gemv.one_token_rows)."""

import torch
import torch.nn.functional as F
from torch import nn

from fms.modules.kernel_config import KernelConfig, check_kernel_config
from fms.modules.layernorm import RMSNorm
from fms.triton.gemv import add_residual, fits, gemv


def swiglu_down(gate_up: torch.Tensor, down: "Linear") -> torch.Tensor:
    """down(silu(gate) * up) for gate_up = [gate | up] on the last dim (down.forward_swiglu)."""
    return down.forward_swiglu(gate_up)


class Linear(nn.Linear):
    """nn.Linear that multiplies up to fms.triton.gemv.MAX_ROWS CUDA rows with the GEMV kernel (decode at batch 1
    and 2) unless its kernel config says gemv=False (then always F.linear)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.kernels = KernelConfig()

    def set_kernels(self, kernels: KernelConfig) -> None:
        self.kernels = check_kernel_config(kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels.gemv and fits(x, self.weight, self.kernels.gemv_rows):
            return gemv(x, self.weight, self.bias, max_rows=self.kernels.gemv_rows)
        return F.linear(x, self.weight, self.bias)

    def forward_fused(self, x: torch.Tensor, norm: nn.Module | None = None, residual: torch.Tensor | None = None,
                      residual_scale: float = 1.0) -> torch.Tensor:
        """residual + residual_scale * self(norm(x)), each part optional (KernelConfig.fuse_norm: a block's norm
        before a projection, its residual add after one). Rows the GEMV kernel takes run as one kernel when the
        norm is an RMSNorm; anything else runs this expression as written."""
        if norm is None and residual is None:  # nothing to fuse (an unfused block's projection): one fits() check
            return self(x)
        if self._fusable(x, residual) and (norm is None or (isinstance(norm, RMSNorm)
                                                            and norm.weight.dtype == x.dtype)):
            return gemv(x, self.weight, self.bias, max_rows=self.kernels.gemv_rows,
                        norm_weight=None if norm is None else norm.weight, eps=0.0 if norm is None else norm.eps,
                        residual=residual, residual_scale=residual_scale)
        return add_residual(self(x if norm is None else norm(x)), residual, residual_scale)

    def forward_swiglu(self, gate_up: torch.Tensor, residual: torch.Tensor | None = None,
                       residual_scale: float = 1.0) -> torch.Tensor:
        """self(silu(gate) * up) for gate_up = [gate | up] on the last dim, plus residual_scale times that added to
        residual where given; one fused kernel for up to MAX_ROWS CUDA rows when the kernel config allows the GEMV
        kernel. A method so that a row-parallel layer adds its all-reduce."""
        if self._fusable(gate_up, residual):
            return gemv(gate_up, self.weight, self.bias, silu_mul=True, max_rows=self.kernels.gemv_rows,
                        residual=residual, residual_scale=residual_scale)
        gate, up = gate_up.split(gate_up.shape[-1] // 2, dim=-1)
        return add_residual(self(F.silu(gate) * up), residual, residual_scale)

    def _fusable(self, x: torch.Tensor, residual: torch.Tensor | None) -> bool:
        """Whether the GEMV kernel takes x's rows (and the residual, of the same dtype) for this layer."""
        return (self.kernels.gemv and fits(x, self.weight, self.kernels.gemv_rows)
                and (residual is None or residual.dtype == x.dtype))
