"""SequenceCache: the device side of a KV cache, which applies the KV manager's decisions and builds step metadata.

Who owns what:

    KVManager (fms.cache.kv_manager)   host: which sequences exist, their lengths, pages, slots,
                                       prefix hits; decides, hands out PageGrants
    SequenceCache (this, per op)       device: the K/V storage the attention op reads (its layout is
                                       the op's), the Mamba state pool, the device copy of the page
                                       tables; applies grants, builds each step's StepMeta

A driver that is its own scheduler (generate(), tests) uses the convenience calls, which drive the
manager and apply its grants in one go:

    cache = get_attention_op(name).create_cache(spec, max_batch_size=B, max_seq_len=N, ...)
    cache.add(seq_id)                                  # once per sequence
    meta = cache.prepare([seq ids], [new tokens])      # reserve + apply + build_meta
    logits = model(input_ids, cache=cache, meta=meta)  # every layer reads meta, never writes it
    cache.free(seq_id)                                 # when the sequence ends

The serving engine splits them: its scheduler calls the manager (cache.manager) and passes the
grants on; its model runner only calls init_slots, apply and build_meta / decode_window.
Input rows are right-padded to the step's longest query; padding never reaches the cache.

A decode window runs several one-token steps without the host (fms.runtime.decode):

    window = cache.prepare_decode_window([seq ids], [steps each])   # room for every step, once
    rows = window.rows                                 # (B, W) host: where each row's K/V live
    inputs = cache.window_inputs(positions, ends, rows_on_device)   # per step, on the device
    meta = cache.window_meta(positions, rows_on_device, state_slots, inputs, layout)
"""

from typing import Hashable, Sequence

import torch

from fms.cache.kv_manager import KVManager, PageGrant
from fms.cache.metadata import CheckpointTargets, ContextTooLongError, DecodeWindow, MemoryStats, StepMeta, segment_ids
from fms.cache.spec import KVCacheSpec
from fms.cache.state import MambaStatePool


