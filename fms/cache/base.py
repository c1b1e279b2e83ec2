"""KV-cache contract shared by all attention ops, and the contiguous cache the `sdpa` op uses.

A driver (static generation, the serving engine) owns one cache per run:

    cache = get_attention_op(name).create_cache(spec, max_batch_size=B, max_seq_len=N, ...)
    cache.add(seq_id)                                  # once per sequence
    meta = cache.prepare([seq ids], [new tokens])      # once per step: room + per-step metadata
    logits = model(input_ids, cache=cache, meta=meta)  # every layer reads meta, never writes it
    cache.free(seq_id)                                 # when the sequence ends

Input rows are right-padded to the step's longest query; padding never reaches the cache.

A decode window runs several one-token steps without the host (fms.serving.model_runner):

    window = cache.prepare_decode_window([seq ids], [steps each])   # room for every step, once
    rows = window.rows                                 # (B, W) host: where each row's K/V live
    inputs = cache.window_inputs(positions, ends, rows_on_device)   # per step, on the device
    meta = cache.window_meta(positions, rows_on_device, state_slots, inputs, layout)
"""

from dataclasses import dataclass, field
from typing import Hashable, Sequence

import torch


def segment_ids(lengths: torch.Tensor) -> torch.Tensor:
    """(B,) int64 counts -> (sum,) the row index b repeated lengths[b] times.

    torch.repeat_interleave(arange(B), lengths) on the host, which measured ~8 ms for 28 rows of
    ~300 (2-core CPU, torch 2.13) against ~0.06 ms for this cumulative sum. Callers gather with the
    result through index_select: advanced indexing (x[idx]) measured ~8 ms there too, against 0.03 ms.
    """
    total = int(lengths.sum())
    marks = torch.zeros(total + 1, dtype=torch.int64)
    marks.index_add_(0, torch.cumsum(lengths, 0), torch.ones_like(lengths))  # +1 where each row ends
    return marks[:total].cumsum(0)


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
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * len(self.attention_layers) * self.num_kv_heads * self.head_dim * itemsize


@dataclass(frozen=True)
class StepMeta:
    """Per-step metadata common to every cache. Rows follow the order of `prepare`'s seq ids."""

    position_ids: torch.Tensor  # (B, T) int64: logical position of each query token; (1, N) when packed
    num_new_tokens: torch.Tensor  # (B,) int64: real (unpadded) tokens of each row
    context_lens: torch.Tensor  # (B,) int64: tokens cached before this step
    query_len: int  # T, the padded query length (N, all tokens, when packed)
    max_context_len: int  # max over rows of context_lens + num_new_tokens
    state_slots: torch.Tensor | None = None  # (B,) int64 recurrent-state slot per row (hybrid models)
    packed: bool = False  # input rows packed into one: (1, N), see SequenceCache.prepare
    # Decided on the host once per step, so that a compiled forward guards on these bools and not on
    # every row's length (reading host_context made torch.compile recompile at each decode step and
    # for each batch size).
    is_uniform: bool = False  # every row has the same context and the same number of real tokens
    has_context: bool = True  # some row has tokens cached before this step

    @property
    def batch_size(self) -> int:
        return self.num_new_tokens.shape[0]


@dataclass
class MemoryStats:
    bytes_allocated: int  # the cache's storage, reserved up front
    bytes_in_use: int  # storage held by live sequences (whole pages / rows)
    bytes_holding_tokens: int  # tokens actually stored x bytes per token
    pages_in_use: int | None = None
    num_pages: int | None = None
    state_bytes: int = 0
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        out = {
            "kv_bytes_allocated": self.bytes_allocated,
            "kv_bytes_in_use": self.bytes_in_use,
            "kv_bytes_holding_tokens": self.bytes_holding_tokens,
            "state_bytes": self.state_bytes,
        }
        if self.num_pages is not None:
            out.update(pages_in_use=self.pages_in_use, num_pages=self.num_pages)
        out.update(self.extra)
        return out


@dataclass(frozen=True)
class DecodeWindow:
    """Host-side inputs of a run of one-token decode steps (SequenceCache.prepare_decode_window)."""

    start_positions: list[int]  # position of each sequence's first computed token
    num_steps: list[int]  # steps each sequence computes; it idles (writes scratch storage) after
    rows: torch.Tensor  # (B, cache.window_row_width) int32: the page-table row (paged) or cache row (contiguous)
    state_slots: list[int] | None = None  # recurrent-state slot per sequence (hybrid models)


