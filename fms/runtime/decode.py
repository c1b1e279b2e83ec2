"""Decode windows: num_steps one-token steps run back to back on the device with one host
synchronization, eagerly or replayed from CUDA graphs (one per bucketed batch size); the driver of
both static generate() and the serving engine's decode steps. Per-token decoding is a window of 1.

Each step's inputs (token, position, slot, sequence length) are computed on the device from the
previous step's; the graphs read static buffers which a window fills once:

    rows 0..B-1      the window's sequences: last token, position, end position, cache row (the
                     page-table row of a paged cache), sampling parameters; a row past its end
                     idles (writes scratch storage: the scratch page, or the scratch column)
    rows B..bucket   padding: idle from the start (scratch storage, scratch state slot)
    out_tokens[k, b] the token row b sampled at step k; read back after the window
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Hashable, Sequence

import torch

from fms.cache.base import SequenceCache
from fms.modules.attention import get_attention_op
from fms.modules.masks import AttentionVariant
from fms.runtime.compiled import compile_forward, compiled_scope, mark_batch, same_batch, unbacked_batch
from fms.runtime.sampler import SamplingTensors, TokenLogprobs, host_logprobs, logprobs_of, needs_sampling, sample
from fms.runtime.sampling_params import MAX_LOGPROBS, SamplingParams
from fms.runtime.transfer import to_device

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecodeRow:
    """One sequence of a decode window: its last token (computed first, at position `start`) and how many
    steps it runs. The caller has reserved room for the steps (KV manager grants applied to the cache)."""

    seq_id: Hashable
    token: int
    start: int
    num_steps: int
    params: SamplingParams
    seed: int

    @classmethod
    def of_chunk(cls, chunk) -> "DecodeRow":
        """From a scheduler's one-token chunk (request_id, token_ids, num_steps, params, seed)."""
        return cls(chunk.request_id, chunk.token_ids[0], chunk.start_position, chunk.num_steps, chunk.params,
                   chunk.seed)


def why_no_graphs(model, attn_name: str, device: torch.device) -> str | None:
    """Why the decode step of this model and attention op cannot be captured in a CUDA graph, or None."""
    variant = getattr(model.config, "attention_variant", None) or AttentionVariant()
    return get_attention_op(attn_name).why_no_graph_decode(variant, device)


def _step_outputs(logits, params, active, num_new, tokens, positions, out_tokens, step_index) -> None:
    """Sample, record the token at out_tokens[step_index, :B] (out_tokens: the whole (steps, width) buffer), and
    advance the (B, 1) buffers by one step. The whole buffer and a flat write, not out_tokens[:, :B]: a view of it
    would be one more batch-sized input whose size specializes at 1 (fms.runtime.compiled.mark_batch)."""
    same_batch(logits, active, num_new, tokens, positions)
    token = torch.where(active, sample(logits, params, positions[:, 0] + 1), tokens[:, 0])
    at = step_index.sum() * out_tokens.shape[1] + torch.arange(token.shape[0], device=token.device)
    out_tokens.view(-1).index_copy_(0, at, token)
    tokens[:, 0].copy_(token)
    positions[:, 0].add_(num_new)
    step_index.add_(1)


def _step_logprobs(logits, tokens, step_index, out_logprobs, out_top_ids, out_top_logprobs) -> None:
    """Record the log-probabilities of the tokens _step_outputs just sampled (at step_index - 1)."""
    chosen, top_ids, top_logprobs = logprobs_of(logits, tokens[:, 0], MAX_LOGPROBS)
    at = step_index - 1
    out_logprobs.index_copy_(0, at, chosen[None])
    out_top_ids.index_copy_(0, at, top_ids[None])
    out_top_logprobs.index_copy_(0, at, top_logprobs[None])


