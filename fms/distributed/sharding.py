"""Which slice of a full tensor each rank holds (TensorShard), and how rows, vocabularies and heads are split.

A sharded layer records a TensorShard for each parameter it splits; the same record drives random init
(draw the full seeded tensor, keep the slice: the single-process weights, split) and checkpoint loading
(read only the slice from the safetensors file).

    full tensor, dim 0                       q/k/v fused, rank 1 of 2 (4 q heads, 2 kv heads):
    [ rows a0:b0 | ... | rows a1:b1 ]        [ q0 q1 | q2 q3 | k0 | k1 | v0 | v1 ]
       piece 0            piece 1                      ^^^^^        ^^        ^^   -> local [q2 q3 k1 v1]
"""

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class TensorShard:
    """One rank's part of a full tensor: full.narrow(dim, a, b - a) for each (a, b) in pieces, concatenated."""

    full_shape: tuple[int, ...]
    dim: int
    pieces: tuple[tuple[int, int], ...]

    def __post_init__(self):
        if not 0 <= self.dim < len(self.full_shape):
            raise ValueError(f"TensorShard.dim {self.dim} is not a dimension of shape {list(self.full_shape)}")
        size = self.full_shape[self.dim]
        bad = [p for p in self.pieces if not 0 <= p[0] < p[1] <= size]
        if bad or not self.pieces:
            raise ValueError(f"TensorShard pieces {list(self.pieces)} must be non-empty ranges inside 0..{size}")

    @property
    def local_shape(self) -> tuple[int, ...]:
        shape = list(self.full_shape)
        shape[self.dim] = sum(b - a for a, b in self.pieces)
        return tuple(shape)

    def take(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of the full tensor."""
        if tuple(full.shape) != tuple(self.full_shape):
            raise ValueError(f"expected the full tensor of shape {list(self.full_shape)}, got {list(full.shape)}")
        parts = [full.narrow(self.dim, a, b - a) for a, b in self.pieces]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=self.dim)


def split_range(size: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank's [start, stop) of `size` items cut into world_size chunks of ceil(size / world_size); the last
    chunk may be shorter. A rank left with nothing is an error (the size is too small to split)."""
    chunk = math.ceil(size / world_size)
    start, stop = min(size, rank * chunk), min(size, (rank + 1) * chunk)
    if start >= stop:
        raise ValueError(f"cannot split {size} items over {world_size} ranks: rank {rank} would hold none")
    return start, stop


def head_ranges(num_heads: int, num_kv_heads: int, rank: int, world_size: int) -> tuple[tuple[int, int], ...]:
    """(query heads, KV heads) [start, stop) of one rank.

    Query heads split evenly. KV heads split evenly when there are at least as many as ranks; with fewer,
    each KV head is replicated on the world_size / num_kv_heads ranks whose query heads read it.
    """
    if num_heads % world_size:
        raise ValueError(f"tensor parallel size {world_size} must divide num_heads ({num_heads})")
    q_per_rank = num_heads // world_size
    if num_kv_heads >= world_size:
        if num_kv_heads % world_size:
            raise ValueError(f"tensor parallel size {world_size} must divide num_kv_heads ({num_kv_heads}) "
                             f"when there are at least as many KV heads as ranks")
        kv_per_rank = num_kv_heads // world_size
        kv_start = rank * kv_per_rank
    else:
        if world_size % num_kv_heads:
            raise ValueError(f"with fewer KV heads ({num_kv_heads}) than ranks ({world_size}), each KV head is "
                             f"replicated, so num_kv_heads must divide the tensor parallel size")
        kv_per_rank = 1
        kv_start = rank // (world_size // num_kv_heads)
    return (rank * q_per_rank, (rank + 1) * q_per_rank), (kv_start, kv_start + kv_per_rank)


def set_shards(module: nn.Module, **shards: TensorShard) -> nn.Module:
    """Record which part of the full tensor each named parameter of module holds; returns module."""
    for name, shard in shards.items():
        param = getattr(module, name)
        if param is not None and tuple(param.shape) != shard.local_shape:
            raise ValueError(f"{type(module).__name__}.{name} has shape {list(param.shape)}, "
                             f"but its shard is {list(shard.local_shape)}")
    module.shards = {**getattr(module, "shards", {}), **shards}
    return module


def tensor_shards(model: nn.Module) -> dict[str, TensorShard]:
    """Parameter name (as named_parameters gives it) -> its TensorShard, for every split parameter."""
    found = {}
    for prefix, module in model.named_modules():
        for name, shard in getattr(module, "shards", {}).items():
            found[f"{prefix}.{name}" if prefix else name] = shard
    return found
