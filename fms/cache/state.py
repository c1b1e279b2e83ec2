"""Per-sequence Mamba2 state slots beside the KV cache (the device pool; slot ids are the KV manager's).

State pool (one per cache, all Mamba layers):

    conv[mamba layer i] : (num_slots + 1, conv_dim, K-1)          model dtype
    ssm [mamba layer i] : (num_slots + 1, heads, head_dim, N)     fp32 (the recurrence accumulates over
                                                                   the whole sequence; bf16 would drift)
    slot -> row in both: the KV manager's slot of a sequence (zeroed when the sequence starts)
    row num_slots is a scratch slot: padded rows of a CUDA-graph batch read and write it, no sequence holds it

Each layer's tensors are separate allocations, not views of one block: under torch.compile a write
through a view of a graph input is replayed onto its whole base (a copy of every slot of every layer),
and a step touches only its rows. A decode step updates its rows' SSM states in place, one fused kernel
reading and writing each row once (fms.triton.mamba_decode), and gathers and scatters back the
small conv states; a multi-token step gathers both (index_select), runs, and scatters them back (index_copy_).
"""

from dataclasses import dataclass

import torch



@dataclass(frozen=True)
class MambaStateSpec:
    """One sequence's recurrent state in every Mamba layer: its shapes, and so its bytes per slot."""

    layers: tuple[int, ...]  # model layer indices that are Mamba layers
    dtype: torch.dtype  # of the conv state; the SSM state is fp32
    conv_dim: int
    conv_kernel: int
    num_heads: int
    head_dim: int
    state_size: int

    @property
    def bytes_per_layer(self) -> int:
        conv = self.conv_dim * (self.conv_kernel - 1) * torch.empty((), dtype=self.dtype).element_size()
        return conv + self.num_heads * self.head_dim * self.state_size * 4

    @property
    def bytes_per_sequence(self) -> int:
        return len(self.layers) * self.bytes_per_layer