class SequenceCache:
    """Device storage for up to max_batch_size sequences of up to max_seq_len tokens, laid out as the
    KV manager decides (manager: the driver's, or one made for this cache by the subclass)."""

    window: int | None = None  # sliding window whose out-of-window pages can be released

    def __init__(self, spec: KVCacheSpec, max_batch_size: int, max_seq_len: int, manager: KVManager):
        for name, value in (("max_batch_size", max_batch_size), ("max_seq_len", max_seq_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if max_seq_len > spec.max_position_embeddings:
            raise ContextTooLongError(
                f"max_seq_len {max_seq_len} exceeds the model's context of {spec.max_position_embeddings} tokens"
            )
        if manager.max_num_seqs > max_batch_size:
            raise ValueError(f"the KV manager runs up to {manager.max_num_seqs} sequences but this cache has rows "
                             f"for {max_batch_size}")
        self.spec = spec
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        self.manager = manager
        self.state_pool = None
        if spec.state_spec is not None:
            self.state_pool = MambaStatePool(spec.state_spec, max_batch_size, spec.device)
        self._layer_slot = {layer: i for i, layer in enumerate(spec.attention_layers)}

    # -- a driver that is its own scheduler: manager + device in one call ----------------------
    def add(self, seq_id: Hashable) -> None:
        slot, _ = self.manager.add(seq_id)
        self.init_slots([slot])

    def free(self, seq_id: Hashable) -> None:
        self.manager.free(seq_id)

    @property
    def can_fork(self) -> bool:
        """Whether fork() works: a new sequence that starts as another's copy, sharing its cached tokens."""
        return False

    def fork(self, parent: Hashable, child: Hashable) -> None:
        """child starts as parent's copy, sharing its cached tokens (caches whose can_fork is True)."""
        self.fork_many([(parent, child)])

    def fork_many(self, pairs: Sequence[tuple[Hashable, Hashable]]) -> None:
        """fork(parent, child) for each pair, in order, with one device update for all."""
        raise NotImplementedError(f"{type(self).__name__} cannot fork a sequence: only pages can be shared "
                                  f"(check can_fork)")

    def length(self, seq_id: Hashable) -> int:
        return self.manager.length(seq_id)

    def __contains__(self, seq_id) -> bool:
        return seq_id in self.manager

    @property
    def sequences(self) -> list:
        return self.manager.sequences

    def prepare(self, seq_ids: Sequence[Hashable], num_new_tokens: Sequence[int],
                query_len: int | None = None, packed: bool = False) -> StepMeta:
        """Reserve room for the next tokens of each sequence, apply it, and build the step's metadata.

        query_len pads every row to that many query tokens (default: the longest row), so that a
        driver can keep input shapes to a few buckets (compiled kernels specialize on shapes).
        packed: the step's input is one row holding every sequence's new tokens back to back,
        (1, sum(num_new_tokens)), with no padding (caches whose `can_pack` is True).
        """
        context = self.check_step(seq_ids, num_new_tokens, query_len, packed)
        self.apply(self.manager.reserve(seq_ids, list(num_new_tokens)))  # may raise with nothing changed
        return self.build_meta(seq_ids, context, list(num_new_tokens), query_len, packed)

    def prepare_decode_window(self, seq_ids: Sequence[Hashable], num_steps: Sequence[int]) -> DecodeWindow:
        """Room for num_steps[i] one-token steps of each sequence, run back to back without the host."""
        start = self.check_step(seq_ids, num_steps)
        self.apply(self.manager.reserve(seq_ids, list(num_steps)))
        return self.decode_window(seq_ids, start, num_steps)

    def release_out_of_window(self, seq_id: Hashable) -> list[int]:
        """Free storage no future query of this sequence can see (sliding window); [] if none."""
        return self.manager.release_out_of_window(seq_id, self.window)

    def check_step(self, seq_ids: Sequence[Hashable], num_new_tokens: Sequence[int],
                   query_len: int | None = None, packed: bool = False) -> list[int]:
        """Validate a step before anything is reserved; -> each sequence's length before it."""
        if packed:
            if not self.can_pack:
                raise ValueError(f"{type(self).__name__} cannot take packed steps (can_pack is False: "
                                 f"{self.why_not_packed()})")
            if query_len is not None:
                raise ValueError("a packed step has no padding: give query_len or packed, not both")
        if len(seq_ids) != len(num_new_tokens) or not seq_ids:
            raise ValueError(
                f"prepare needs one token count per sequence, got {len(seq_ids)} ids and {len(num_new_tokens)} counts"
            )
        if query_len is not None and query_len < max(num_new_tokens):
            raise ValueError(f"query_len {query_len} is shorter than the longest row ({max(num_new_tokens)} tokens)")
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError(f"duplicate sequence ids in one step: {list(seq_ids)}")
        context = []
        for seq_id, n in zip(seq_ids, num_new_tokens):
            length = self.manager.length(seq_id)
            if n < 1:
                raise ValueError(f"sequence {seq_id!r}: a step needs at least 1 new token, got {n}")
            if length + n > self.max_seq_len:
                raise ContextTooLongError(
                    f"sequence {seq_id!r} would reach {length + n} tokens, over this cache's max_seq_len of "
                    f"{self.max_seq_len}"
                )
            context.append(length)
        return context

    # -- the device side: what a model runner calls --------------------------------------------
    def init_slots(self, slots: Sequence[int]) -> None:
        """Sequences that just started hold these slots: reset their device state (Mamba state to zero)."""
        if self.state_pool is not None:
            self.state_pool.zero(list(slots))

    def apply(self, grants: Sequence[PageGrant]) -> None:
        """Write the manager's page grants into the device tables (and copy-on-write pages)."""

    def capture_after_decode(self, seq_ids: Sequence[Hashable]) -> None:
        """After a decode window: store the Mamba-state checkpoints the KV manager wants at these sequences'
        current lengths (the paged cache of a hybrid with prefix caching; nothing to store here)."""

    def build_meta(self, seq_ids: Sequence[Hashable], context: Sequence[int], num_new_tokens: Sequence[int],
                   query_len: int | None = None, packed: bool = False) -> StepMeta:
        """The step's metadata for sequences holding `context` tokens before it and room for the new ones."""
        base, positions = self._base_meta(list(context), list(num_new_tokens), seq_ids, query_len, packed)
        return self._build_meta(base, seq_ids, context, list(num_new_tokens), positions)

    def decode_window(self, seq_ids: Sequence[Hashable], start_positions: Sequence[int],
                      num_steps: Sequence[int]) -> DecodeWindow:
        """The host inputs of a decode window whose room is already reserved and applied."""
        slots = None
        if self.state_pool is not None:
            slots = [self.manager.slot_of(s) for s in seq_ids]
        return DecodeWindow(list(start_positions), list(num_steps), self._window_rows(seq_ids), slots)

    @property
    def can_pack(self) -> bool:
        return self.why_not_packed() is None

    def why_not_packed(self) -> str | None:
        """None if prepare(packed=True) works, else the reason it does not."""
        return "only the paged cache lays out packed steps"

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
            slots = torch.tensor([self.manager.slot_of(s) for s in seq_ids], dtype=torch.int64, device=device)
        return dict(
            checkpoints=self._checkpoint_targets(seq_ids, context, num_new),
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

    def _checkpoint_targets(self, seq_ids, context, num_new) -> CheckpointTargets | None:
        """The Mamba states the KV manager wants checkpointed during this step (prefix caching of a hybrid)."""
        if self.state_pool is None or self.manager.checkpoints is None:
            return None
        targets = [(row, n, pages) for row, (seq_id, start, count) in enumerate(zip(seq_ids, context, num_new))
                   for n, pages in self.manager.capture_targets(seq_id, start, count)]
        if not targets:
            return None
        rows, counts, pages = zip(*targets)
        return CheckpointTargets(torch.tensor(rows), torch.tensor(counts), list(pages))

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

    def window_meta(self, positions, rows, state_slots, inputs, layout, bounds=None) -> StepMeta:
        """The StepMeta of one window step from the buffers and window_inputs' result.

        bounds: (the window's longest end, whether every row is at one position), known on the host
        for eager steps (None under CUDA graphs, which need fixed shapes)."""
        raise NotImplementedError

    def layer_index(self, layer_idx: int) -> int:
        """Position of a model layer among the cached attention layers."""
        try:
            return self._layer_slot[layer_idx]
        except KeyError:
            raise ValueError(f"layer {layer_idx} is not an attention layer of this cache") from None

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
        if self.state_pool is None:
            return 0
        return self.manager.num_seqs * self.spec.state_spec.bytes_per_sequence
