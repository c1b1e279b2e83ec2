"""The paged KV cache: a shared pool of fixed-size pages per attention layer and per-step page metadata.

Pool layout per layer (what both FlexAttention and the Triton decode kernel read):

    keys[layer] : (Hkv, (num_pages + 1) * page_size, D)      slot = page * page_size + offset
                   page num_pages is a scratch page: padded query tokens write there, nothing reads it

    sequence s:  block_table[s] = [p7, p2, p9]    logical page j -> physical page
                 token at logical position t lives in slot block_table[s][t // ps] * ps + t % ps

A physical page sits at the same logical index in every sequence that holds it (shared pages are
always a common prefix), so one int32 array page_logical[physical page] -> logical page index
lets a mask_mod turn a pool slot back into a token position without a per-sequence inverse table.
"""

import math
from dataclasses import dataclass
from typing import Hashable, Sequence

import torch

from fms.cache.allocator import OutOfPagesError
from fms.cache.base import SequenceCache
from fms.cache.kv_manager import KVManager, PageGrant
from fms.cache.metadata import DecodeWindow, MemoryStats, StepMeta, segment_ids
from fms.cache.spec import KVCacheSpec
from fms.cache.state import CheckpointLayout, CheckpointStore
from fms.triton.copy_pages import copy_pages, pool_address_table

__all__ = ["PagedKVCache", "PagedStepMeta", "VarlenMeta", "PaddedKV", "DecodeWindow", "OutOfPagesError", "SUPPORTED_PAGE_SIZES", "pages_for_budget"]

# FlexAttention's KV mask block is one page; Triton tiles need at least 16 rows.
SUPPORTED_PAGE_SIZES = (16, 32, 64, 128, 256)
Q_BLOCK_SIZE = 128


def validate_page_size(page_size: int) -> int:
    if page_size not in SUPPORTED_PAGE_SIZES:
        raise ValueError(
            f"page_size {page_size} cannot be used by the paged kernels; allowed: {list(SUPPORTED_PAGE_SIZES)} "
            "(one page is one FlexAttention KV mask block, which must be a power of two of at least 16)"
        )
    return page_size


