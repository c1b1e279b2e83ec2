"""Linear layers that send one or two CUDA rows (decode at batch 1 and 2) through the GEMV kernel of fms.triton.gemv
(when compiled, any number of one-token rows: the op picks the kernel or cuBLAS at run time; a compiled prefill
takes F.linear, fms.triton.gemv.one_token_rows)."""

import torch
import torch.nn.functional as F
from torch import nn

from fms.modules.kernel_config import KernelConfig, check_kernel_config
from fms.triton.gemv import fits, gemv


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

    def forward_swiglu(self, gate_up: torch.Tensor) -> torch.Tensor:
        """self(silu(gate) * up) for gate_up = [gate | up] on the last dim; one fused kernel for up to MAX_ROWS
        CUDA rows when the kernel config allows the GEMV kernel. A method so that a row-parallel layer adds its
        all-reduce."""
        if self.kernels.gemv and fits(gate_up, self.weight, self.kernels.gemv_rows):
            return gemv(gate_up, self.weight, self.bias, silu_mul=True, max_rows=self.kernels.gemv_rows)
        gate, up = gate_up.split(gate_up.shape[-1] // 2, dim=-1)
        return self(F.silu(gate) * up)