class ContextTooLongError(ValueError):
    pass


class SequenceCache:
    """Bookkeeping shared by all caches: sequence ids, their lengths, recurrent-state slots."""

    def __init__(self, spec: KVCacheSpec, max_batch_size: int, max_seq_len: int):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_seq_len < 1:
            raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
        if max_seq_len > spec.max_position_embeddings:
            raise ContextTooLongError(
                f"max_seq_len {max_seq_len} exceeds the model's context of {spec.max_position_embeddings} tokens"
            )
        self.spec = spec
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        self._lengths: dict[Hashable, int] = {}
        self.state_pool = None
        if spec.state_spec is not None:
            from fms.cache.state import MambaStatePool

            self.state_pool = MambaStatePool(spec.state_spec, max_batch_size, spec.device)
        self._layer_slot = {layer: i for i, layer in enumerate(spec.attention_layers)}

    # -- sequences -------------------------------------------------------------------------
    def add(self, seq_id: Hashable) -> None:
        if seq_id in self._lengths:
            raise ValueError(f"sequence {seq_id!r} is already in the cache")
        if len(self._lengths) >= self.max_batch_size:
            raise ValueError(f"the cache holds at most {self.max_batch_size} sequences")
        self._add(seq_id)
        if self.state_pool is not None:
            self.state_pool.allocate(seq_id)
        self._lengths[seq_id] = 0

    def free(self, seq_id: Hashable) -> None:
        self._check_known(seq_id)
        self._free(seq_id)
        if self.state_pool is not None:
            self.state_pool.free(seq_id)
        del self._lengths[seq_id]

    def length(self, seq_id: Hashable) -> int:
        self._check_known(seq_id)
        return self._lengths[seq_id]

    def __contains__(self, seq_id) -> bool:
        return seq_id in self._lengths

    @property
    def sequences(self) -> list:
        return list(self._lengths)

    def _check_known(self, seq_id):
        if seq_id not in self._lengths:
            raise KeyError(f"sequence {seq_id!r} is not in the cache")

    # -- steps -----------------------------------------------------------------------------
    def prepare(self, seq_ids: Sequence[Hashable], num_new_tokens: Sequence[int],
                query_len: int | None = None, packed: bool = False) -> StepMeta:
        """Make room for the next tokens of each sequence and build the step's metadata.

        query_len pads every row to that many query tokens (default: the longest row), so that a
        driver can keep input shapes to a few buckets (compiled kernels specialize on shapes).
        packed: the step's input is one row holding every sequence's new tokens back to back,
        (1, sum(num_new_tokens)), with no padding (caches whose `can_pack` is True).
        """
        if packed:
            if not self.can_pack:
                raise ValueError(f"{type(self).__name__} cannot take packed steps (can_pack is False: "
                                 f"{self.why_not_packed()})")
            if query_len is not None:
                raise ValueError("a packed step has no padding: give query_len or packed, not both")
        if query_len is not None and num_new_tokens and query_len < max(num_new_tokens):
            raise ValueError(f"query_len {query_len} is shorter than the longest row ({max(num_new_tokens)} tokens)")
        context = self._grow(seq_ids, num_new_tokens)
        base, positions = self._base_meta(context, list(num_new_tokens), seq_ids, query_len, packed)
        return self._build_meta(base, seq_ids, context, list(num_new_tokens), positions)

    @property
    def can_pack(self) -> bool:
        return self.why_not_packed() is None

    def why_not_packed(self) -> str | None:
        """None if prepare(packed=True) works, else the reason it does not."""
        return "only the paged cache lays out packed steps"

    def _grow(self, seq_ids: Sequence[Hashable], num_new_tokens: Sequence[int]) -> list[int]:
        """Check a step, make room for it and advance the lengths; -> each sequence's length before."""
        if len(seq_ids) != len(num_new_tokens) or not seq_ids:
            raise ValueError(
                f"prepare needs one token count per sequence, got {len(seq_ids)} ids and {len(num_new_tokens)} counts"
            )
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError(f"duplicate sequence ids in one step: {list(seq_ids)}")
        for seq_id, n in zip(seq_ids, num_new_tokens):
            self._check_known(seq_id)
            if n < 1:
                raise ValueError(f"sequence {seq_id!r}: a step needs at least 1 new token, got {n}")
            if self._lengths[seq_id] + n > self.max_seq_len:
                raise ContextTooLongError(
                    f"sequence {seq_id!r} would reach {self._lengths[seq_id] + n} tokens, "
                    f"over this cache's max_seq_len of {self.max_seq_len}"
                )
        context = [self._lengths[s] for s in seq_ids]
        self._reserve(seq_ids, num_new_tokens)  # may raise (e.g. out of pages) with nothing changed
        for seq_id, n in zip(seq_ids, num_new_tokens):
            self._lengths[seq_id] += n
        return context

    def _base_meta(self, context, num_new, seq_ids, query_len=None, packed=False) -> tuple[dict, torch.Tensor]:
        """The StepMeta fields every cache fills (device tensors), and the positions on the host."""
        device = self.spec.device
        ctx = torch.tensor(context, dtype=torch.int64)
        new = torch.tensor(num_new, dtype=torch.int64)
        if packed:
            t = sum(num_new)
            starts = torch.cumsum(new, 0) - new
            # (1, N): row b's tokens at positions ctx[b] .. ctx[b] + new[b] - 1, rows back to back
            positions = (torch.arange(t) + (ctx - starts).index_select(0, segment_ids(new)))[None]
        else:
            t = query_len or max(num_new)
            positions = ctx[:, None] + torch.arange(t)[None, :]  # (B, T); padded tail is never read
        slots = None
        if self.state_pool is not None:
            slots = torch.tensor([self.state_pool.slot_of(s) for s in seq_ids], dtype=torch.int64, device=device)
        return dict(
            position_ids=positions.to(device, non_blocking=True),
            num_new_tokens=new.to(device, non_blocking=True),
            context_lens=ctx.to(device, non_blocking=True),
            query_len=t,
            max_context_len=max(c + n for c, n in zip(context, num_new)),
            state_slots=slots,
            packed=packed,
            is_uniform=len(set(num_new)) == 1 and len(set(context)) == 1,
            has_context=max(context) > 0,
        ), positions

    def prepare_decode_window(self, seq_ids: Sequence[Hashable], num_steps: Sequence[int]) -> DecodeWindow:
        """Room for num_steps[i] one-token steps of each sequence, run back to back without the host.

        The lengths advance by num_steps now; the caller computes each step's inputs on the device
        (window_inputs, window_meta) from the start positions and the returned rows.
        """
        start = self._grow(seq_ids, num_steps)
        slots = None
        if self.state_pool is not None:
            slots = [self.state_pool.slot_of(s) for s in seq_ids]
        return DecodeWindow(start, list(num_steps), self._window_rows(seq_ids), slots)

    # A window step on the device; the driver (DecodeWindowRunner) owns the buffers:
    #   positions (B, 1) int64 position of each row's token, ends (B,) int64 (a row computes positions
    #   < ends[b] and idles after), rows (B, window_row_width) int32, state_slots (B,) int64 or None.
    @property
    def window_row_width(self) -> int:
        raise NotImplementedError

    def _window_rows(self, seq_ids) -> torch.Tensor:
        raise NotImplementedError

    def idle_window_rows(self, start: int, end: int) -> torch.Tensor:
        """(end - start, window_row_width) int32 host rows for buffer rows that compute nothing."""
        raise NotImplementedError

    def window_layout(self, rows: torch.Tensor, batch: int):
        """A hashable that fixes the step's structure for these (batch, W) host rows (padded rows
        included); a captured CUDA graph is only replayed for the layout it was captured with."""
        return None

    def window_inputs(self, positions, ends, rows) -> tuple:
        """The step's per-row tensors, arithmetic only (a driver may torch.compile it):
        (active (B,) bool, num_new (B,) int64, ...cache-specific)."""
        raise NotImplementedError

    def window_meta(self, positions, rows, state_slots, inputs, layout) -> StepMeta:
        """The StepMeta of one window step from the buffers and window_inputs' result."""
        raise NotImplementedError

    def layer_index(self, layer_idx: int) -> int:
        """Position of a model layer among the cached attention layers."""
        try:
            return self._layer_slot[layer_idx]
        except KeyError:
            raise ValueError(f"layer {layer_idx} is not an attention layer of this cache") from None

    def release_out_of_window(self, seq_id: Hashable) -> list[int]:
        """Free storage no future query of this sequence can see (sliding window); [] if none."""
        return []

    # subclasses
    def _add(self, seq_id):
        pass

    def _free(self, seq_id):
        pass

    def _reserve(self, seq_ids, num_new_tokens):
        pass

    def _build_meta(self, base: dict, seq_ids, context, num_new, positions: torch.Tensor) -> StepMeta:
        """positions: the step's position_ids on the host, (B, T) or (1, N) packed."""
        raise NotImplementedError

    def memory_stats(self) -> MemoryStats:
        raise NotImplementedError

    def pool_tensors(self) -> list[torch.Tensor]:
        """The storage tensors the layers read and write in place (K/V, recurrent state)."""
        return [] if self.state_pool is None else self.state_pool.tensors

    def mark_static(self) -> None:
        """Fix the pools' shapes for torch.compile(dynamic=True), for a driver that compiles over
        this one cache for its whole life (the serving runner).

        Under dynamic=True every dim of an input gets a symbol, and equal sizes share one (duck
        sizing): a batch of 128 would be tied to head_dim 128, or a batch of 64 to a Mamba head_dim
        of 64, and specialized with it where a layer views by its config, a recompile per batch
        size. Not done for every cache: under the default dynamic=None sizes that never change stay
        static anyway, and a pool marked static recompiles a forward for each new pool size, which
        a static-batch driver (generate() in a benchmark sweep) creates at every batch and length.
        """
        for pool in self.pool_tensors():
            torch._dynamo.mark_static(pool)

    def _state_bytes(self) -> int:
        return 0 if self.state_pool is None else self.state_pool.bytes_in_use()


