"""Continuous-batching scheduler: which requests run each step, and how many tokens each computes.

There is no prefill or decode phase, only each request's num_computed_tokens catching up with its
num_tokens (prompt + outputs). A step gives every running decode its one token first, then
prefill chunks (new, partially prefilled, or recomputing after preemption) from what is left of
the token budget, so a long prompt never stalls the running decodes:

    budget 8, page_size 16       running: A decode, B prefill at 40/100     waiting: C (30 tokens)
    step:  A 1 token  |  B tokens 40..46 (7, budget spent)  |  C waits for a later step

Pages: a step is only scheduled if the allocator (plus evictable prefix-cache pages) can give every
chunk its pages. When a running request cannot get its pages, the most recently admitted request
is preempted: its pages go back, it returns to the front of the queue and later recomputes its
prompt + outputs (full pages of it may still be in the prefix cache). The scheduler adds and frees
sequences in the cache; the model runner's cache.prepare() reserves the pages counted here.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Hashable

from fms.cache.paged import PagedKVCache
from fms.cache.prefix_cache import PrefixCache
from fms.serving.request import FinishReason, Request, RequestState, SamplingParams


@dataclass
class ScheduledChunk:
    request_id: Hashable
    token_ids: list[int]  # tokens to compute this step
    start_position: int  # position of token_ids[0] (= the request's num_computed_tokens)
    sample: bool  # the chunk reaches the request's last token: sample its next token
    params: SamplingParams
    num_steps: int = 1  # a decode chunk may run this many one-token steps back to back (a decode window)
    seed: int = 0  # the request's sampling seed


@dataclass
class SchedulerOutput:
    """The one thing the scheduler hands the model runner per step."""

    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted_ids: list[Hashable] = field(default_factory=list)  # preempted this step (pages freed)
    finished_ids: list[Hashable] = field(default_factory=list)  # ended since the last step

    @property
    def num_batched_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)

    @property
    def is_decode_only(self) -> bool:
        return bool(self.chunks) and all(len(c.token_ids) == 1 and c.sample for c in self.chunks)

    @property
    def num_decode_steps(self) -> int:
        return max((c.num_steps for c in self.chunks), default=0)


class Scheduler:
    def __init__(self, cache: PagedKVCache, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, prefix_cache: PrefixCache | None = None, max_decode_steps: int = 1):
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_seqs and max_num_batched_tokens must be >= 1, got {max_num_seqs}, {max_num_batched_tokens}"
            )
        if max_decode_steps < 1:
            raise ValueError(f"max_decode_steps must be >= 1, got {max_decode_steps}")
        self.max_decode_steps = max_decode_steps
        if max_num_seqs > cache.max_batch_size:
            raise ValueError(f"max_num_seqs {max_num_seqs} exceeds the cache's max_batch_size {cache.max_batch_size}")
        self.cache = cache
        self.page_size = cache.page_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = min(max_model_len, cache.max_seq_len)
        self.prefix_cache = prefix_cache
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order
        self.num_preemptions = 0
        self._scheduled: list[Request] = []
        self._finished_ids: list[Hashable] = []
        self._num_registered: dict[Hashable, int] = {}  # full pages of a request already in the prefix cache

    # -- requests --------------------------------------------------------------------------
    def add(self, request: Request) -> bool:
        """Queue a request, or finish it as rejected (False) if it could never fit."""
        reason = self._why_never_fits(request)
        if reason is not None:
            request.finish(FinishReason.REJECTED, reason)
            self._finished_ids.append(request.request_id)
            return False
        self.waiting.append(request)
        return True

    def abort(self, request: Request) -> None:
        if request.state is RequestState.RUNNING:
            self._release(request)
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.finish(FinishReason.ABORTED)
        self._finished_ids.append(request.request_id)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _why_never_fits(self, request: Request) -> str | None:
        total = request.num_prompt_tokens + request.params.max_new_tokens
        if total > self.max_model_len:
            return (f"prompt of {request.num_prompt_tokens} tokens + max_new_tokens {request.params.max_new_tokens} "
                    f"= {total} tokens exceeds the model length of {self.max_model_len}; shorten the prompt or "
                    "lower max_new_tokens")
        pages = math.ceil(request.max_num_tokens / self.page_size)
        if pages > self.cache.num_pages:
            return (f"request needs up to {pages} KV-cache pages ({request.max_num_tokens} tokens, page_size "
                    f"{self.page_size}) but the whole pool has {self.cache.num_pages}; give the engine more "
                    "pages (num_pages / memory_fraction) or lower max_new_tokens")
        return None

    # -- one step --------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(finished_ids=self._finished_ids)
        self._finished_ids = []
        window = self._plan_decode_window()
        if window is not None:
            self._scheduled = list(self.running)
            out.chunks = [self._chunk(r, 1, steps) for r, steps in zip(self.running, window)]
            return out
        budget = self.max_num_batched_tokens
        claimed = 0  # pages this step's chunks will take in cache.prepare
        planned: dict[Hashable, tuple[Request, int, int]] = {}  # id -> (request, tokens, pages)

        def available() -> int:
            return self._num_obtainable_pages() - claimed

        decodes = [r for r in self.running if r.num_tokens_to_compute == 1]
        prefills = [r for r in self.running if r.num_tokens_to_compute > 1]
        for request in decodes + prefills:
            if request.state is not RequestState.RUNNING:
                continue  # preempted earlier in this step
            if budget == 0:
                break
            n = min(request.num_tokens_to_compute, budget)
            need = self.cache.tables.num_pages_needed(request.request_id, n)
            while need > available() and request.state is RequestState.RUNNING:
                victim = self.running[-1]
                if victim.request_id in planned:  # give back what it was counted for
                    _, v_tokens, v_pages = planned.pop(victim.request_id)
                    budget += v_tokens
                    claimed -= v_pages
                self._preempt(victim)
                out.preempted_ids.append(victim.request_id)
            if request.state is RequestState.RUNNING:
                planned[request.request_id] = (request, n, need)
                budget -= n
                claimed += need

        # Admit waiting requests (first come, first served) only when nothing had to be preempted.
        while (not out.preempted_ids and self.waiting and budget > 0
               and len(self.running) < self.max_num_seqs):
            request = self.waiting[0]
            prefix = []
            if self.prefix_cache is not None:
                prefix = self.prefix_cache.match(request.all_token_ids, request.page_hashes)
            num_cached = len(prefix) * self.page_size
            n = min(request.num_tokens - num_cached, budget)
            need = math.ceil((num_cached + n) / self.page_size) - len(prefix)
            # matched pages nobody holds count as evictable now, but stop being so once shared
            reused = self.prefix_cache.num_evictable_among(prefix) if self.prefix_cache else 0
            if need + reused > available():
                break
            self.waiting.popleft()
            self.cache.add(request.request_id, prefix_pages=prefix, prefix_len=num_cached)
            if self.prefix_cache is not None:
                self.prefix_cache.acquire(prefix, request.num_tokens)
            self._num_registered[request.request_id] = len(prefix)
            request.num_computed_tokens = num_cached
            request.num_cached_tokens = num_cached
            request.state = RequestState.RUNNING
            self.running.append(request)
            planned[request.request_id] = (request, n, need)
            budget -= n
            claimed += need

        self._free_pages_for(claimed)
        self._scheduled = []
        for request, n, _ in planned.values():
            out.chunks.append(self._chunk(request, n))
            self._scheduled.append(request)
        return out

    def _chunk(self, request: Request, n: int, num_steps: int = 1) -> ScheduledChunk:
        start = request.num_computed_tokens
        return ScheduledChunk(
            request_id=request.request_id,
            token_ids=request.all_token_ids[start: start + n],
            start_position=start,
            sample=start + n == request.num_tokens,
            params=request.params,
            num_steps=num_steps,
            seed=request.seed,
        )

    def _plan_decode_window(self) -> list[int] | None:
        """Steps per running request when this step can be a multi-step decode window, else None.

        A window runs when every running request is decoding, none waits that could be admitted
        instead, and the pool holds every row's pages for the whole window (otherwise a plain step,
        which may preempt). A row runs at most until its max_new_tokens; one that stops early (EOS,
        stop token) finishes after the window, and its extra tokens are dropped.
        """
        if self.max_decode_steps == 1 or not self.running:
            return None
        if self.waiting and len(self.running) < self.max_num_seqs:
            return None
        if len(self.running) > self.max_num_batched_tokens:
            return None
        if any(r.num_tokens_to_compute != 1 for r in self.running):
            return None
        steps = [min(self.max_decode_steps, r.params.max_new_tokens - len(r.output_token_ids)) for r in self.running]
        need = sum(self.cache.tables.num_pages_needed(r.request_id, n) for r, n in zip(self.running, steps))
        if need > self._num_obtainable_pages():
            return None
        self._free_pages_for(need)
        return steps

    def update(self, out: SchedulerOutput, sampled: list[list[int]]) -> list[tuple[Hashable, list[int], bool]]:
        """Apply a step's results: advance computed tokens, append sampled ones, finish requests.

        sampled: per chunk, the tokens it sampled ([] mid-prompt, up to num_steps in a decode window).
        Returns (request id, new token ids, finished) per scheduled request.
        """
        if len(sampled) != len(out.chunks):
            raise ValueError(f"got {len(sampled)} sampled token lists for {len(out.chunks)} scheduled chunks")
        now = time.perf_counter()
        results = []
        for request, chunk, tokens in zip(self._scheduled, out.chunks, sampled):
            if chunk.sample and not 1 <= len(tokens) <= chunk.num_steps:
                raise ValueError(f"request {chunk.request_id!r}: {len(tokens)} sampled tokens for a chunk "
                                 f"of {chunk.num_steps} step(s)")
            new_tokens = []
            for token in tokens if chunk.sample else ():
                request.append_token(int(token), now)
                new_tokens.append(int(token))
                if request.is_finished:  # a row that stopped mid-window drops the rest
                    break
            # a window's step k computes the token sampled at step k - 1
            request.num_computed_tokens += len(chunk.token_ids) + max(len(new_tokens) - 1, 0)
            self._register_pages(request)
            if request.is_finished:
                self._release(request)
                self.running.remove(request)
                self._finished_ids.append(request.request_id)
            else:
                dropped = self.cache.release_out_of_window(request.request_id)
                if dropped and self.prefix_cache is not None:
                    self.prefix_cache.release(dropped)
            results.append((request.request_id, new_tokens, request.is_finished))
        self._scheduled = []
        return results

    # -- pages -----------------------------------------------------------------------------
    def _num_obtainable_pages(self) -> int:
        """Free pages plus cached pages nobody holds (evictable on demand)."""
        evictable = self.prefix_cache.num_evictable if self.prefix_cache else 0
        return self.cache.allocator.num_free + evictable

    def _free_pages_for(self, num_pages: int) -> None:
        """Evict prefix-cache pages until the allocator has num_pages free (counted as obtainable)."""
        shortfall = num_pages - self.cache.allocator.num_free
        if shortfall > 0:
            self.prefix_cache.evict(shortfall)

    def _register_pages(self, request: Request) -> None:
        if self.prefix_cache is None:
            return
        num_full = request.num_computed_tokens // self.page_size
        first = self._num_registered[request.request_id]
        if num_full > first:
            table = self.cache.block_table(request.request_id)
            self.prefix_cache.insert(request.all_token_ids, table, first, num_full, request.page_hashes)
            self._num_registered[request.request_id] = num_full

    def _release(self, request: Request) -> None:
        """Free the request's sequence in the cache; cached pages it held may become evictable."""
        table = self.cache.block_table(request.request_id)
        self.cache.free(request.request_id)
        self._num_registered.pop(request.request_id, None)
        if self.prefix_cache is not None:
            self.prefix_cache.release([p for p in table if p >= 0])

    def _preempt(self, request: Request) -> None:
        self._release(request)
        self.running.remove(request)
        request.state = RequestState.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)