class DecodeWindowRunner:
    """Decode windows over static buffers: eager steps, or one CUDA graph per (padded batch size, mode).

    mode "greedy" samples by argmax only; "sample" runs the full sampler (temperature, top-k, top-p);
    a "+logprobs" mode (any row of the window asked for logprobs) also records every row's sampled-token
    log-probability and top MAX_LOGPROBS alternatives per step, read back after the window into
    last_logprobs. Graphs are captured on first use of a (batch size, mode); greedy ones up front.
    """

    def __init__(self, model, cache: SequenceCache, attn_name: str, max_steps: int,
                 graph_batch_sizes: Sequence[int] | None, compile_model: bool = False, combo_kernels: bool = True,
                 compile_scope: str = "model", unbacked_batch: bool = False):
        if max_steps < 1:
            raise ValueError(f"max_decode_steps must be >= 1, got {max_steps}")
        self.model, self.cache, self.attn_name = model, cache, attn_name
        # Inductor's combo kernels fuse independent small kernels of the step (rotary on q and on k,
        # the K and V cache writes) horizontally into one launch: about 3% more batch-1 decode
        # throughput on the H100 (final_project/LOG.md, session 5).
        self.combo_kernels = combo_kernels
        self.compile_scope = compile_scope  # fms.runtime.compiled: the whole model, or one layer for all
        self._unbacked_asked = unbacked_batch
        if compile_model:  # its compiles take dynamic=True over this one cache (see SequenceCache.mark_static)
            cache.mark_static()
        # torch.compile fuses the step's small elementwise kernels (norms, rotary, activations), which
        # bound a graphed batch-1 step otherwise; one symbolic-batch compile serves every bucket.
        self._set_compiled(compile_model)
        self.max_steps = max_steps
        self.use_graphs = graph_batch_sizes is not None
        self.batch_sizes = sorted(set(graph_batch_sizes)) if self.use_graphs else []
        n = self.batch_sizes[-1] if self.use_graphs else cache.max_batch_size
        # One row more than any window uses: a compiled step reads views [:bs] of these buffers, and a view
        # as long as its base makes dynamo tie the two sizes with a guard (base size == view size), so that
        # the next smaller bucket recompiled the whole step (31 s of the 1B's cold start on the H200).
        n = max(n, cache.max_batch_size) + 1
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
        self.out_logprobs = torch.zeros(max_steps, n, dtype=torch.float32, device=device)
        self.out_top_ids = torch.zeros(max_steps, n, MAX_LOGPROBS, dtype=torch.long, device=device)
        self.out_top_logprobs = torch.zeros(max_steps, n, MAX_LOGPROBS, dtype=torch.float32, device=device)
        # per row of the last window: one TokenLogprobs per token it returned, or None (did not ask)
        self.last_logprobs: list[list[TokenLogprobs] | None] = []
        self.step_index = torch.zeros(1, dtype=torch.long, device=device)
        self._graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self.capture_s: dict[tuple[int, str], float] = {}  # (batch size, mode) -> seconds (compile included)
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
        # asked for, compile_scope "layers" traces every batch size once, 1 included (fms.runtime.compiled.
        # unbacked_batch); a whole-model trace takes the step's metadata whole, whose batch-sized tensors keep backed
        # sizes: there a batch of 1 is a second trace
        self.unbacked = self._unbacked_asked and compiled and compiled_scope(self.model, self.compile_scope) == "layers"
        if compiled:
            options = {"combo_kernels": True} if backend == "inductor" and self.combo_kernels else None
            self._forward = compile_forward(self.model, self.compile_scope, backend, options)
            self._inputs_fn = torch.compile(self.cache.window_inputs, dynamic=True, backend=backend)
            self._outputs_fn = torch.compile(_step_outputs, dynamic=True, backend=backend)
        else:
            self._forward, self._inputs_fn, self._outputs_fn = self.model, self.cache.window_inputs, _step_outputs

    # -- one step, on the buffers ----------------------------------------------------------
    def _step(self, bs: int, mode: str, layout, bounds=None) -> None:
        if not self.unbacked:
            return self._step_on_buffers(bs, mode, layout, bounds)
        # one trace of each compiled function for every batch size, 1 included; kernels tuned for the largest
        with unbacked_batch(len(self.tokens) - 1):
            self._step_on_buffers(bs, mode, layout, bounds)

    def _step_on_buffers(self, bs: int, mode: str, layout, bounds=None) -> None:
        positions, ends, rows, tokens = self.positions[:bs], self.ends[:bs], self.rows[:bs], self.tokens[:bs]
        inputs = self._inputs_fn(*mark_batch(positions, ends, rows))
        state_slots = None if self.state_slots is None else self.state_slots[:bs]
        meta = self.cache.window_meta(positions, rows, state_slots, inputs, layout, bounds)
        logits = self._forward(tokens, attn_name=self.attn_name, cache=self.cache, meta=meta)[:, 0]  # (bs, V)
        params = None
        if mode.startswith("sample"):
            params = SamplingTensors(self.temperature[:bs], self.top_k[:bs], self.top_p[:bs], self.seeds[:bs])
        outputs_fn = self._outputs_fn if params is None else _step_outputs
        active, num_new = inputs[0], inputs[1]
        mark_batch(logits, logits._base, active, num_new, tokens, positions)
        outputs_fn(logits, params, active, num_new, tokens, positions, self.out_tokens, self.step_index)
        if mode.endswith("+logprobs"):
            _step_logprobs(logits, tokens, self.step_index, self.out_logprobs[:, :bs],
                           self.out_top_ids[:, :bs], self.out_top_logprobs[:, :bs])

    def _idle(self, start: int, end: int) -> None:
        """Rows start..end compute nothing: scratch page, scratch state slot, end position 0."""
        self.tokens[start:end] = 0
        self.positions[start:end] = 0
        self.ends[start:end] = 0
        # not .to(device): in a step that also prefills, that copy would wait for the queued forward
        self.rows[start:end] = to_device(self.cache.idle_window_rows(start, end), self.rows.device)
        if self.state_slots is not None:
            self.state_slots[start:end] = self.cache.state_pool.scratch_slot

    def _idle_layout(self, bs: int):
        return self.cache.window_layout(self.cache.idle_window_rows(0, bs), bs)

    @torch.no_grad()  # as every step that runs it: a compile traced with gradients on recompiles at the first
    # step without (dynamo guards grad mode; the 8B's prefill warm-up recompiled both layer halves that way)
    def _capture(self, bs: int, mode: str, layout) -> None:
        """Capture the step for (bs, mode, layout); the buffers' rows 0..bs are left idle."""
        start = time.perf_counter()
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
        self.capture_s[bs, mode] = time.perf_counter() - start

    def capture_times(self) -> dict[str, float]:
        """capture_s keyed "bs/mode" (as benchmarks record it in JSON), in capture order."""
        return {f"{bs}/{mode}": s for (bs, mode), s in self.capture_s.items()}

    def idle_graph(self, bs: int) -> torch.cuda.CUDAGraph:
        """The greedy graph of bucket bs with every row idle, ready to replay (for profiling a step)."""
        key = (bs, "greedy", self._idle_layout(bs))
        if key not in self._graphs:
            self._capture(*key)
        self._idle(0, bs)
        self.step_index.zero_()
        return self._graphs[key]

    # -- a window --------------------------------------------------------------------------
    def run(self, rows: Sequence[DecodeRow], while_waiting: Callable[[], None] | None = None) -> list[list[int]]:
        """Run max(num_steps) steps over room already reserved; -> the num_steps tokens each row sampled.
        while_waiting: host work to run once the window is launched, while the device runs it."""
        b = len(rows)
        start_time = time.perf_counter()
        window = self.cache.decode_window([r.seq_id for r in rows], [r.start for r in rows], [r.num_steps for r in rows])
        num_steps = max(window.num_steps)
        if num_steps > self.max_steps:
            raise ValueError(f"a decode window of {num_steps} steps exceeds max_decode_steps={self.max_steps}")
        mode = "sample" if needs_sampling([r.params for r in rows]) else "greedy"
        wants_logprobs = any(r.params.logprobs is not None for r in rows)
        if wants_logprobs:
            mode += "+logprobs"
        bs = next((size for size in self.batch_sizes if size >= b), None) if self.use_graphs else None
        width = bs or b
        host_rows = window.rows
        if width > b:
            host_rows = torch.cat([host_rows, self.cache.idle_window_rows(b, width)])
        layout = self.cache.window_layout(host_rows, width)
        if bs is not None and (bs, mode, layout) not in self._graphs:
            self._capture(bs, mode, layout)  # before the buffers are filled: capture runs one idle step
        starts = window.start_positions
        longs = torch.tensor([[r.token, s, s + n] for r, s, n in zip(rows, starts, window.num_steps)],
                             dtype=torch.long)
        longs = to_device(longs, self.tokens.device)
        self.tokens[:b, 0].copy_(longs[:, 0])
        self.positions[:b, 0].copy_(longs[:, 1])
        self.ends[:b].copy_(longs[:, 2])
        self.rows[:b].copy_(to_device(window.rows, self.tokens.device))  # padding rows: _idle below
        if self.state_slots is not None:
            self.state_slots[:b].copy_(to_device(torch.tensor(window.state_slots), self.tokens.device))
        if mode.startswith("sample"):
            floats, params = SamplingTensors.pack([r.params for r in rows], [r.seed for r in rows],
                                                  self.model.config.vocab_size)
            floats, params = to_device(floats, self.tokens.device), to_device(params, self.tokens.device)
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
            # Eager steps need no fixed shapes: a cache may read only up to the window's longest end,
            # and a one-step window whose rows all sit at one position is uniform (no mask).
            bounds = None
            if not self.compiled:
                bounds = (max(s + n for s, n in zip(starts, window.num_steps)),
                          num_steps == 1 and len(set(starts)) == 1)
            for _ in range(num_steps):
                self._step(b, mode, layout, bounds)
            self.num_eager_steps += num_steps
        launched = time.perf_counter()
        if while_waiting is not None:
            while_waiting()
        waiting = time.perf_counter()
        out = self.out_tokens[:num_steps, :b].T.tolist()  # the window's one host synchronization
        self.time_s["decode_launch"] += launched - start_time
        self.time_s["decode_wait"] += time.perf_counter() - waiting
        self.last_logprobs = [None] * b
        if wants_logprobs:
            self.last_logprobs = self._read_logprobs(rows, window.num_steps)
        return [row[:n] for row, n in zip(out, window.num_steps)]

    def _read_logprobs(self, rows: Sequence[DecodeRow], num_steps: Sequence[int]) -> list[list[TokenLogprobs] | None]:
        """The window's recorded log-probabilities, for the rows that asked."""
        asked = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        index = to_device(torch.tensor(asked, dtype=torch.long), self.out_logprobs.device)
        steps = max(num_steps)
        chosen = self.out_logprobs[:steps].index_select(1, index).T  # (A, steps)
        top_ids = self.out_top_ids[:steps].index_select(1, index).transpose(0, 1)  # (A, steps, K)
        top_logprobs = self.out_top_logprobs[:steps].index_select(1, index).transpose(0, 1)
        chosen, top_ids, top_logprobs = chosen.cpu(), top_ids.cpu(), top_logprobs.cpu()  # one copy each
        result: list[list[TokenLogprobs] | None] = [None] * len(rows)
        for j, i in enumerate(asked):
            n, k = num_steps[i], rows[i].params.logprobs
            result[i] = host_logprobs(chosen[j, :n], top_ids[j, :n], top_logprobs[j, :n], [k] * n)
        return result
