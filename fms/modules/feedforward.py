"""Feed-forward blocks: SwiGLU (Llama/Granite, optionally with fused gate+up) and GELU (GPT-2)."""

import torch
import torch.nn.functional as F
from torch import nn

from fms.modules.linear import Linear, swiglu_down


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); gate and up live in one matrix so a single GEMM computes both."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool = False):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.wg1_fused = Linear(dim, 2 * hidden_dim, bias=bias)  # rows [0, I) = gate, [I, 2I) = up
        self.w2 = Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu_down(self.wg1_fused(x), self.w2)


class GeluMLP(nn.Module):
    """GPT-2 MLP: c_proj(gelu_tanh(c_fc(x)))."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = Linear(dim, hidden_dim)
        self.w2 = Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(x), approximate="tanh"))