class MambaLayerPools:
    """One Mamba layer's conv and SSM state pools, standing in for the MambaStatePool in a decode step of that layer:
    layer_pools answers with them whatever the layer index, so that a compiled function taking them as inputs
    serves every Mamba layer with one trace."""

    def __init__(self, conv: torch.Tensor, ssm: torch.Tensor):
        self.conv, self.ssm = conv, ssm

    def layer_pools(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.conv, self.ssm


class MambaStatePool:
    def __init__(self, spec: MambaStateSpec, num_slots: int, device):
        c = spec
        self.spec = spec
        n = len(spec.layers)
        self.conv = [torch.zeros(num_slots + 1, c.conv_dim, c.conv_kernel - 1, dtype=spec.dtype, device=device)
                     for _ in range(n)]
        self.ssm = [torch.zeros(num_slots + 1, c.num_heads, c.head_dim, c.state_size, dtype=torch.float32,
                                device=device) for _ in range(n)]
        self.scratch_slot = num_slots
        self._layer = {layer: i for i, layer in enumerate(spec.layers)}

    @property
    def tensors(self) -> list[torch.Tensor]:
        return [*self.conv, *self.ssm]

    @property
    def num_slots(self) -> int:
        return self.scratch_slot

    def zero(self, slots: list[int]) -> None:
        """A new sequence starts from the zero state in each of its (KV manager's) slots."""
        if not slots:
            return
        idx = torch.tensor(slots, dtype=torch.int64).to(self.conv[0].device if self.conv else "cpu")
        for conv, ssm in zip(self.conv, self.ssm):
            conv.index_fill_(0, idx, 0)
            ssm.index_fill_(0, idx, 0)

    def layer_pools(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(conv, ssm) of one Mamba layer, every slot."""
        i = self._layer[layer_idx]
        return self.conv[i], self.ssm[i]

    def layer_view(self, layer_idx: int) -> "MambaLayerPools":
        """One layer's (conv, ssm) pools, answering layer_pools(any index) with them (fms.runtime.compiled)."""
        return MambaLayerPools(*self.layer_pools(layer_idx))

    def layer_state(self, layer_idx: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A gathered copy (conv, ssm) of the rows (only those rows are read); write it back with store()."""
        conv, ssm = self.layer_pools(layer_idx)
        return conv.index_select(0, slots), ssm.index_select(0, slots)

    def store(self, layer_idx: int, slots: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor) -> None:
        """Write the rows back (only those rows are written)."""
        conv, ssm = self.layer_pools(layer_idx)
        conv.index_copy_(0, slots, conv_state)
        ssm.index_copy_(0, slots, ssm_state)


# ---------------------------------------------------------------------------------------------------------------
# Prefix-cache checkpoints of the Mamba state, kept in the memory of KV pages: one byte budget for both.
# ---------------------------------------------------------------------------------------------------------------

CHECKPOINT_MAX_INTERVAL_TOKENS = 256
"""Checkpoints are never sparser than this: a partial prefix hit recomputes at most 255 tokens (one SSD
chunk of Granite-4.0-H)."""


@dataclass(frozen=True)
class CheckpointLayout:
    """Where one checkpoint (every Mamba layer's conv window and fp32 SSM state) lies in KV pages.

    A page of the paged pool is, in each attention layer's K and V tensor (Hkv, (num_pages + 1) * page_size, D),
    num_kv_heads runs of page_size * D elements: "pieces" of piece_bytes bytes, 2 * attention layers * Hkv
    pieces per page. A checkpoint takes num_pages whole pages and writes its bytes piece by piece:

        bytes:   [layer 0: conv | pad][layer 0: ssm | pad][layer 1: conv | pad] ...    (whole pieces each)
        piece g of a checkpoint held in pages q[0..c-1]:
                 tensor g // (Hkv * c), head (g // c) % Hkv, page q[g % c]

    so a layer's state is a few runs of pieces in one or two tensors (few copies), and the pages go back
    to the allocator like any other when the checkpoint is evicted.
    """

    state_spec: MambaStateSpec
    num_tensors: int  # K and V of every attention layer
    num_kv_heads: int
    piece_bytes: int
    page_size: int

    @classmethod
    def for_spec(cls, spec, page_size: int) -> "CheckpointLayout | None":
        """For a KVCacheSpec of a model with Mamba layers and attention layers; None otherwise (an all-Mamba
        model has no KV pages to hold checkpoints in)."""
        if spec.state_spec is None or not spec.attention_layers:
            return None
        itemsize = torch.empty((), dtype=spec.dtype).element_size()
        return cls(spec.state_spec, 2 * len(spec.attention_layers), spec.num_kv_heads,
                   page_size * spec.head_dim * itemsize, page_size)

    @property
    def conv_bytes(self) -> int:
        s = self.state_spec
        return s.conv_dim * (s.conv_kernel - 1) * torch.empty((), dtype=s.dtype).element_size()

    @property
    def ssm_bytes(self) -> int:
        s = self.state_spec
        return s.num_heads * s.head_dim * s.state_size * 4

    @property
    def conv_pieces(self) -> int:
        return -(-self.conv_bytes // self.piece_bytes)

    @property
    def pieces_per_layer(self) -> int:
        return self.conv_pieces + -(-self.ssm_bytes // self.piece_bytes)

    @property
    def pieces_per_page(self) -> int:
        return self.num_tensors * self.num_kv_heads

    @property
    def page_bytes(self) -> int:
        return self.pieces_per_page * self.piece_bytes

    @property
    def num_pages(self) -> int:
        """Pages one checkpoint takes."""
        return -(-len(self.state_spec.layers) * self.pieces_per_layer // self.pieces_per_page)

    @property
    def bytes(self) -> int:
        """What one checkpoint costs the budget: its whole pages."""
        return self.num_pages * self.page_bytes

    def policy(self, interval: int | None = None):
        """The KV manager's CheckpointPolicy for this layout (interval: default_interval())."""
        from fms.cache.kv_manager import CheckpointPolicy

        return CheckpointPolicy(self.num_pages, interval or self.default_interval(), self.bytes)

    def default_interval(self) -> int:
        """Pages between periodic checkpoints: as many pages as a checkpoint takes (checkpoints then hold at
        most half of a cached prefix's memory), but never sparser than CHECKPOINT_MAX_INTERVAL_TOKENS."""
        return max(1, min(self.num_pages, CHECKPOINT_MAX_INTERVAL_TOKENS // self.page_size))


class CheckpointStore:
    """Writes and reads checkpoints (CheckpointLayout) in the bytes of a paged pool's K/V tensors.

    kv_tensors: every (Hkv, (num_pages + 1) * page_size, D) pool tensor, in a fixed order; pool: the state pool
    whose slots checkpoints are captured from and restored into. Pages are given per checkpoint as a list of
    num_pages ids (the KV manager's).
    """

    def __init__(self, layout: CheckpointLayout, kv_tensors: list[torch.Tensor], pool: MambaStatePool):
        if len(kv_tensors) != layout.num_tensors:
            raise ValueError(f"the layout spans {layout.num_tensors} K/V tensors, got {len(kv_tensors)}")
        self.layout = layout
        self.pool = pool
        heads = layout.num_kv_heads
        self.pages_per_head = kv_tensors[0].shape[1] // layout.page_size  # num_pages + 1 (the scratch page)
        # (Hkv * (num_pages + 1), piece_bytes): row h * pages_per_head + page is one piece
        self.views = [t.view(torch.uint8).view(heads * self.pages_per_head, layout.piece_bytes) for t in kv_tensors]
        self.device = kv_tensors[0].device
        self._mamba_index = {layer: m for m, layer in enumerate(layout.state_spec.layers)}
        c, n = layout.num_pages, layout.pieces_per_layer
        per_tensor = heads * c
        self._runs = []  # per Mamba layer: (tensor, first piece, end piece, head (n,), page index (n,)) runs
        for m in range(len(layout.state_spec.layers)):
            runs = []
            g0, g1 = m * n, (m + 1) * n
            for t in range(g0 // per_tensor, (g1 - 1) // per_tensor + 1):
                lo, hi = max(g0, t * per_tensor), min(g1, (t + 1) * per_tensor)
                g = torch.arange(lo, hi)
                runs.append((t, lo - g0, hi - g0, (g // c) % heads, g % c))
            self._runs.append(runs)

    def _rows(self, pages: torch.Tensor, heads: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """(K, n) rows of the pieces for K checkpoints' pages (K, c)."""
        return (heads[None, :] * self.pages_per_head + pages[:, index]).flatten().to(self.device, non_blocking=True)

    def write(self, layer_idx: int, pages: list[list[int]], conv: torch.Tensor, ssm: torch.Tensor) -> None:
        """Store K checkpoints' state of one Mamba layer: conv [K, conv_dim, K-1], ssm [K, nh, P, N] fp32."""
        lay = self.layout
        k = len(pages)
        m = self._mamba_index[layer_idx]
        pb = lay.piece_bytes
        conv_b = conv.to(lay.state_spec.dtype).contiguous().view(torch.uint8).reshape(k, -1)
        ssm_b = ssm.float().contiguous().view(torch.uint8).reshape(k, -1)
        data = torch.zeros(k, lay.pieces_per_layer * pb, dtype=torch.uint8, device=self.device)
        data[:, :lay.conv_bytes] = conv_b
        data[:, lay.conv_pieces * pb: lay.conv_pieces * pb + lay.ssm_bytes] = ssm_b
        data = data.view(k, lay.pieces_per_layer, pb)
        page_ids = torch.tensor(pages, dtype=torch.int64)
        for t, j0, j1, heads, index in self._runs[m]:
            self.views[t].index_copy_(0, self._rows(page_ids, heads, index), data[:, j0:j1].reshape(-1, pb))

    def read(self, layer_idx: int, pages: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """K checkpoints' (conv, ssm) state of one Mamba layer."""
        lay, s = self.layout, self.layout.state_spec
        k = len(pages)
        m = self._mamba_index[layer_idx]
        pb = lay.piece_bytes
        data = torch.empty(k, lay.pieces_per_layer, pb, dtype=torch.uint8, device=self.device)
        page_ids = torch.tensor(pages, dtype=torch.int64)
        for t, j0, j1, heads, index in self._runs[m]:
            data[:, j0:j1] = self.views[t].index_select(0, self._rows(page_ids, heads, index)).view(k, j1 - j0, pb)
        data = data.view(k, -1)
        conv = data[:, :lay.conv_bytes].contiguous().view(s.dtype).view(k, s.conv_dim, s.conv_kernel - 1)
        start = lay.conv_pieces * pb
        ssm = data[:, start: start + lay.ssm_bytes].contiguous().view(torch.float32)
        return conv, ssm.view(k, s.num_heads, s.head_dim, s.state_size)

    def capture(self, slots: list[int], pages: list[list[int]]) -> None:
        """Checkpoint the state pool's slots (every Mamba layer) into these pages."""
        idx = torch.tensor(slots, dtype=torch.int64).to(self.device)
        for layer in self.layout.state_spec.layers:
            self.write(layer, pages, *self.pool.layer_state(layer, idx))

    def restore(self, slots: list[int], pages: list[list[int]]) -> None:
        """Copy checkpoints into the state pool's slots (every Mamba layer)."""
        idx = torch.tensor(slots, dtype=torch.int64).to(self.device)
        for layer in self.layout.state_spec.layers:
            self.pool.store(layer, idx, *self.read(layer, pages))

    def scrub(self, pages: list[int]) -> None:
        """Zero pages that held checkpoint bytes before they hold K/V again: attention kernels may read a page's
        unwritten tail (masked out, but 0 * NaN is NaN), and checkpoint bytes read as K/V can be NaN."""
        heads = torch.arange(self.layout.num_kv_heads)
        rows = (heads[:, None] * self.pages_per_head + torch.tensor(pages, dtype=torch.int64)[None, :]).flatten()
        rows = rows.to(self.device)
        for view in self.views:
            view.index_fill_(0, rows, 0)
