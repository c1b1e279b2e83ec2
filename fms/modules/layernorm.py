"""Normalisation layers: RMSNorm computed in fp32 (fms.triton.rmsnorm.rms_norm_reference)."""

import torch
from torch import nn

from fms.triton.rmsnorm import rms_norm_reference


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm_reference(x, self.weight, self.eps)