def pages_for_budget(spec: KVCacheSpec, page_size: int, memory_gb: float | None = None,
                     memory_fraction: float | None = None) -> int:
    """Pages that fit in a byte budget, given in GB or as a fraction of free GPU memory."""
    page_bytes = spec.kv_bytes_per_token * page_size
    if memory_gb is not None:
        if memory_gb <= 0:
            raise ValueError(f"memory_gb must be > 0, got {memory_gb}")
        budget = memory_gb * 1e9
    elif memory_fraction is not None:
        if not 0 < memory_fraction <= 1:
            raise ValueError(f"memory_fraction must be in (0, 1], got {memory_fraction}")
        if spec.device.type != "cuda":
            raise ValueError("memory_fraction sizes the pool from free GPU memory; on CPU give num_pages or memory_gb")
        budget = torch.cuda.mem_get_info(spec.device)[0] * memory_fraction
    else:
        raise ValueError("give one of num_pages, memory_gb, memory_fraction")
    return max(int(budget // page_bytes) - 1, 0)


@dataclass(frozen=True)
class VarlenMeta:
    """A multi-token step's rows as packed runs (fms.triton.varlen): the real query tokens
    back to back, and each row's keys (cached context, then the step's tokens) back to back."""

    cu_q: torch.Tensor  # (B+1,) int32: row b's queries are packed tokens cu_q[b] .. cu_q[b+1]-1
    cu_k: torch.Tensor  # (B+1,) int32: same for its keys (context + new tokens)
    max_lens: torch.Tensor  # (2,) int64 on the host: longest query run, longest key run
    q_index: torch.Tensor | None  # (total_q,) flat B*T index of each real query; None: the input is packed
    kv_slots: torch.Tensor | None  # (total_k,) pool slot of each key; None: padded step, no row has context


@dataclass(frozen=True)
class PaddedKV:
    """A padded multi-token step's keys as a (B, L) grid, for one batched SDPA call per layer where
    flash varlen cannot run (fp32, or off CUDA). L is the longest row's length after the step.

        kv_slots[b] = [slot of position 0, 1, .., lens[b] - 1, lens[b] - 1, .., lens[b] - 1]   (L columns)
        mask[b, 0, i, j] = j <= position of query i  and  j < lens[b]

    The padding repeats the row's last key (masked out) rather than reading scratch or unused slots:
    SDPA adds a boolean mask as -inf to the scores, so a NaN key there (e.g. a page's old bytes)
    would still make the row NaN (checked on the CPU, torch 2.13).

    Both None on a step where no row has cached context: each row's keys are the step's own
    (B, Hkv, T, D), and causal attention over them is exact for every real query."""

    kv_slots: torch.Tensor | None  # (B, L) int64 pool slots
    mask: torch.Tensor | None  # (B, 1, T, L) bool


@dataclass(frozen=True)
class PagedStepMeta(StepMeta):
    page_size: int = 16
    slot_mapping: torch.Tensor | None = None  # (B*T,) pool slot of each query token (padding -> scratch)
    # the decode kernel's inputs, set on one-token steps only
    page_table: torch.Tensor | None = None  # (B, W) int32 physical page of logical page j; W fixed per cache
    seq_lens: torch.Tensor | None = None  # (B,) int32 tokens held after this step
    q_start: torch.Tensor | None = None  # (B,) int64 logical position of each row's first query
    block_mask: object | None = None  # FlexAttention BlockMask over the pool, shared by all layers
    page_logical: torch.Tensor | None = None  # (num_pages + 1,) int32
    window: int | None = None
    block_mask_builder: object | None = None  # builds block_mask on first use
    varlen: VarlenMeta | None = None  # packed steps; padded multi-token steps build it on first use
    varlen_builder: object | None = None  # padded multi-token steps: builds varlen on first use
    padded_kv: PaddedKV | None = None
    padded_kv_builder: object | None = None  # padded multi-token steps: builds padded_kv on first use

    def get_block_mask(self):
        """The step's BlockMask, built on first use: decode steps on the Triton kernel never need one."""
        if self.block_mask is None and self.block_mask_builder is not None:
            object.__setattr__(self, "block_mask", self.block_mask_builder())
        return self.block_mask

    def get_varlen(self) -> VarlenMeta | None:
        """The step's packed runs (None on one-token steps). A packed step carries them; a padded multi-token
        step builds them when the first layer asks, so steps that run padded SDPA (fp32, off flash) never pay
        for their host work and copies."""
        if self.varlen is None and self.varlen_builder is not None:
            object.__setattr__(self, "varlen", self.varlen_builder())
        return self.varlen

    def get_padded_kv(self) -> PaddedKV:
        """The step's padded key grid, built by the first layer that asks (once per step; steps on
        flash varlen never build it), then shared read-only by every layer."""
        if self.padded_kv is None:
            if self.padded_kv_builder is None:
                raise ValueError("this step has no padded key grid: only padded (not packed) multi-token "
                                 "steps of a paged cache have one")
            object.__setattr__(self, "padded_kv", self.padded_kv_builder())
        return self.padded_kv


class PagedKVCache(SequenceCache):
    """K/V pages of every attention layer in one pool per layer, laid out by the KV manager's page ids.

    manager: the driver's KVManager (its page_size and page count size the pool); without one the
    cache makes its own from page_size and num_pages / memory_gb / memory_fraction (default: room
    for every sequence at full length).
    """

    def __init__(
        self,
        spec: KVCacheSpec,
        max_batch_size: int,
        max_seq_len: int,
        page_size: int | None = None,
        num_pages: int | None = None,
        memory_gb: float | None = None,
        memory_fraction: float | None = None,
        manager: KVManager | None = None,
    ):
        if manager is None:
            page_size = validate_page_size(16 if page_size is None else page_size)
            if num_pages is None:
                if (memory_gb is None and memory_fraction is None) or not spec.attention_layers:
                    # Enough for every sequence at full length: the safe default for a static batch. With
                    # no attention layers (an all-Mamba hybrid) a page stores nothing, so no budget limits them.
                    num_pages = max_batch_size * math.ceil(max_seq_len / page_size)
                else:
                    num_pages = pages_for_budget(spec, page_size, memory_gb, memory_fraction)
            if isinstance(num_pages, bool) or not isinstance(num_pages, int) or num_pages < 1:
                raise ValueError(f"the page pool needs num_pages >= 1, got num_pages={num_pages!r}")
            manager = KVManager(num_pages, page_size, max_num_seqs=max_batch_size)
        else:
            validate_page_size(manager.page_size)
            given = {k: v for k, v in dict(page_size=page_size, num_pages=num_pages, memory_gb=memory_gb,
                                           memory_fraction=memory_fraction).items() if v is not None}
            if given and given != {"page_size": manager.page_size}:
                raise ValueError(f"with a KV manager the pool is the manager's (page_size {manager.page_size}, "
                                 f"{manager.num_pages} pages); got {given} as well")
        super().__init__(spec, max_batch_size, max_seq_len, manager)
        self.page_size = manager.page_size
        self.num_pages = manager.num_pages
        self.max_pages_per_seq = math.ceil(max_seq_len / self.page_size)
        self.num_slots = (self.num_pages + 1) * self.page_size
        shape = (spec.num_kv_heads, self.num_slots, spec.head_dim)
        # One tensor per layer, not one (layers, ...) block: a layer's view of a shared block starts
        # past 2**31 elements once the pool is large, which FlexAttention's kernels cannot address.
        self.keys = [torch.zeros(shape, dtype=spec.dtype, device=spec.device) for _ in spec.attention_layers]
        self.values = [torch.zeros(shape, dtype=spec.dtype, device=spec.device) for _ in spec.attention_layers]
        self.page_logical = torch.zeros(self.num_pages + 1, dtype=torch.int32, device=spec.device)
        # the pools' data pointers on the device, for the one-launch page copy: built (and the pools checked) once,
        # here, not inside the first step that copies a page
        self._kv_pools = [*self.keys, *self.values]  # every layer's K then V pool, as the page copy takes them
        self._pool_addresses = pool_address_table(self._kv_pools) if self._kv_pools else None
        self.scratch_page = self.num_pages
        self.window = spec.sliding_window
        # Host copy of every live sequence's page table, one row per KV-manager slot, written only
        # where grants change it; a step gathers its rows instead of rebuilding tables from lists.
        self._host_table = torch.zeros(max_batch_size, self.max_pages_per_seq, dtype=torch.int32)
        self._host_rows = self._host_table.numpy()  # the same memory, for apply's small writes
        # Mamba-state checkpoints of the prefix cache (hybrid models), in the bytes of these pages
        self.checkpoint_store = None
        if self.state_pool is not None and manager.checkpoints is not None:
            layout = CheckpointLayout.for_spec(spec, self.page_size)
            if layout is None or layout.num_pages != manager.checkpoints.num_pages:
                raise ValueError(f"the KV manager's checkpoints take {manager.checkpoints.num_pages} pages but this "
                                 f"cache's layout needs {None if layout is None else layout.num_pages}; build the "
                                 "policy from CheckpointLayout.for_spec(spec, page_size)")
            self.checkpoint_store = CheckpointStore(layout, self._kv_pools, self.state_pool)

    # -- sequences -------------------------------------------------------------------------
    def add(self, seq_id: Hashable, prefix_pages: Sequence[int] = (), prefix_len: int = 0) -> None:
        """Start a sequence; with prefix_pages, it begins holding those (shared) pages and prefix_len tokens.

        prefix_pages are pages already in the pool holding a prefix's K/V (a prefix cache's pages),
        as logical pages 0..; the next prepare() computes from position prefix_len on.
        """
        if (prefix_pages or prefix_len) and self.state_pool is not None and self.checkpoint_store is None:
            raise NotImplementedError("a cached prefix holds no recurrent (Mamba) state to resume from without "
                                      "checkpoints: give the KV manager a CheckpointPolicy with prefix caching")
        if prefix_len > self.max_seq_len:
            raise ValueError(f"prefix_len {prefix_len} exceeds this cache's max_seq_len of {self.max_seq_len}")
        slot, grant = self.manager.add(seq_id, prefix_pages, prefix_len)
        self.init_slots([slot])
        if grant is not None:
            self.apply([grant])

    @property
    def can_fork(self) -> bool:
        return self.state_pool is None

    def fork_many(self, pairs: Sequence[tuple[Hashable, Hashable]]) -> None:
        """Each child starts as its parent's copy, sharing its pages (copy-on-write of a partial last page); one
        page-table update for all. A pair that fails (unknown parent, a child that exists, no free slot) undoes
        the pairs before it."""
        if self.state_pool is not None:
            raise NotImplementedError("forking a sequence with recurrent state is not supported")
        done, slots, grants = [], [], []
        try:
            for parent, child in pairs:
                slot, grant = self.manager.fork(parent, child)
                done.append(child)
                slots.append(slot)
                grants.append(grant)
        except Exception:
            for child in done:
                self.manager.free(child)
            raise
        self.init_slots(slots)
        # A child holds its parent's pages at the parent's logical indices, which page_logical maps already, and
        # copies nothing until it grows: only its host row changes.
        _, _, copies = self._write_rows(grants)
        assert not copies, "a fork copies nothing until the child grows"

    def block_table(self, seq_id) -> list[int]:
        return self.manager.block_table(seq_id)

    # -- applying the manager's decisions ------------------------------------------------------
    def init_slots(self, slots: Sequence[int]) -> None:
        super().init_slots(slots)
        self._host_rows[list(slots)] = 0

    def apply(self, grants: Sequence[PageGrant]) -> None:
        if self.checkpoint_store is not None:
            # before this step's writes and reads: pages that held checkpoint bytes may hold K/V from now on
            scrub = self.manager.take_pages_to_scrub()
            if scrub:
                self.checkpoint_store.scrub(scrub)
        changed_pages, changed_logical, copies = self._write_rows(grants)
        self._set_logical(changed_pages, changed_logical)  # one device update for the whole step
        if copies:
            self._copy_pages(copies)
        restores = [g for g in grants if g.restore]
        if restores:  # a prefix hit: the sequence's Mamba state starts from the checkpoint at its end
            self.checkpoint_store.restore([self.manager.slot_of(g.seq_id) for g in restores],
                                          [g.restore for g in restores])

    def _write_rows(self, grants: Sequence[PageGrant]) -> tuple[list[int], list[int], list[tuple[int, int]]]:
        """Write the grants' entries into the host page table; -> (pages held, their logical indices, copies)."""
        changed_pages, changed_logical, copies = [], [], []
        table = self._host_rows  # numpy view of the host table: a row slice written from a tuple costs ~1 us
        for grant in grants:
            pages, start = grant.pages, grant.start
            if not pages:
                continue
            end = start + len(pages)
            row = table[self.manager.slot_of(grant.seq_id)]
            if min(pages) >= 0:
                row[start:end] = pages
                changed_pages += pages
                changed_logical += range(start, end)
            else:  # RELEASED (-1) entries (a fork of a sliding-window sequence) read as page 0, no logical index
                row[start:end] = [max(p, 0) for p in pages]
                held = [(p, j) for j, p in enumerate(pages, start) if p >= 0]
                changed_pages += [p for p, _ in held]
                changed_logical += [j for _, j in held]
            copies += grant.copies
        return changed_pages, changed_logical, copies

    def capture_after_decode(self, seq_ids: Sequence[Hashable]) -> None:
        """After a decode window (one-token steps outside build_meta): checkpoint the states the KV manager
        wants at the sequences' current length from their slots (a prompt's last token run as a decode row).
        A wanted state inside a window of several steps is gone: its storage goes back (dropped)."""
        if self.checkpoint_store is None:
            return
        slots, pages = [], []
        for seq_id in seq_ids:
            length = self.manager.length(seq_id)
            for boundary, target in self.manager.capture_targets(seq_id, 0, length):
                if boundary == length:
                    slots.append(self.manager.slot_of(seq_id))
                    pages.append(target)
            self.manager.drop_captures(seq_id, below=length)
        if slots:
            self.checkpoint_store.capture(slots, pages)

    def _set_logical(self, pages, logical):
        if pages:  # one host-to-device copy: row 0 the pages (int32 indices), row 1 their logical index
            both = torch.tensor([pages, logical], dtype=torch.int32).to(self.spec.device, non_blocking=True)
            self.page_logical.index_put_((both[0],), both[1])

    def _copy_pages(self, copies: Sequence[tuple[int, int]]):
        """Copy-on-write: (src, dst) pages' K/V in every layer, one launch on CUDA (fms.triton.copy_pages)."""
        if not self._kv_pools:  # no attention layer holds pages
            return
        pairs = torch.tensor(copies, dtype=torch.int64).to(self.spec.device, non_blocking=True)
        copy_pages(self._kv_pools, pairs, self.page_size, self._pool_addresses)

    def why_not_packed(self) -> str | None:
        return None  # Mamba layers take packed steps too (Mamba2Mixer, cu_seqlens)

    def _build_meta(self, base, seq_ids, context, num_new, positions):
        ps, width = self.page_size, self.max_pages_per_seq
        device = self.spec.device
        b, t, packed = len(seq_ids), base["query_len"], base["packed"]
        rows = torch.tensor([self.manager.slot_of(s) for s in seq_ids])
        table = self._host_table.index_select(0, rows)  # (B, W)
        ctx = torch.tensor(context, dtype=torch.int64)
        new = torch.tensor(num_new, dtype=torch.int64)
        if packed:
            slots = self._slots(table, segment_ids(new), positions[0])  # (N,) all real
        else:
            pos = positions  # (B, T)
            is_real = torch.arange(t)[None, :] < new[:, None]
            page_of = torch.gather(table, 1, (pos // ps).clamp_max(width - 1)).long()
            slots = page_of * ps + pos % ps
            scratch = self.scratch_page * ps + torch.arange(t)[None, :].expand(b, -1) % ps
            slots = torch.where(is_real, slots, scratch)
        # The page table and lengths on the device serve one-token steps (the decode kernel); a multi-token
        # step reads its keys through slots, and only a FlexAttention step's BlockMask needs the table.
        one_token = not packed and t == 1
        table_d = table.to(device, non_blocking=True) if one_token else None
        q_start = base["context_lens"]
        num_new_d, kv_len, page_logical, window = base["num_new_tokens"], self.num_slots, self.page_logical, self.window

        def block_mask():
            if packed:
                raise ValueError("a packed step has no BlockMask: FlexAttention takes padded (B, T) steps")
            rows = table_d if table_d is not None else table.to(device, non_blocking=True)
            return build_paged_block_mask(rows, q_start, num_new_d, t, ps, page_logical, kv_len, window)

        varlen = varlen_builder = None
        if packed:  # Mamba layers read its cu_q too
            varlen = self._varlen_meta(table, ctx, new, t, packed)
        elif t > 1:

            def varlen_builder():
                return self._varlen_meta(table, ctx, new, t, packed)

        padded_kv = None
        if not packed and t > 1:
            positions_d, has_context = base["position_ids"], base["has_context"]

            def padded_kv():
                return self._padded_kv(table, ctx + new, positions_d, has_context)

        return PagedStepMeta(
            **base,
            page_size=ps,
            slot_mapping=slots.flatten().to(device, non_blocking=True),
            page_table=table_d,
            seq_lens=(ctx + new).to(torch.int32).to(device, non_blocking=True) if one_token else None,
            q_start=q_start,
            block_mask_builder=block_mask,
            page_logical=self.page_logical,
            window=self.window,
            varlen=varlen,
            varlen_builder=varlen_builder,
            padded_kv_builder=padded_kv,
        )

    def _slots(self, table: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Pool slot of token position pos[i] of table row rows[i] (host tensors; table (B, W))."""
        ps = self.page_size
        return table.view(-1).index_select(0, rows * table.shape[1] + pos // ps).long() * ps + pos % ps

    def _varlen_meta(self, table, ctx, new, t, packed) -> VarlenMeta:
        device = self.spec.device
        lens = ctx + new
        zero = torch.zeros(1, dtype=torch.int64)
        cu_q = torch.cat([zero, torch.cumsum(new, 0)])
        cu_k = torch.cat([zero, torch.cumsum(lens, 0)])
        q_index = None
        if not packed:
            q_index = (torch.arange(t)[None, :] < new[:, None]).flatten().nonzero()[:, 0]
            q_index = q_index.to(device, non_blocking=True)
        kv_slots = None
        # packed steps always gather (one compiled graph for fresh and resumed rows alike)
        if packed or bool((ctx > 0).any()):
            row_of = segment_ids(lens)
            pos = torch.arange(int(cu_k[-1])) - cu_k[:-1].index_select(0, row_of)
            kv_slots = self._slots(table, row_of, pos).to(device, non_blocking=True)
        return VarlenMeta(
            cu_q=cu_q.to(torch.int32).to(device, non_blocking=True),
            cu_k=cu_k.to(torch.int32).to(device, non_blocking=True),
            max_lens=torch.tensor([int(new.max()), int(lens.max())], dtype=torch.int64),
            q_index=q_index,
            kv_slots=kv_slots,
        )

    def _padded_kv(self, table, lens, positions, has_context) -> PaddedKV:
        """table (B, W) and lens (B,) on the host; positions (B, T) the step's position_ids on the device."""
        if not has_context:
            return PaddedKV(kv_slots=None, mask=None)
        ps, device = self.page_size, self.spec.device
        max_len = int(lens.max())
        pos = torch.minimum(torch.arange(max_len)[None, :], lens[:, None] - 1)  # (B, L) key positions
        kv_slots = torch.gather(table, 1, pos // ps).long() * ps + pos % ps
        lens_d = lens.to(device, non_blocking=True)
        key_pos = torch.arange(max_len, device=device)
        mask = (key_pos[None, None, :] <= positions[:, :, None]) & (key_pos[None, None, :] < lens_d[:, None, None])
        return PaddedKV(kv_slots=kv_slots.to(device, non_blocking=True), mask=mask[:, None])  # mask (B, 1, T, L)

    # -- decode windows (see SequenceCache.prepare_decode_window) ----------------------------
    @property
    def window_row_width(self) -> int:
        return self.max_pages_per_seq

    def _window_rows(self, seq_ids) -> torch.Tensor:
        return self._host_table.index_select(0, torch.tensor([self.manager.slot_of(s) for s in seq_ids]))

    def idle_window_rows(self, start, end):
        return torch.full((end - start, self.max_pages_per_seq), self.scratch_page, dtype=torch.int32)

    def window_inputs(self, positions, ends, rows):
        ps = self.page_size
        pos = positions[:, 0]
        active = pos < ends
        page = rows.gather(1, (pos // ps).clamp_max(self.max_pages_per_seq - 1)[:, None])
        # idle rows write the scratch page, each its own slot of it
        scratch = self.scratch_page * ps + torch.arange(pos.shape[0], device=pos.device) % ps
        slots = torch.where(active, page[:, 0].long() * ps + pos % ps, scratch)
        seq_lens = torch.where(active, pos + 1, 1).to(torch.int32)
        return active, active.long(), pos, slots, seq_lens

    def window_meta(self, positions, rows, state_slots, inputs, layout, bounds=None):
        _, num_new, pos, slots, seq_lens = inputs
        ps, page_logical, kv_len, window = self.page_size, self.page_logical, self.num_slots, self.window

        def block_mask():  # only for FlexAttention decoding (ALiBi, soft-capping); never inside a graph
            return build_paged_block_mask(rows, pos, num_new, 1, ps, page_logical, kv_len, window)

        return PagedStepMeta(
            position_ids=positions, num_new_tokens=num_new, context_lens=pos, query_len=1,
            max_context_len=self.max_seq_len, state_slots=state_slots, page_size=ps, slot_mapping=slots,
            page_table=rows, seq_lens=seq_lens, q_start=pos, page_logical=page_logical, window=window,
            block_mask_builder=block_mask,
        )

    def layer_kv(self, layer_idx: int):
        i = self.layer_index(layer_idx)
        return self.keys[i], self.values[i]

    def pool_tensors(self) -> list[torch.Tensor]:
        return [*self._kv_pools, *super().pool_tensors()]

    # -- statistics ------------------------------------------------------------------------
    def memory_stats(self) -> MemoryStats:
        page_bytes = self.spec.kv_bytes_per_token * self.page_size
        fill: dict[int, int] = {}
        kv = self.manager
        for seq_id in kv.sequences:
            length = kv.length(seq_id)
            for j, page in enumerate(kv.block_table(seq_id)):
                if page >= 0:
                    fill[page] = max(fill.get(page, 0), min(self.page_size, length - j * self.page_size))
        return MemoryStats(
            bytes_allocated=self.num_pages * page_bytes,
            bytes_in_use=kv.allocator.num_used * page_bytes,
            bytes_holding_tokens=sum(fill.values()) * self.spec.kv_bytes_per_token,
            pages_in_use=kv.allocator.num_used,
            num_pages=self.num_pages,
            state_bytes=self._state_bytes(),
            extra={"page_size": self.page_size, "checkpoint_bytes": kv.stats().checkpoint_bytes},
        )


def build_paged_block_mask(page_table, q_start, num_new, query_len, page_size, page_logical, kv_len, window):
    """A FlexAttention BlockMask over the page pool, straight from the compact page table.

    For query block i of row b (logical positions q_lo..q_hi) the visible logical pages split into
    pages every query sees whole (full blocks: no mask_mod call) and pages at the causal edge or the
    window edge (partial blocks: mask_mod decides per token). Indices are physical pages.
    """
    from torch.nn.attention.flex_attention import BlockMask

    device = page_table.device
    b, width = page_table.shape
    q_block = Q_BLOCK_SIZE
    n_qb = math.ceil(query_len / q_block)
    blk = torch.arange(n_qb, device=device)
    q_lo = q_start[:, None] + blk[None, :] * q_block  # (B, Qb)
    q_hi = q_start[:, None] + torch.minimum((blk[None, :] + 1) * q_block, num_new[:, None]) - 1
    q_hi = torch.maximum(q_hi, q_lo)  # blocks made only of padding still see position q_lo
    last = q_hi // page_size  # last visible page
    full_end = (q_lo + 1) // page_size  # pages [.., full_end) are fully visible to every query
    if window is None:
        first_visible = torch.zeros_like(q_lo)
        full_start = torch.zeros_like(q_lo)
    else:
        first_visible = (q_lo - window + 1).clamp_min(0) // page_size
        full_start = torch.div((q_hi - window + 1).clamp_min(0) + page_size - 1, page_size, rounding_mode="floor")
    full_start = torch.minimum(full_start, full_end)
    n_full = (full_end - full_start).clamp_min(0)
    n_front = (full_start - first_visible).clamp_min(0)  # window-edge partial pages
    back_start = torch.maximum(full_end, full_start)
    n_back = (last - back_start + 1).clamp_min(0)  # causal-edge partial pages
    j = torch.arange(width, device=device)[None, None, :]
    partial_logical = torch.where(
        j < n_front[..., None], first_visible[..., None] + j, back_start[..., None] + (j - n_front[..., None])
    ).clamp(0, width - 1)
    full_logical = (full_start[..., None] + j).clamp(max=width - 1)
    table = page_table.long()[:, None, :].expand(-1, n_qb, -1)
    kv_indices = torch.gather(table, 2, partial_logical).to(torch.int32)[:, None]  # (B, 1, Qb, W)
    full_indices = torch.gather(table, 2, full_logical).to(torch.int32)[:, None]
    kv_num = (n_front + n_back).to(torch.int32)[:, None]  # (B, 1, Qb)
    full_num = n_full.to(torch.int32)[:, None]

    def paged_mask(b_idx, h_idx, q_idx, kv_idx):
        page = kv_idx // page_size
        logical_page = page_logical[page]
        # Compiled kernels only visit this row's pages; eager FlexAttention evaluates every pool slot,
        # so the page must also be checked to belong to row b.
        owned = page_table[b_idx, logical_page.clamp(0, width - 1)] == page
        logical = logical_page * page_size + kv_idx % page_size
        q_pos = q_start[b_idx] + q_idx
        visible = owned & (logical <= q_pos)
        if window is not None:
            visible = visible & (q_pos - logical < window)
        return visible

    kwargs = dict(BLOCK_SIZE=(q_block, page_size), mask_mod=paged_mask, seq_lengths=(query_len, kv_len))
    try:
        return BlockMask.from_kv_blocks(kv_num, kv_indices, full_num, full_indices, compute_q_blocks=False, **kwargs)
    except TypeError:  # torch without compute_q_blocks
        return BlockMask.from_kv_blocks(kv_num, kv_indices, full_num, full_indices, **kwargs)
