"""Rotary position embeddings (rotate-half layout) with Llama-3 frequency scaling."""

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class RopeScaling:
    """HF `rope_scaling` of type "llama3"; other types are rejected when the config is read."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    def __post_init__(self):
        if self.factor <= 0 or self.low_freq_factor <= 0 or self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(
                f"invalid llama3 rope scaling {self}: need factor > 0 and high_freq_factor > low_freq_factor > 0"
            )


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> torch.Tensor:
    """The head_dim / 2 RoPE frequencies (fp32, on the CPU), llama3-scaled when scaling is given."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device="cpu") / head_dim)
    if scaling is None:
        return inv_freq.float()
    orig = scaling.original_max_position_embeddings
    low_wavelen = orig / scaling.low_freq_factor
    high_wavelen = orig / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (orig / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, blended)
    scaled = torch.where(wavelen < high_wavelen, inv_freq, scaled)
    return scaled.float()


class RotaryEmbedding(nn.Module):
    """Applies rotate-half RoPE to q and k at given positions; cos/sin in fp32."""

    def __init__(self, head_dim: int, theta: float, scaling: RopeScaling | None = None):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
        self.head_dim, self.theta, self.scaling = head_dim, theta, scaling
        # computed where it lives; on the meta device (get_model) only its shape, after to_empty by reset_buffers
        self.register_buffer("inv_freq", torch.empty(head_dim // 2, dtype=torch.float32), persistent=False)
        if not self.inv_freq.is_meta:
            self.reset_buffers()

    def reset_buffers(self):
        # inv_freq stays fp32 whatever the model dtype: positions up to 128k need its precision.
        self.inv_freq = rope_inv_freq(self.head_dim, self.theta, self.scaling).to(self.inv_freq.device)

    def forward(self, q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor):
        # q: (B, Hq, T, D), k: (B, Hkv, T, D), position_ids: (B, T)
        return self.apply(q, k, *self.cos_sin(position_ids))

    @staticmethod
    def apply(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """q and k rotated by cos/sin (each (B, 1, T, D), from cos_sin)."""
        return _rotate(q, cos, sin), _rotate(k, cos, sin)

    def begin_forward(self):
        """Forget the last cos/sin: a model calls this at the start of each forward, so the reuse
        below never outlives one forward (position buffers may be updated in place between them)."""
        self._last = None

    def cos_sin(self, position_ids):
        """(cos, sin), each (B, 1, T, D) in fp32, for position_ids (B, T). Every layer of one forward passes the
        same position_ids tensor: computed once per forward (see begin_forward)."""
        cached = getattr(self, "_last", None)
        if cached is not None and cached[0] is position_ids:
            return cached[1]
        angles = position_ids.float()[..., None] * self.inv_freq  # (B, T, D/2)
        angles = torch.cat((angles, angles), dim=-1)[:, None]  # (B, 1, T, D)
        result = (angles.cos(), angles.sin())
        self._last = (position_ids, result)
        return result


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    h = x.float()
    half = h.shape[-1] // 2
    rotated = torch.cat((-h[..., half:], h[..., :half]), dim=-1)
    return (h * cos + rotated * sin).to(x.dtype)
