"""KVCacheSpec: what a model needs cached, built by the model from its config (never duplicated)."""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVCacheSpec:
    """What a model needs cached; built by the model from its config, never duplicated."""

    num_layers: int
    attention_layers: tuple[int, ...]
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    max_position_embeddings: int
    sliding_window: int | None = None
    # Per-layer recurrent (Mamba) state; None for pure-attention models.
    state_spec: object | None = None

    def __post_init__(self):
        if self.num_kv_heads < 1 or self.head_dim < 1:
            raise ValueError(f"num_kv_heads and head_dim must be >= 1, got {self.num_kv_heads}, {self.head_dim}")
        bad = [i for i in self.attention_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"attention layer indices {bad} are outside 0..{self.num_layers - 1}")

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of every attention layer for one token."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * len(self.attention_layers) * self.num_kv_heads * self.head_dim * itemsize

    def page_bytes(self, page_size: int) -> int:
        """Bytes of one page of page_size tokens across every attention layer."""
        return self.kv_bytes_per_token * page_size