@dataclass(frozen=True)
class ContiguousStepMeta(StepMeta):
    rows: torch.Tensor | None = None  # (B,) cache row of each batch row
    rows_are_prefix: bool = False  # rows == arange(B): read the cache by slicing, no gather
    write_rows: torch.Tensor | None = None  # (B, T) row index per token, for the scatter
    write_positions: torch.Tensor | None = None  # (B, T) position per token; padding -> scratch column


class ContiguousKVCache(SequenceCache):
    """One row of max_seq_len (+1 scratch column) per sequence, per layer: the classic static cache."""

    def __init__(self, spec: KVCacheSpec, max_batch_size: int, max_seq_len: int):
        super().__init__(spec, max_batch_size, max_seq_len)
        n_layers = len(spec.attention_layers)
        shape = (n_layers, max_batch_size, spec.num_kv_heads, max_seq_len + 1, spec.head_dim)
        self.keys = torch.zeros(shape, dtype=spec.dtype, device=spec.device)
        self.values = torch.zeros(shape, dtype=spec.dtype, device=spec.device)
        self._free_rows = list(range(max_batch_size))
        self._row: dict[Hashable, int] = {}

    def _add(self, seq_id):
        self._row[seq_id] = self._free_rows.pop(0)

    def _free(self, seq_id):
        self._free_rows.append(self._row.pop(seq_id))
        self._free_rows.sort()

    def _build_meta(self, base, seq_ids, context, num_new, positions):
        device = self.spec.device
        rows = [self._row[s] for s in seq_ids]
        t = base["query_len"]
        row_t = torch.tensor(rows, dtype=torch.int64)
        is_real = torch.arange(t)[None, :] < torch.tensor(num_new)[:, None]
        write_pos = torch.where(is_real, positions, torch.full_like(positions, self.max_seq_len))
        return ContiguousStepMeta(
            **base,
            rows=row_t.to(device),
            rows_are_prefix=rows == list(range(len(rows))),
            write_rows=row_t[:, None].expand(-1, t).contiguous().to(device),
            write_positions=write_pos.to(device),
        )

    @property
    def window_row_width(self) -> int:
        return 1

    def _window_rows(self, seq_ids) -> torch.Tensor:
        return torch.tensor([[self._row[s]] for s in seq_ids], dtype=torch.int32)

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

    def window_meta(self, positions, rows, state_slots, inputs, layout):
        _, num_new, pos, write_pos = inputs
        row = rows[:, :1].long()
        # Every step reads all max_seq_len positions under a mask (fixed shapes, as a CUDA graph needs),
        # not the exact lengths of a host-prepared step.
        return ContiguousStepMeta(
            position_ids=positions, num_new_tokens=num_new, context_lens=pos, query_len=1,
            max_context_len=self.max_seq_len, state_slots=state_slots, is_uniform=False, has_context=True,
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
            bytes_in_use=len(self._row) * self.max_seq_len * per_token,
            bytes_holding_tokens=sum(self._lengths.values()) * per_token,
            state_bytes=self._state_bytes(),
        )
