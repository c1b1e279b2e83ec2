"""Runs one scheduled step on the model: inputs built once per forward, the forward passes, sampling on the device.

A step's decode rows (one token each) run as one batch; on CUDA it replays a CUDA graph captured
for the next bucketed batch size. The graphs read static buffers, which each step overwrites
before replay:

    rows 0..B-1      the step's sequences: token, position, slot, page-table row, sequence length
    rows B..bucket   padding: write K/V to the scratch page, read one scratch slot, output ignored
"""

from __future__ import annotations

import logging
from typing import Hashable, Sequence

import torch

from fms.modules.attention import get_attention_op
from fms.modules.paged_cache import Q_BLOCK_SIZE, PagedKVCache, PagedStepMeta
from fms.serving.request import SamplingParams
from fms.serving.scheduler import ScheduledChunk, SchedulerOutput

logger = logging.getLogger(__name__)

DEFAULT_GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Sampler:
    """Next tokens from last-position logits with per-request parameters; greedy rows take the argmax.

    Sampling draws one exponential race per row (argmax of p / Exp(1) picks token i with probability
    p_i), so a seeded request draws from its own generator and its tokens do not depend on the batch.
    """

    def __init__(self):
        self._generators: dict[Hashable, torch.Generator] = {}

    def forget(self, request_ids: Sequence[Hashable]) -> None:
        for request_id in request_ids:
            self._generators.pop(request_id, None)

    def __call__(self, logits: torch.Tensor, params: Sequence[SamplingParams],
                 request_ids: Sequence[Hashable]) -> torch.Tensor:
        """logits (B, V) -> token ids (B,)."""
        if all(p.is_greedy for p in params):
            return logits.argmax(dim=-1)
        device = logits.device
        vocab = logits.shape[-1]
        x = logits.float() / torch.tensor([p.temperature or 1.0 for p in params], device=device)[:, None]
        top_k = [min(p.top_k or vocab, vocab) for p in params]
        top_p = [p.top_p for p in params]
        if min(top_k) < vocab or min(top_p) < 1.0:
            sorted_x, order = x.sort(dim=-1, descending=True)
            rank = torch.arange(vocab, device=device)[None, :]
            drop = rank >= torch.tensor(top_k, device=device)[:, None]
            probs = sorted_x.masked_fill(drop, float("-inf")).softmax(dim=-1)
            # drop a token once the mass ranked before it already reaches top_p (the first always stays)
            drop |= (probs.cumsum(dim=-1) - probs) >= torch.tensor(top_p, device=device)[:, None]
            x = x.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
        probs = x.softmax(dim=-1)
        noise = torch.empty_like(probs).exponential_()
        for row, (request_id, p) in enumerate(zip(request_ids, params)):
            if p.seed is not None and not p.is_greedy:
                generator = self._generators.get(request_id)
                if generator is None:
                    generator = torch.Generator(device=device).manual_seed(p.seed)
                    self._generators[request_id] = generator
                noise[row].exponential_(generator=generator)
        sampled = (probs / noise.clamp_min(1e-30)).argmax(dim=-1)
        greedy = torch.tensor([p.is_greedy for p in params], device=device)
        return torch.where(greedy, logits.argmax(dim=-1), sampled)


