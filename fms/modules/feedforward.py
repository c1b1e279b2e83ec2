"""Feed-forward blocks: SwiGLU (Llama/Granite, optionally with fused gate+up) and GELU (GPT-2)."""

import torch
import torch.nn.functional as F
from torch import nn

from fms.distributed.group import TensorParallel
from fms.distributed.sharding import split_range
from fms.modules.linear import Linear
from fms.modules.parallel import RowParallelLinear, column_parallel


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); gate and up live in one matrix so a single GEMM computes both."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool = False, tp: TensorParallel | None = None):
        """tp: under tensor parallel, this rank's slice [i0, i1) of the hidden units (column-parallel gate and
        up, row-parallel down: one all-reduce)."""
        super().__init__()
        if tp is None:
            self.hidden_dim = hidden_dim
            self.wg1_fused = Linear(dim, 2 * hidden_dim, bias=bias)  # rows [0, I) = gate, [I, 2I) = up
            self.w2 = Linear(hidden_dim, dim, bias=bias)
        else:
            i0, i1 = split_range(hidden_dim, tp.rank, tp.world_size)
            self.hidden_dim = i1 - i0
            self.wg1_fused = column_parallel(dim, ((i0, i1), (hidden_dim + i0, hidden_dim + i1)), 2 * hidden_dim,
                                             bias=bias)  # rows [gate i0:i1 | up i0:i1]
            self.w2 = RowParallelLinear(hidden_dim, dim, tp, (i0, i1), bias=bias)

    fuses_norm = True  # forward takes the block's norm and residual (KernelConfig.fuse_norm)

    def forward(self, x: torch.Tensor, norm: nn.Module | None = None, residual: torch.Tensor | None = None,
                residual_scale: float = 1.0) -> torch.Tensor:
        """down(silu(gate) * up) of norm(x) (norm: the block's, fused into gate|up where it can be), added to
        residual times residual_scale where residual is given (fused into the down projection)."""
        return self.w2.forward_swiglu(self.wg1_fused.forward_fused(x, norm), residual, residual_scale)


class GeluMLP(nn.Module):
    """GPT-2 MLP: c_proj(gelu_tanh(c_fc(x)))."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = Linear(dim, hidden_dim)
        self.w2 = Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(x), approximate="tanh"))
