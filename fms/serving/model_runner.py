"""Runs one scheduled step on the model: inputs built once per forward, the forward passes, sampling on the device.

A step's decode rows (one token each) run as a decode window: num_steps one-token steps back to
back, each step's inputs (token, position, slot, sequence length) computed on the device from the
previous step's, so the host synchronizes once per window instead of once per token. On CUDA each
step replays a CUDA graph captured for the next bucketed batch size; the graphs read static
buffers which the window fills once:

    rows 0..B-1      the window's sequences: last token, position, end position, cache row (the
                     page-table row of a paged cache), sampling parameters; a row past its end
                     idles (writes scratch storage: the scratch page, or the scratch column)
    rows B..bucket   padding: idle from the start (scratch storage, scratch state slot)
    out_tokens[k, b] the token row b sampled at step k; read back after the window

DecodeWindowRunner works over any SequenceCache (its window_* methods); static generate() uses
it with the contiguous cache too (fms.utils.generation, decode_window=).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import time
from typing import Sequence

import torch

from fms.modules.attention import get_attention_op
from fms.modules.masks import AttentionVariant
from fms.modules.kv_cache import SequenceCache
from fms.modules.paged_cache import Q_BLOCK_SIZE, PagedKVCache
from fms.serving.request import SamplingParams
from fms.serving.sampler import SamplingTensors, needs_sampling, sample
from fms.serving.scheduler import ScheduledChunk, SchedulerOutput

logger = logging.getLogger(__name__)

DEFAULT_GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ModelRunner:
    def __init__(self, model, cache: PagedKVCache, use_cuda_graphs: bool = False,
                 graph_batch_sizes: Sequence[int] = DEFAULT_GRAPH_BATCH_SIZES, attn_name: str = "paged",
                 bucket_prefills: bool | None = None, max_decode_steps: int = 1,
                 compile_decode: bool = False, compile_prefill: bool = False):
        self.model = model
        self.cache = cache
        cache.mark_static()  # the compiled forwards below take dynamic=True; this cache lives as long as they do
        self.attn_name = attn_name
        self.device = cache.spec.device
        self.vocab_size = model.config.vocab_size
        self.num_eager_forwards = 0  # prefill forwards (not graphed; compiled when prefill_compiled)
        # Prefill chunks of a step run as one packed row (no padding) when the attention op computes
        # packed steps (causal attention on an attention-only model); otherwise as padded rows.
        variant = getattr(model.config, "attention_variant", AttentionVariant())
        op = get_attention_op(attn_name)
        self.pack_prefill = op.can_pack(variant, cache)
        if bucket_prefills is None:  # only compiled FlexAttention needs few shapes
            bucket_prefills = self.device.type == "cuda" and op.prefill_uses_flex(variant, cache)
        self.bucket_prefills = bucket_prefills
        # torch.compile fuses the prefill forward's elementwise work (norms, rotary, activations: about
        # as much GPU time as its GEMMs when eager); packed steps only, one dynamic-shape compile.
        # Not for Mamba layers: inductor failed on the hybrid prefill on the H100 (a codegen error in a
        # cumsum, final_project section 6), and their prefill runs fla's Triton kernels anyway.
        self.prefill_compiled = (compile_prefill and self.pack_prefill and self.device.type == "cuda"
                                 and cache.state_pool is None)
        self._prefill_forward = torch.compile(model, dynamic=True) if self.prefill_compiled else model
        graph_sizes = None
        if use_cuda_graphs:
            why_not = why_no_graphs(model, attn_name, self.device)
            if why_not is None:
                graph_sizes = [b for b in graph_batch_sizes if b <= cache.max_batch_size] or [cache.max_batch_size]
            else:
                logger.warning("CUDA graphs off, decoding eagerly: %s", why_not)
        self.decoder = DecodeWindowRunner(model, cache, attn_name, max_decode_steps, graph_sizes,
                                          compile_model=compile_decode and self.device.type == "cuda")

    @property
    def graphs(self) -> "DecodeWindowRunner | None":
        """The decode runner when it replays CUDA graphs, else None."""
        return self.decoder if self.decoder.use_graphs else None

    @property
    def num_graph_forwards(self) -> int:
        return self.decoder.num_graph_steps

    @property
    def num_decode_forwards(self) -> int:
        return self.decoder.num_graph_steps + self.decoder.num_eager_steps

    def reset_counters(self) -> None:
        self.num_eager_forwards = 0
        self.decoder.num_graph_steps = self.decoder.num_eager_steps = 0
        self.decoder.time_s = dict.fromkeys(self.decoder.time_s, 0.0)

    @torch.no_grad()
    def warmup_prefill(self, max_chunk_tokens: int) -> None:
        """Compile prefill kernels up front, so that no step compiles (seconds) in the middle of serving:
        the compiled packed forward (one and several rows), or FlexAttention for every padded length
        a resumed chunk can take."""
        if self.pack_prefill:
            if self.prefill_compiled and self.cache.allocator.num_free >= 8:
                with self._scratch_sequences(2) as (a, b):
                    self._forward([_chunk(a, 48, 0), _chunk(b, 16, 0)], "packed")
                    self._forward([_chunk(a, 8, 48)], "packed")
        elif self.bucket_prefills:
            bucket = Q_BLOCK_SIZE
            while bucket // 2 < max_chunk_tokens:
                n = min(bucket, self.cache.max_seq_len - 1)
                if n <= bucket // 2 or -(-(n + 1) // self.cache.page_size) > self.cache.allocator.num_free:
                    break
                with self._scratch_sequences(1) as (a,):
                    # one fresh token gives the chunk cached context, which routes it to FlexAttention
                    self._forward([_chunk(a, 1, 0)], "fresh")
                    self._forward([_chunk(a, n, 1)], "resumed")
                bucket *= 2
        self.num_eager_forwards = 0

    @contextlib.contextmanager
    def _scratch_sequences(self, count: int):
        """count sequences in the cache for warm-up forwards, freed afterwards whatever happens."""
        ids = [("fms.serving", "warmup", i) for i in range(count)]
        for seq_id in ids:
            self.cache.add(seq_id)
        try:
            yield ids
        finally:
            for seq_id in ids:
                self.cache.free(seq_id)

    @torch.no_grad()
    def execute(self, out: SchedulerOutput) -> list[list[int]]:
        """Run the step; returns the sampled tokens per chunk ([] for chunks that end mid-prompt).

        A step runs as these kinds of forward:
            decode   every one-token chunk, one decode window (CUDA graphs, Triton paged decode)
            packed   every prefill chunk back to back in one row, no padding (flash varlen), when the
                     model and op allow it (can_pack); otherwise right-padded rows, in two groups so
                     that no row is padded to the other's length:
            fresh    prefill chunks starting at position 0, one batch
            resumed  prefill chunks with cached context (chunked prefill, prefix hit, recompute)
        When resumed chunks run on compiled FlexAttention (attention variants), which specializes on
        (batch, query length), each runs alone on CUDA (bucket_prefills) with its length padded to a
        power of two: a handful of shapes in all. Packed steps put every prefill chunk in one row.
        """
        chunks = out.chunks
        for chunk in chunks:
            if self.cache.length(chunk.request_id) != chunk.start_position:
                raise RuntimeError(
                    f"request {chunk.request_id!r}: the scheduler starts at position {chunk.start_position} but "
                    f"the cache holds {self.cache.length(chunk.request_id)} tokens"
                )
        decode = [i for i, c in enumerate(chunks) if len(c.token_ids) == 1 and c.sample]
        is_decode = set(decode)
        fresh = [i for i, c in enumerate(chunks) if i not in is_decode and c.start_position == 0]
        resumed = [i for i, c in enumerate(chunks) if i not in is_decode and c.start_position > 0]
        if self.pack_prefill:
            groups = [(fresh + resumed, "packed")]
        else:
            groups = [(fresh, "fresh")]
            groups += [([i], "resumed") for i in resumed] if self.bucket_prefills else [(resumed, "resumed")]
        sampled: list[list[int]] = [[] for _ in chunks]
        logits_of: dict[int, torch.Tensor] = {}
        for rows, kind in groups:
            if not rows:
                continue
            logits = self._forward([chunks[i] for i in rows], kind)
            for row, i in enumerate(rows):
                if chunks[i].sample:
                    logits_of[i] = logits[row]
        pending = None
        if logits_of:
            rows = sorted(logits_of)
            picked = [chunks[i] for i in rows]
            params = None
            if needs_sampling([c.params for c in picked]):
                params = SamplingTensors.build([c.params for c in picked], [c.seed for c in picked],
                                               self.vocab_size, self.device)
            positions = torch.tensor([c.start_position + len(c.token_ids) for c in picked], device=self.device)
            pending = rows, sample(torch.stack([logits_of[i] for i in rows]), params, positions)
        if decode:
            for i, tokens in zip(decode, self.decoder.run([chunks[i] for i in decode])):
                sampled[i] = tokens
        if pending is not None:
            for i, token in zip(pending[0], pending[1].tolist()):
                sampled[i] = [token]
        return sampled

    def _forward(self, chunks, kind: str) -> torch.Tensor:
        """One forward over these prefill chunks; -> last-token logits (B, V).

        kind "packed": every chunk's tokens back to back in one row; else rows right-padded.
        """
        seq_ids = [c.request_id for c in chunks]
        num_new = [len(c.token_ids) for c in chunks]
        if kind == "packed":
            meta = self.cache.prepare(seq_ids, num_new, packed=True)
            tokens = _to_device(torch.tensor([[t for c in chunks for t in c.token_ids]], dtype=torch.long),
                                self.device)
            last = _to_device(torch.tensor([list(itertools.accumulate(num_new))], dtype=torch.long) - 1, self.device)
            self.num_eager_forwards += 1
            return self._packed_forward(tokens, meta, last)[0]  # (B, V)
        query_len = None
        if self.bucket_prefills and kind == "resumed":
            # at least one FlexAttention query block: shorter queries take flex's decoding kernel, which
            # found no valid kernel config for a large bf16 pool on H100 (torch 2.11)
            query_len = max(Q_BLOCK_SIZE, 1 << (max(num_new) - 1).bit_length())
        meta = self.cache.prepare(seq_ids, num_new, query_len=query_len)
        width = meta.query_len
        rows = [c.token_ids + [0] * (width - len(c.token_ids)) for c in chunks]
        tokens = _to_device(torch.tensor(rows, dtype=torch.long), self.device)
        last = _to_device(torch.tensor([n - 1 for n in num_new], dtype=torch.long), self.device)
        self.num_eager_forwards += 1
        return self.model(tokens, attn_name=self.attn_name, cache=self.cache, meta=meta,
                          logits_positions=last)[:, 0]  # (B, V)


    def _packed_forward(self, tokens, meta, last) -> torch.Tensor:
        if self.prefill_compiled:
            try:
                return self._prefill_forward(tokens, attn_name=self.attn_name, cache=self.cache, meta=meta,
                                             logits_positions=last)
            except Exception as e:  # rerunning eagerly rewrites the same cache slots with the same values
                logger.warning("compiled prefill failed, running prefill eagerly: %s: %s", type(e).__name__, e,
                               exc_info=True)
                self.prefill_compiled, self._prefill_forward = False, self.model
        return self.model(tokens, attn_name=self.attn_name, cache=self.cache, meta=meta, logits_positions=last)


def why_no_graphs(model, attn_name: str, device: torch.device) -> str | None:
    """Why the decode step of this model and attention op cannot be captured in a CUDA graph, or None."""
    if device.type != "cuda":
        return f"the model is on {device.type}, not CUDA"
    op = get_attention_op(attn_name)
    variant = getattr(model.config, "attention_variant", None)
    flex_decode = getattr(op, "decode_kernel", "auto") == "flex" or (
        attn_name == "paged" and variant is not None and (variant.alibi or variant.softcap))
    if attn_name == "flex" or flex_decode:
        return "the decode step would use FlexAttention, whose BlockMask is rebuilt every step"
    if attn_name == "paged":
        from fms.modules.paged_decode_kernel import HAS_TRITON

        if not HAS_TRITON:
            return "Triton is not installed (the graphed paged decode path is the Triton paged kernel)"
    return None


def _decode_compile_options() -> dict:
    # Inductor's combo kernels fuse independent small kernels of the step (rotary on q and on k, the
    # K and V cache writes) horizontally into one launch: about 3% more batch-1 decode throughput
    # on the H100 (final_project section 5). FMS_COMBO_KERNELS=0 turns them off.
    return {} if os.environ.get("FMS_COMBO_KERNELS") == "0" else {"combo_kernels": True}


def _step_outputs(logits, params, active, num_new, tokens, positions, out_tokens, step_index) -> None:
    """Sample, record the token at out_tokens[step_index], and advance the buffers by one step."""
    token = torch.where(active, sample(logits, params, positions[:, 0] + 1), tokens[:, 0])
    out_tokens.index_copy_(0, step_index, token[None])
    tokens[:, 0].copy_(token)
    positions[:, 0].add_(num_new)
    step_index.add_(1)


def _chunk(seq_id, num_tokens: int, start: int) -> ScheduledChunk:
    """A warm-up prefill chunk of token 0, sampling nothing."""
    return ScheduledChunk(seq_id, [0] * num_tokens, start, False, SamplingParams())


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class DecodeWindowRunner:
    """Decode windows over static buffers: eager steps, or one CUDA graph per (padded batch size, mode).

    mode "greedy" samples by argmax only; "sample" runs the full sampler (temperature, top-k, top-p).
    Graphs are captured on first use of a (batch size, mode); greedy ones up front.
    """

    def __init__(self, model, cache: SequenceCache, attn_name: str, max_steps: int,
                 graph_batch_sizes: Sequence[int] | None, compile_model: bool = False):
        if max_steps < 1:
            raise ValueError(f"max_decode_steps must be >= 1, got {max_steps}")
        self.model, self.cache, self.attn_name = model, cache, attn_name
        cache.mark_static()
        # torch.compile fuses the step's small elementwise kernels (norms, rotary, activations), which
        # bound a graphed batch-1 step otherwise; one symbolic-batch compile serves every bucket.
        self._set_compiled(compile_model)
        self.max_steps = max_steps
        self.use_graphs = graph_batch_sizes is not None
        self.batch_sizes = sorted(set(graph_batch_sizes)) if self.use_graphs else []
        n = self.batch_sizes[-1] if self.use_graphs else cache.max_batch_size
        n = max(n, cache.max_batch_size)
        device = cache.spec.device
        self.tokens = torch.zeros(n, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, 1, dtype=torch.long, device=device)  # (B, 1) of the token computed next
        self.ends = torch.zeros(n, dtype=torch.long, device=device)  # a row computes positions < ends[b]
        self.rows = cache.idle_window_rows(0, n).to(device)  # (B, W) where each row's K/V live
        pool = cache.state_pool
        self.state_slots = None if pool is None else torch.full((n,), pool.scratch_slot, dtype=torch.long,
                                                                device=device)
        self.temperature = torch.zeros(n, dtype=torch.float32, device=device)
        self.top_p = torch.ones(n, dtype=torch.float32, device=device)
        self.top_k = torch.full((n,), model.config.vocab_size, dtype=torch.long, device=device)
        self.seeds = torch.zeros(n, dtype=torch.long, device=device)
        self.out_tokens = torch.zeros(max_steps, n, dtype=torch.long, device=device)
        self.step_index = torch.zeros(1, dtype=torch.long, device=device)
        self._graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self._pool = None
        self.num_graph_steps = 0  # steps replayed from a CUDA graph
        self.num_eager_steps = 0
        # decode-window wall time: host work up to the last launch, then waiting for the tokens
        self.time_s = {"decode_launch": 0.0, "decode_wait": 0.0}
        if self.use_graphs:
            self._capture_all()

    def _capture_all(self) -> None:
        try:
            for bs in reversed(self.batch_sizes):  # largest first: smaller ones fit in its memory pool
                self._capture(bs, "greedy", self._idle_layout(bs))
        except Exception as e:  # any failure falls back: uncompiled graphs, then eager decoding
            self._graphs, self._pool = {}, None
            if self.compiled:
                logger.warning("compiled decode step failed, capturing it uncompiled: %s: %s", type(e).__name__, e,
                               exc_info=True)
                self._set_compiled(False)
                return self._capture_all()
            logger.warning("CUDA graph capture failed, decoding eagerly: %s: %s", type(e).__name__, e, exc_info=True)
            self.use_graphs = False

    def _set_compiled(self, compiled: bool, backend: str = "inductor") -> None:
        """The step's three parts, all compiled or all eager: the forward, and the step's own
        arithmetic (inputs from positions, sampling bookkeeping) in a few fused kernels instead of a
        dozen eager ones per step; sampled (non-greedy) steps keep the eager bookkeeping."""
        self.compiled = compiled
        if compiled:
            options = _decode_compile_options() if backend == "inductor" else None
            self._forward = torch.compile(self.model, dynamic=True, backend=backend, options=options)
            self._inputs_fn = torch.compile(self.cache.window_inputs, dynamic=True, backend=backend)
            self._outputs_fn = torch.compile(_step_outputs, dynamic=True, backend=backend)
        else:
            self._forward, self._inputs_fn, self._outputs_fn = self.model, self.cache.window_inputs, _step_outputs

    # -- one step, on the buffers ----------------------------------------------------------
    def _step(self, bs: int, mode: str, layout) -> None:
        inputs = self._inputs_fn(self.positions[:bs], self.ends[:bs], self.rows[:bs])
        state_slots = None if self.state_slots is None else self.state_slots[:bs]
        meta = self.cache.window_meta(self.positions[:bs], self.rows[:bs], state_slots, inputs, layout)
        logits = self._forward(self.tokens[:bs], attn_name=self.attn_name, cache=self.cache, meta=meta)[:, 0]  # (bs, V)
        params = None
        if mode == "sample":
            params = SamplingTensors(self.temperature[:bs], self.top_k[:bs], self.top_p[:bs], self.seeds[:bs])
        outputs_fn = self._outputs_fn if params is None else _step_outputs
        active, num_new = inputs[0], inputs[1]
        outputs_fn(logits, params, active, num_new, self.tokens[:bs], self.positions[:bs], self.out_tokens[:, :bs],
                   self.step_index)

    def _idle(self, start: int, end: int) -> None:
        """Rows start..end compute nothing: scratch page, scratch state slot, end position 0."""
        self.tokens[start:end] = 0
        self.positions[start:end] = 0
        self.ends[start:end] = 0
        self.rows[start:end] = self.cache.idle_window_rows(start, end).to(self.rows.device)
        if self.state_slots is not None:
            self.state_slots[start:end] = self.cache.state_pool.scratch_slot

    def _idle_layout(self, bs: int):
        return self.cache.window_layout(self.cache.idle_window_rows(0, bs), bs)

    def _capture(self, bs: int, mode: str, layout) -> None:
        """Capture the step for (bs, mode, layout); the buffers' rows 0..bs are left idle."""
        self._idle(0, bs)  # warm-up and capture touch only scratch storage and the scratch slot
        self.step_index.zero_()  # the warm-up step writes out_tokens[step_index]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside the graph: Triton compiles, lazy inits
            self._step(bs, mode, layout)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self._step(bs, mode, layout)
        self._pool = graph.pool()
        self._graphs[(bs, mode, layout)] = graph
        torch.cuda.synchronize()

    def idle_graph(self, bs: int) -> torch.cuda.CUDAGraph:
        """The greedy graph of bucket bs with every row idle, ready to replay (for profiling a step)."""
        key = (bs, "greedy", self._idle_layout(bs))
        if key not in self._graphs:
            self._capture(*key)
        self._idle(0, bs)
        self.step_index.zero_()
        return self._graphs[key]

    # -- a window --------------------------------------------------------------------------
    def run(self, chunks: Sequence[ScheduledChunk]) -> list[list[int]]:
        """Reserve pages, run max(num_steps) steps; -> the num_steps tokens each chunk sampled."""
        b = len(chunks)
        start_time = time.perf_counter()
        window = self.cache.prepare_decode_window([c.request_id for c in chunks], [c.num_steps for c in chunks])
        num_steps = max(window.num_steps)
        if num_steps > self.max_steps:
            raise ValueError(f"a decode window of {num_steps} steps exceeds max_decode_steps={self.max_steps}")
        mode = "sample" if needs_sampling([c.params for c in chunks]) else "greedy"
        bs = next((size for size in self.batch_sizes if size >= b), None) if self.use_graphs else None
        width = bs or b
        host_rows = window.rows
        if width > b:
            host_rows = torch.cat([host_rows, self.cache.idle_window_rows(b, width)])
        layout = self.cache.window_layout(host_rows, width)
        if bs is not None and (bs, mode, layout) not in self._graphs:
            self._capture(bs, mode, layout)  # before the buffers are filled: capture runs one idle step
        starts = window.start_positions
        longs = torch.tensor([[c.token_ids[0], s, s + n] for c, s, n in zip(chunks, starts, window.num_steps)],
                             dtype=torch.long)
        longs = _to_device(longs, self.tokens.device)
        self.tokens[:b, 0].copy_(longs[:, 0])
        self.positions[:b, 0].copy_(longs[:, 1])
        self.ends[:b].copy_(longs[:, 2])
        self.rows[:b].copy_(_to_device(window.rows, self.tokens.device))  # padding rows: _idle below
        if self.state_slots is not None:
            self.state_slots[:b].copy_(_to_device(torch.tensor(window.state_slots), self.tokens.device))
        if mode == "sample":
            floats, params = SamplingTensors.pack([c.params for c in chunks], [c.seed for c in chunks],
                                                  self.model.config.vocab_size)
            floats, params = _to_device(floats, self.tokens.device), _to_device(params, self.tokens.device)
            self.temperature[:b].copy_(floats[:, 0])
            self.top_p[:b].copy_(floats[:, 1])
            self.top_k[:b].copy_(params[:, 0])
            self.seeds[:b].copy_(params[:, 1])
        self.step_index.zero_()
        if bs is not None:
            if bs > b:
                self._idle(b, bs)
            graph = self._graphs[(bs, mode, layout)]
            for _ in range(num_steps):
                graph.replay()
            self.num_graph_steps += num_steps
        else:
            for _ in range(num_steps):
                self._step(b, mode, layout)
            self.num_eager_steps += num_steps
        launched = time.perf_counter()
        out = self.out_tokens[:num_steps, :b].T.tolist()  # the window's one host synchronization
        self.time_s["decode_launch"] += launched - start_time
        self.time_s["decode_wait"] += time.perf_counter() - launched
        return [row[:n] for row, n in zip(out, window.num_steps)]
