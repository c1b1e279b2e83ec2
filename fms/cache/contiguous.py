"""The contiguous cache (sdpa and flex ops): one row of max_seq_len tokens per sequence, per layer."""

from dataclasses import dataclass

import torch

from fms.cache.base import SequenceCache
from fms.cache.kv_manager import KVManager
from fms.cache.metadata import MemoryStats, StepMeta
from fms.cache.spec import KVCacheSpec


@dataclass(frozen=True)
class ContiguousStepMeta(StepMeta):
    rows: torch.Tensor | None = None  # (B,) cache row of each batch row
    rows_are_prefix: bool = False  # rows == arange(B): read the cache by slicing, no gather
    write_rows: torch.Tensor | None = None  # (B, T) row index per token, for the scatter
    write_positions: torch.Tensor | None = None  # (B, T) position per token; padding -> scratch column


class ContiguousKVCache(SequenceCache):
    """One row of max_seq_len (+1 scratch column) per sequence, per layer: the classic static cache.

    A sequence's row is its KV-manager slot. To the manager the cache is max_batch_size pages of
    max_seq_len tokens (one per sequence), so page accounting is the same for every op.
    """

    def __init__(self, spec: KVCacheSpec, max_batch_size: int, max_seq_len: int, manager: KVManager | None = None):
        if manager is None:
            manager = KVManager(num_pages=max_batch_size, page_size=max_seq_len, max_num_seqs=max_batch_size)
        super().__init__(spec, max_batch_size, max_seq_len, manager)
        n_layers = len(spec.attention_layers)
        shape = (n_layers, max_batch_size, spec.num_kv_heads, max_seq_len + 1, spec.head_dim)
        self.keys = torch.zeros(shape, dtype=spec.dtype, device=spec.device)
        self.values = torch.zeros(shape, dtype=spec.dtype, device=spec.device)

    def _build_meta(self, base, seq_ids, context, num_new, positions):
        device = self.spec.device
        rows = [self.manager.slot_of(s) for s in seq_ids]
        t = base["query_len"]
        row_t = torch.tensor(rows, dtype=torch.int64)
        is_real = torch.arange(t)[None, :] < torch.tensor(num_new)[:, None]
        write_pos = torch.where(is_real, positions, torch.full_like(positions, self.max_seq_len))
        # non_blocking: a blocking copy from pageable memory waits for the stream (a sync per tensor)
        return ContiguousStepMeta(
            **base,
            rows=row_t.to(device, non_blocking=True),
            rows_are_prefix=rows == list(range(len(rows))),
            write_rows=row_t[:, None].expand(-1, t).contiguous().to(device, non_blocking=True),
            write_positions=write_pos.to(device, non_blocking=True),
        )

    @property
    def window_row_width(self) -> int:
        return 1

    def _window_rows(self, seq_ids) -> torch.Tensor:
        return torch.tensor([[self.manager.slot_of(s)] for s in seq_ids], dtype=torch.int32)

    def idle_window_rows(self, start, end):
        # an idle row writes only its scratch column; its own index keeps a full batch's rows
        # 0..B-1 in order (read as a slice, no gather)
        return (torch.arange(start, end, dtype=torch.int32) % self.max_batch_size)[:, None]

    def window_layout(self, rows, batch):
        return bool(torch.equal(rows[:batch, 0], torch.arange(batch, dtype=rows.dtype)))  # rows_are_prefix

    def window_inputs(self, positions, ends, rows):
        pos = positions[:, 0]
        active = pos < ends
        write_pos = torch.where(active, pos, self.max_seq_len)  # idle rows write the scratch column
        return active, active.long(), pos, write_pos

    def window_meta(self, positions, rows, state_slots, inputs, layout, bounds=None):
        _, num_new, pos, write_pos = inputs
        row = rows[:, :1].long()
        # Under a CUDA graph every step reads all max_seq_len positions under a mask (fixed shapes);
        # an eager step reads up to the window's longest end, unmasked when all rows are uniform.
        max_len, is_uniform = bounds if bounds is not None else (self.max_seq_len, False)
        return ContiguousStepMeta(
            position_ids=positions, num_new_tokens=num_new, context_lens=pos, query_len=1,
            max_context_len=max_len, state_slots=state_slots, is_uniform=is_uniform, has_context=True,
            rows=row[:, 0], rows_are_prefix=layout, write_rows=row, write_positions=write_pos[:, None],
        )

    def layer_kv(self, layer_idx: int):
        i = self.layer_index(layer_idx)
        return self.keys[i], self.values[i]

    def pool_tensors(self) -> list[torch.Tensor]:
        return [self.keys, self.values, *super().pool_tensors()]

    def memory_stats(self) -> MemoryStats:
        per_token = self.spec.kv_bytes_per_token
        allocated = self.keys.numel() * self.keys.element_size() * 2
        return MemoryStats(
            bytes_allocated=allocated,
            bytes_in_use=self.manager.num_seqs * self.max_seq_len * per_token,
            bytes_holding_tokens=sum(self.manager.length(s) for s in self.manager.sequences) * per_token,
            state_bytes=self._state_bytes(),
        )
