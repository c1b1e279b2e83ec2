"""Runs one scheduled step on the model: applies the step's page grants to the device, builds the
step metadata once per forward, runs the forwards, samples on the device. It never allocates:
pages and slots come reserved in the SchedulerOutput (the KV manager's grants).

A step's decode rows (one token each) run as a decode window (fms.runtime.decode): num_steps
one-token steps back to back on the device with one host synchronization, replayed from CUDA
graphs on CUDA.
"""

from __future__ import annotations

import itertools
import logging
from typing import Callable

import torch

from fms.modules.attention import get_attention_op
from fms.modules.masks import AttentionVariant
from fms.cache.base import SequenceCache
from fms.cache.paged import Q_BLOCK_SIZE
from fms.runtime.compiled import compile_forward
from fms.runtime.decode import DecodeRow, DecodeWindowRunner, why_no_graphs
from fms.runtime.sampler import SamplingTensors, TokenLogprobs, host_logprobs, logprobs_of, needs_sampling, sample
from fms.runtime.transfer import to_device
from fms.serving.config import EngineConfig
from fms.serving.scheduler import SchedulerOutput

logger = logging.getLogger(__name__)



class ModelRunner:
    """config: the engine's EngineConfig with its device defaults filled in (EngineConfig.for_device)."""

    def __init__(self, model, cache: SequenceCache, config: EngineConfig, attn_name: str = "paged",
                 bucket_prefills: bool | None = None):
        use_cuda_graphs, graph_batch_sizes = config.use_cuda_graphs, config.graph_batch_sizes
        max_decode_steps, compile_decode, compile_prefill = (config.max_decode_steps, config.compile_decode,
                                                             config.compile_prefill)
        self.model = model
        self.cache = cache
        cache.mark_static()  # the compiled forwards below take dynamic=True; this cache lives as long as they do
        self.attn_name = attn_name
        self.device = cache.spec.device
        self.vocab_size = model.config.vocab_size
        self.num_eager_forwards = 0  # prefill forwards (not graphed; compiled when prefill_compiled)
        # per chunk of the last execute(): one TokenLogprobs per sampled token when its request asked, else None
        self.last_logprobs: list[list[TokenLogprobs] | None] = []
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
        self._prefill_forward = compile_forward(model, config.compile_scope) if self.prefill_compiled else model
        graph_sizes = None
        if use_cuda_graphs:
            why_not = why_no_graphs(model, attn_name, self.device)
            if why_not is None:
                graph_sizes = [b for b in graph_batch_sizes if b <= cache.max_batch_size] or [cache.max_batch_size]
            else:
                logger.warning("CUDA graphs off, decoding eagerly: %s", why_not)
        self.decoder = DecodeWindowRunner(model, cache, attn_name, max_decode_steps, graph_sizes,
                                          compile_model=compile_decode and self.device.type == "cuda",
                                          combo_kernels=config.combo_kernels, compile_scope=config.compile_scope,
                                          unbacked_batch=config.unbacked_batch)

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

    def warmup_steps(self, max_chunk_tokens: int) -> list[list[dict[int, int]]]:
        """Prefill steps to run once before serving, so that no step compiles (seconds) in the middle of
        it: the compiled packed forward (one and several rows), or FlexAttention for every padded length
        a resumed chunk can take. Each scenario is a list of steps, each {sequence index: new tokens};
        the engine runs them on scratch sequences (this runner never allocates)."""
        if self.pack_prefill:
            return [[{0: 48, 1: 16}, {0: 8}]] if self.prefill_compiled else []
        scenarios = []
        if self.bucket_prefills:
            bucket = Q_BLOCK_SIZE
            while bucket // 2 < max_chunk_tokens:
                n = min(bucket, self.cache.max_seq_len - 1)
                if n <= bucket // 2:
                    break
                # one fresh token gives the chunk cached context, which routes it to FlexAttention
                scenarios.append([{0: 1}, {0: n}])
                bucket *= 2
        return scenarios

    @torch.no_grad()
    def execute(self, out: SchedulerOutput, while_waiting: Callable[[], None] | None = None) -> list[list[int]]:
        """Run the step; returns the sampled tokens per chunk ([] for chunks that end mid-prompt).

        while_waiting: host work to run once while the device runs the step (after its work is launched,
        before the host waits for the sampled tokens); at the end of the step when nothing waits.

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
        self.cache.init_slots(out.new_slots)
        self.cache.apply(out.grants)
        chunks = out.chunks
        for chunk in chunks:
            end = chunk.start_position + len(chunk.token_ids) + chunk.num_steps - 1
            if self.cache.length(chunk.request_id) != end:
                raise RuntimeError(
                    f"request {chunk.request_id!r}: the step computes positions up to {end} but the KV manager "
                    f"reserved room for {self.cache.length(chunk.request_id)} tokens"
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
            # not torch.tensor(..., device=): its copy would wait for the forward just queued (fms.runtime.transfer)
            ends = [c.start_position + len(c.token_ids) for c in picked]
            positions = to_device(torch.tensor(ends, dtype=torch.long), self.device)
            logits = torch.stack([logits_of[i] for i in rows])
            tokens = sample(logits, params, positions)
            asked = [j for j, c in enumerate(picked) if c.params.logprobs is not None]
            device_logprobs = None
            if asked:  # the rows that asked, on the device, before the decode window is launched
                index = to_device(torch.tensor(asked, dtype=torch.long), self.device)
                k = max(picked[j].params.logprobs for j in asked)
                device_logprobs = logprobs_of(logits.index_select(0, index), tokens.index_select(0, index), k)
            pending = rows, tokens, asked, device_logprobs
        logprobs: list[list[TokenLogprobs] | None] = [None] * len(chunks)
        overlap = _Once(while_waiting)
        if decode:
            for i, tokens in zip(decode, self.decoder.run([DecodeRow.of_chunk(chunks[i]) for i in decode],
                                                          while_waiting=overlap)):
                sampled[i] = tokens
            # a prompt's last token run as a decode row may end at a page boundary the prefix cache
            # checkpoints (hybrid models); only then does this copy anything
            self.cache.capture_after_decode([chunks[i].request_id for i in decode])
            for i, row_logprobs in zip(decode, self.decoder.last_logprobs):
                logprobs[i] = row_logprobs
        if pending is not None:
            rows, tokens, asked, device_logprobs = pending
            overlap()
            for i, token in zip(rows, tokens.tolist()):
                sampled[i] = [token]
            if asked:
                ks = [chunks[rows[j]].params.logprobs for j in asked]
                for j, token_logprobs in zip(asked, host_logprobs(*device_logprobs, ks)):
                    logprobs[rows[j]] = [token_logprobs]
        self.last_logprobs = logprobs
        overlap()  # a step that samples nothing (a prompt's middle chunk) has nothing to wait for
        return sampled

    def _forward(self, chunks, kind: str) -> torch.Tensor:
        """One forward over these prefill chunks; -> last-token logits (B, V).

        kind "packed": every chunk's tokens back to back in one row; else rows right-padded.
        """
        seq_ids = [c.request_id for c in chunks]
        num_new = [len(c.token_ids) for c in chunks]
        context = [c.start_position for c in chunks]
        if kind == "packed":
            meta = self.cache.build_meta(seq_ids, context, num_new, packed=True)
            tokens = to_device(torch.tensor([[t for c in chunks for t in c.token_ids]], dtype=torch.long),
                                self.device)
            ends = list(itertools.accumulate(num_new))
            # A lone chunk asks for its last token's logits twice: a (1, 1) logits_positions would make the
            # dynamic-shape compile specialize on one sequence and compile the prefill a second time.
            last = to_device(torch.tensor([ends * (2 if len(ends) == 1 else 1)], dtype=torch.long) - 1, self.device)
            self.num_eager_forwards += 1
            return self._packed_forward(tokens, meta, last)[0, :len(ends)]  # (B, V)
        query_len = None
        if self.bucket_prefills and kind == "resumed":
            # at least one FlexAttention query block: shorter queries take flex's decoding kernel, which
            # found no valid kernel config for a large bf16 pool on H100 (torch 2.11)
            query_len = max(Q_BLOCK_SIZE, 1 << (max(num_new) - 1).bit_length())
        meta = self.cache.build_meta(seq_ids, context, num_new, query_len=query_len)
        width = meta.query_len
        rows = [c.token_ids + [0] * (width - len(c.token_ids)) for c in chunks]
        tokens = to_device(torch.tensor(rows, dtype=torch.long), self.device)
        last = to_device(torch.tensor([n - 1 for n in num_new], dtype=torch.long), self.device)
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


class _Once:
    """fn (or nothing) on the first call only."""

    def __init__(self, fn: Callable[[], None] | None):
        self.fn = fn

    def __call__(self) -> None:
        fn, self.fn = self.fn, None
        if fn is not None:
            fn()
