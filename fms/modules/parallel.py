"""Tensor-parallel layers: row-parallel linear (one all-reduce), vocab-parallel embedding and LM head.

Column-parallel projections need no layer of their own: a plain Linear holding its rows, with the rows
recorded (fms.distributed.sharding.set_shards). The layers here are the ones that talk to other ranks:

    RowParallelLinear     x[..., local in-features] @ W[:, local]^T, summed over ranks (all-reduce), + bias
    VocabParallelEmbedding  rows [v0, v1) of the table; ids outside give zeros; summed over ranks (all-reduce)
    VocabParallelHead     logits of vocab rows [v0, v1), gathered on the last dim: every rank gets all logits
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from fms.distributed.group import TensorParallel
from fms.distributed.sharding import TensorShard, set_shards, split_range
from fms.modules.embedding import Embedding
from fms.modules.linear import Linear
from fms.triton.gemv import add_residual, fits, gemv


def column_parallel(in_features: int, pieces: tuple[tuple[int, int], ...], full_out_features: int,
                    bias: bool = False) -> Linear:
    """A Linear holding output rows `pieces` (ranges of the full layer's rows, concatenated) of a full
    (full_out_features, in_features) layer."""
    out_features = sum(b - a for a, b in pieces)
    layer = Linear(in_features, out_features, bias=bias)
    shards = dict(weight=TensorShard((full_out_features, in_features), 0, pieces))
    if bias:
        shards["bias"] = TensorShard((full_out_features,), 0, pieces)
    return set_shards(layer, **shards)


class RowParallelLinear(Linear):
    """Input features [start, stop) of a full (out_features, in_features) layer. Each rank's product is a
    partial sum of the full layer's output: one all-reduce completes it, then the (replicated) bias is added."""

    def __init__(self, in_features: int, out_features: int, tp: TensorParallel, in_range: tuple[int, int],
                 bias: bool = False):
        super().__init__(in_range[1] - in_range[0], out_features, bias=bias)
        self.tp = tp
        set_shards(self, weight=TensorShard((out_features, in_features), 1, (tuple(in_range),)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels.gemv and fits(x, self.weight, self.kernels.gemv_rows):
            partial = gemv(x, self.weight, None, max_rows=self.kernels.gemv_rows)
        else:
            partial = F.linear(x, self.weight)
        return self._reduce(partial)

    def forward_swiglu(self, gate_up: torch.Tensor, residual: torch.Tensor | None = None,
                       residual_scale: float = 1.0) -> torch.Tensor:
        if self.kernels.gemv and fits(gate_up, self.weight, self.kernels.gemv_rows):
            partial = gemv(gate_up, self.weight, None, silu_mul=True, max_rows=self.kernels.gemv_rows)
        else:
            gate, up = gate_up.split(gate_up.shape[-1] // 2, dim=-1)
            partial = F.linear(F.silu(gate) * up, self.weight)
        return add_residual(self._reduce(partial), residual, residual_scale)

    def _fusable(self, x: torch.Tensor, residual: torch.Tensor | None) -> bool:
        """Never: the input is this rank's slice of the features (a norm over it would be wrong) and the product a
        partial sum (a residual added before the all-reduce would count once per rank)."""
        return False

    def _reduce(self, partial: torch.Tensor) -> torch.Tensor:
        self.tp.all_reduce(partial)
        return partial if self.bias is None else partial + self.bias


class VocabParallelEmbedding(Embedding):
    """Rows [start, stop) of the embedding table (split_range of the vocabulary). A rank looks up the ids it
    holds, writes zeros for the others, and the all-reduce puts every id's row together."""

    def __init__(self, vocab_size: int, dim: int, tp: TensorParallel):
        start, stop = split_range(vocab_size, tp.rank, tp.world_size)
        super().__init__(stop - start, dim)
        self.tp, self.vocab_start, self.vocab_size = tp, start, vocab_size
        set_shards(self, weight=TensorShard((vocab_size, dim), 0, ((start, stop),)))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.num_embeddings)
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.tp.all_reduce(x.masked_fill(outside[..., None], 0.0))


class VocabParallelHead(Linear):
    """LM head rows [start, stop) of the vocabulary (the same split as VocabParallelEmbedding, so a tied head
    shares its rows). Local logits are padded to ceil(vocab / ranks) and gathered: every rank returns the
    full (..., vocab_size) logits, identical bits on every rank, so sampling agrees without a broadcast."""

    def __init__(self, dim: int, vocab_size: int, tp: TensorParallel):
        start, stop = split_range(vocab_size, tp.rank, tp.world_size)
        super().__init__(dim, stop - start, bias=False)
        self.tp, self.vocab_size = tp, vocab_size
        self.chunk = math.ceil(vocab_size / tp.world_size)
        set_shards(self, weight=TensorShard((vocab_size, dim), 0, ((start, stop),)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = super().forward(x)  # (..., stop - start)
        if local.shape[-1] < self.chunk:
            local = F.pad(local, (0, self.chunk - local.shape[-1]))
        return self.tp.all_gather_last_dim(local, self.vocab_size)