class ModelRunner:
    def __init__(self, model, cache: PagedKVCache, use_cuda_graphs: bool = False,
                 graph_batch_sizes: Sequence[int] = DEFAULT_GRAPH_BATCH_SIZES, attn_name: str = "paged",
                 bucket_prefills: bool | None = None):
        self.model = model
        self.cache = cache
        self.attn_name = attn_name
        self.device = cache.spec.device
        self.sampler = Sampler()
        self.graphs: DecodeGraphs | None = None
        self.num_graph_forwards = 0  # forwards replayed from a CUDA graph
        self.num_eager_forwards = 0  # forwards run eagerly
        self.bucket_prefills = self.device.type == "cuda" if bucket_prefills is None else bucket_prefills
        if use_cuda_graphs:
            why_not = self._why_no_graphs()
            if why_not is None:
                sizes = [b for b in graph_batch_sizes if b <= cache.max_batch_size] or [cache.max_batch_size]
                try:
                    graphs = DecodeGraphs(model, cache, sizes, attn_name)
                    graphs.capture()
                    self.graphs = graphs
                except Exception as e:  # any capture failure leaves eager decoding, which always works
                    logger.warning("CUDA graph capture failed, decoding eagerly: %s: %s", type(e).__name__, e)
            else:
                logger.warning("CUDA graphs off, decoding eagerly: %s", why_not)

    @torch.no_grad()
    def warmup_prefill_buckets(self, max_chunk_tokens: int) -> None:
        """Compile FlexAttention for every padded length a resumed prefill chunk can take, up front.

        Otherwise each first use of a length compiles (seconds) in the middle of serving.
        """
        if not self.bucket_prefills:
            return
        seq_id, bucket = ("fms.serving", "warmup"), Q_BLOCK_SIZE
        while bucket // 2 < max_chunk_tokens:
            n = min(bucket, self.cache.max_seq_len - 1)
            if n <= bucket // 2 or -(-(n + 1) // self.cache.page_size) > self.cache.allocator.num_free:
                break
            self.cache.add(seq_id)
            try:
                # one fresh token gives the chunk cached context, which routes it to FlexAttention
                self._forward([ScheduledChunk(seq_id, [0], 0, False, SamplingParams())], "fresh")
                self._forward([ScheduledChunk(seq_id, [0] * n, 1, False, SamplingParams())], "resumed")
            finally:
                self.cache.free(seq_id)
            bucket *= 2
        self.num_eager_forwards = 0

    def _why_no_graphs(self) -> str | None:
        if self.device.type != "cuda":
            return f"the model is on {self.device.type}, not CUDA"
        if self.cache.state_pool is not None:
            return "padded graph rows would need a scratch recurrent-state slot (hybrid model)"
        op = get_attention_op(self.attn_name)
        variant = getattr(self.model.config, "attention_variant", None)
        if getattr(op, "decode_kernel", "auto") == "flex" or (variant is not None and (variant.alibi or variant.softcap)):
            return "the decode step would use FlexAttention, whose BlockMask is rebuilt every step"
        from fms.modules.paged_decode_kernel import HAS_TRITON

        if not HAS_TRITON:
            return "Triton is not installed (the graphed decode path is the Triton paged kernel)"
        return None

    @torch.no_grad()
    def execute(self, out: SchedulerOutput) -> list[int | None]:
        """Run the step; returns the sampled token per chunk (None for chunks that end mid-prompt).

        A step runs as up to three kinds of forward, so that no row is padded to another kind's length:
            decode   every one-token chunk, one batch: the Triton decode path, replayed from a CUDA graph
            fresh    prefill chunks starting at position 0, one batch: the paged op runs them by SDPA
            resumed  prefill chunks with cached context (chunked prefill, prefix hit, recompute): FlexAttention
        Compiled FlexAttention specializes on (batch, query length), so on CUDA (bucket_prefills) each
        resumed chunk runs alone with its length padded to a power of two: a handful of shapes in all.
        """
        self.sampler.forget(out.finished_ids)
        chunks = out.chunks
        for chunk in chunks:
            if self.cache.length(chunk.request_id) != chunk.start_position:
                raise RuntimeError(
                    f"request {chunk.request_id!r}: the scheduler starts at position {chunk.start_position} but "
                    f"the cache holds {self.cache.length(chunk.request_id)} tokens"
                )
        decode = [i for i, c in enumerate(chunks) if len(c.token_ids) == 1]
        fresh = [i for i, c in enumerate(chunks) if len(c.token_ids) > 1 and c.start_position == 0]
        resumed = [i for i, c in enumerate(chunks) if len(c.token_ids) > 1 and c.start_position > 0]
        groups = [(decode, "decode"), (fresh, "fresh")]
        groups += [([i], "resumed") for i in resumed] if self.bucket_prefills else [(resumed, "resumed")]
        logits_of: dict[int, torch.Tensor] = {}
        for rows, kind in groups:
            if not rows:
                continue
            logits = self._forward([chunks[i] for i in rows], kind)
            for row, i in enumerate(rows):
                if chunks[i].sample:
                    logits_of[i] = logits[row]
        sampled: list[int | None] = [None] * len(chunks)
        if logits_of:
            rows = sorted(logits_of)
            picked = [chunks[i] for i in rows]
            logits = torch.stack([logits_of[i] for i in rows])
            tokens = self.sampler(logits, [c.params for c in picked], [c.request_id for c in picked]).tolist()
            for i, token in zip(rows, tokens):
                sampled[i] = token
        return sampled

    def _forward(self, chunks, kind: str) -> torch.Tensor:
        """One forward over these chunks (rows right-padded); -> last-token logits (B, V)."""
        seq_ids = [c.request_id for c in chunks]
        num_new = [len(c.token_ids) for c in chunks]
        query_len = None
        if self.bucket_prefills and kind == "resumed":
            # at least one FlexAttention query block: shorter queries take flex's decoding kernel, which
            # found no valid kernel config for a large bf16 pool on H100 (torch 2.11)
            query_len = max(Q_BLOCK_SIZE, 1 << (max(num_new) - 1).bit_length())
        meta = self.cache.prepare(seq_ids, num_new, query_len=query_len)
        if kind == "decode" and self.graphs is not None and len(chunks) <= self.graphs.max_batch_size:
            self.num_graph_forwards += 1
            return self.graphs.run(meta, [c.token_ids[0] for c in chunks])
        width = meta.query_len
        rows = [c.token_ids + [0] * (width - len(c.token_ids)) for c in chunks]
        tokens = _to_device(torch.tensor(rows, dtype=torch.long), self.device)
        last = _to_device(torch.tensor([n - 1 for n in num_new], dtype=torch.long), self.device)
        self.num_eager_forwards += 1
        return self.model(tokens, attn_name=self.attn_name, cache=self.cache, meta=meta,
                          logits_positions=last)[:, 0]  # (B, V)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class DecodeGraphs:
    """One CUDA graph per padded batch size for one-token-per-sequence steps (Triton paged decode)."""

    def __init__(self, model, cache: PagedKVCache, batch_sizes: Sequence[int], attn_name: str):
        self.model, self.cache, self.attn_name = model, cache, attn_name
        self.batch_sizes = sorted(set(batch_sizes))
        self.max_batch_size = self.batch_sizes[-1]
        n, device = self.max_batch_size, cache.spec.device
        self.tokens = torch.zeros(n, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, 1, dtype=torch.long, device=device)  # (B, 1)
        self.slot_mapping = torch.zeros(n, dtype=torch.long, device=device)
        self.page_table = torch.zeros(n, cache.max_pages_per_seq, dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.num_new = torch.ones(n, dtype=torch.long, device=device)
        self._scratch_slots = cache.scratch_page * cache.page_size + torch.arange(n, device=device) % cache.page_size
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._logits: dict[int, torch.Tensor] = {}
        self._pool = None

    def _meta(self, bs: int) -> PagedStepMeta:
        ctx = self.positions[:bs, 0]
        return PagedStepMeta(
            position_ids=self.positions[:bs], num_new_tokens=self.num_new[:bs], context_lens=ctx, query_len=1,
            max_context_len=self.cache.max_seq_len, host_num_new=(1,) * bs, host_context=(0,) * bs,
            page_size=self.cache.page_size, slot_mapping=self.slot_mapping[:bs], page_table=self.page_table[:bs],
            seq_lens=self.seq_lens[:bs], q_start=ctx, block_mask=None, page_logical=self.cache.page_logical,
            window=self.cache.window,
        )

    def _pad(self, start: int, end: int) -> None:
        self.tokens[start:end] = 0
        self.positions[start:end] = 0
        self.slot_mapping[start:end] = self._scratch_slots[start:end]
        self.page_table[start:end] = self.cache.scratch_page
        self.seq_lens[start:end] = 1

    def capture(self) -> None:
        # Largest first: smaller graphs then fit in the memory pool the largest one reserved.
        for bs in reversed(self.batch_sizes):
            self._pad(0, bs)
            meta = self._meta(bs)

            def forward():
                return self.model(self.tokens[:bs], attn_name=self.attn_name, cache=self.cache, meta=meta)

            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up outside the graph: Triton compiles, lazy inits
                forward()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                self._logits[bs] = forward()
            self._pool = graph.pool()
            self._graphs[bs] = graph
        torch.cuda.synchronize()

    def run(self, meta: PagedStepMeta, token_ids: list[int]) -> torch.Tensor:
        """Copy the step's metadata into the static buffers, replay; -> logits (B, V) valid until the next replay."""
        b = len(token_ids)
        bs = next(size for size in self.batch_sizes if size >= b)
        self.tokens[:b, 0].copy_(_to_device(torch.tensor(token_ids, dtype=torch.long), self.tokens.device))
        self.positions[:b].copy_(meta.position_ids)
        self.slot_mapping[:b].copy_(meta.slot_mapping)
        self.page_table[:b].copy_(meta.page_table)
        self.seq_lens[:b].copy_(meta.seq_lens)
        if bs > b:
            self._pad(b, bs)
        self._graphs[bs].replay()
        return self._logits[bs][:b, 0]
