"""Continuous-batching scheduler: which requests run each step, and how many tokens each computes.

There is no prefill or decode phase, only each request's num_computed_tokens catching up with its
num_tokens (prompt + outputs). A step gives every running decode its one token first, then
prefill chunks (new, partially prefilled, or recomputing after preemption) from what is left of
the token budget, so a long prompt never stalls the running decodes:

    budget 8, page_size 16       running: A decode, B prefill at 40/100     waiting: C (30 tokens)
    step:  A 1 token  |  B tokens 40..46 (7, budget spent)  |  C waits for a later step

Pages: the scheduler works only through the KV manager. A step is only scheduled if the manager
(free plus evictable prefix-cache pages) can give every chunk its pages; it then reserves them, and
the step's SchedulerOutput carries the grants (new page ids per request) and the slots of requests
that started, which the model runner applies to the device. When a running request cannot get its
pages, the most recently admitted request is preempted: its pages go back, it returns to the front
of the queue and later recomputes its prompt + outputs (full pages of it may still be in the prefix
cache).
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Hashable

from fms.cache.kv_manager import KVManager, PageGrant
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
    """The one thing the scheduler hands the model runner per step: what to compute, and the pages
    and slots the KV manager gave for it (already reserved; the runner writes them to the device)."""

    chunks: list[ScheduledChunk] = field(default_factory=list)
    grants: list[PageGrant] = field(default_factory=list)  # per request: table entries it was given
    new_slots: list[int] = field(default_factory=list)  # slots of requests that started this step
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
    """window: the model's sliding window (pages before it are released as requests advance)."""

    def __init__(self, kv: KVManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, max_decode_steps: int = 1, window: int | None = None):
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_seqs and max_num_batched_tokens must be >= 1, got {max_num_seqs}, {max_num_batched_tokens}"
            )
        if max_decode_steps < 1:
            raise ValueError(f"max_decode_steps must be >= 1, got {max_decode_steps}")
        self.max_decode_steps = max_decode_steps
        # The next window's most steps while the batch has room: 1 after a step that prefilled (admitted or resumed)
        # anything, doubled after each window up to max_decode_steps. Requests that arrive while a window runs wait
        # for its end; a burst that reaches the engine over several steps (an HTTP server admits one request at a
        # time) would otherwise wait for full windows of the few that came first. A full batch runs full windows:
        # no arrival could join it, and a busy server admits after every window as requests finish.
        self.window_ramp = 1
        self._ramp_before = 1
        if max_num_seqs > kv.max_num_seqs:
            raise ValueError(f"max_num_seqs {max_num_seqs} exceeds the KV manager's {kv.max_num_seqs} sequences")
        self.kv = kv
        self.window = window
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order
        self.num_preemptions = 0
        self._finished_ids: list[Hashable] = []
        # the step in progress, for rollback(): what it scheduled and admitted, set by schedule()
        self._out: SchedulerOutput | None = None
        self._scheduled: list[Request] = []
        self._admitted: list[Request] = []
        self._admitted_from: list[tuple[RequestState, int]] = []  # each admitted request's state and cached count
        self._updating = False  # update() started on the step in progress
        # requests of failed steps, each to run alone for one step before the batch goes on
        self.suspects: list[Request] = []
        self.num_failed_steps = 0

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

    def abort(self, request: Request, reason: FinishReason = FinishReason.ABORTED) -> None:
        """End a request now, wherever it is (its pages go back): the caller gave up on it, or (reason
        STOP) its text reached a stop string."""
        if request.state is RequestState.RUNNING:
            self._release(request)
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        if request in self.suspects:
            self.suspects.remove(request)
        request.finish(reason)
        self._finished_ids.append(request.request_id)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _why_never_fits(self, request: Request) -> str | None:
        total = request.num_prompt_tokens + request.params.max_new_tokens
        if total > self.max_model_len:
            return (f"prompt of {request.num_prompt_tokens} tokens + max_new_tokens {request.params.max_new_tokens} "
                    f"= {total} tokens exceeds the model length of {self.max_model_len}; shorten the prompt or "
                    "lower max_new_tokens")
        pages = math.ceil(request.max_num_tokens / self.kv.page_size)
        if pages > self.kv.num_pages:
            return (f"request needs up to {pages} KV-cache pages ({request.max_num_tokens} tokens, page_size "
                    f"{self.kv.page_size}) but the whole pool has {self.kv.num_pages}; give the engine more "
                    "pages (num_pages / memory_fraction) or lower max_new_tokens")
        return None

    # -- one step --------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        if self._out is not None:
            self.commit()
        out = SchedulerOutput(finished_ids=self._finished_ids)
        self._finished_ids = []
        self._out, self._scheduled, self._admitted, self._admitted_from = out, [], [], []
        self._ramp_before = self.window_ramp  # rollback() restores it
        self._updating = False
        if self.suspects:
            return self._schedule_alone(self.suspects[0], out)
        window = self._plan_decode_window()
        if window is not None:
            self.window_ramp = min(2 * self.window_ramp, self.max_decode_steps)
            self._scheduled = list(self.running)
            out.chunks = [self._chunk(r, 1, steps) for r, steps in zip(self.running, window)]
            out.grants = self.kv.reserve([r.request_id for r in self.running], window)
            return out
        budget = self.max_num_batched_tokens
        claimed = 0  # pages this step's chunks will take when reserved
        planned: dict[Hashable, tuple[Request, int, int]] = {}  # id -> (request, tokens, pages)

        def available() -> int:
            return self.kv.num_obtainable_pages - claimed

        decodes = [r for r in self.running if r.num_tokens_to_compute == 1]
        prefills = [r for r in self.running if r.num_tokens_to_compute > 1]
        for request in decodes + prefills:
            if request.state is not RequestState.RUNNING:
                continue  # preempted earlier in this step
            if budget == 0:
                break
            n = min(request.num_tokens_to_compute, budget)
            need = self.kv.num_pages_needed(request.request_id, n)
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
            prefix, n, need = self._admission(request, budget)
            # matched pages nobody holds count as evictable now, but stop being so once shared
            if need + self.kv.num_evictable_among(prefix) > available():
                break
            self.waiting.popleft()
            self._admit(request, prefix, out)
            planned[request.request_id] = (request, n, need)
            budget -= n
            claimed += need

        self.kv.make_room(claimed)
        for request, n, _ in planned.values():
            out.chunks.append(self._chunk(request, n))
            self._scheduled.append(request)
        if any(len(c.token_ids) > 1 for c in out.chunks) or self._admitted:
            self.window_ramp = 1
        out.grants += self.kv.reserve([c.request_id for c in out.chunks], [len(c.token_ids) for c in out.chunks])
        return out

    def _admission(self, request: Request, budget: int) -> tuple[list[int], int, int]:
        """A waiting request's first chunk if admitted now: (matched prefix pages, tokens to compute
        within budget, new pages they take)."""
        prefix = self.kv.match_prefix(request.token_ids, request.page_hashes)
        num_cached = len(prefix) * self.kv.page_size
        n = min(request.num_tokens - num_cached, budget)
        return prefix, n, math.ceil((num_cached + n) / self.kv.page_size) - len(prefix)

    def _admit(self, request: Request, prefix: list[int], out: SchedulerOutput) -> None:
        """Start a waiting request (already taken off the queue) on its matched prefix pages."""
        num_cached = len(prefix) * self.kv.page_size
        slot, grant = self.kv.add(request.request_id, prefix_pages=prefix, prefix_len=num_cached,
                                  num_query_tokens=request.num_tokens)
        self._admitted.append(request)
        self._admitted_from.append((request.state, request.num_cached_tokens))
        out.new_slots.append(slot)
        if grant is not None:
            out.grants.append(grant)
        request.num_computed_tokens = num_cached
        request.num_cached_tokens = num_cached
        request.state = RequestState.RUNNING
        self.running.append(request)

    def _schedule_alone(self, request: Request, out: SchedulerOutput) -> SchedulerOutput:
        """A step of this one request (a suspect of a failed step), preempting others for room if needed.

        The other running requests keep their pages but wait; nothing is admitted alongside."""
        def make_room(fits) -> None:
            while not fits():
                others = [r for r in self.running if r is not request]
                if not others:  # alone, it fits: add() rejected what could not
                    raise RuntimeError(f"request {request.request_id!r} does not fit the pool alone; this is a bug")
                self._preempt(others[-1])
                out.preempted_ids.append(others[-1].request_id)

        if request.state is not RequestState.RUNNING:
            prefix, _, need = self._admission(request, self.max_num_batched_tokens)
            make_room(lambda: (len(self.running) < self.max_num_seqs and
                               need + self.kv.num_evictable_among(prefix) <= self.kv.num_obtainable_pages))
            self.waiting.remove(request)
            self._admit(request, prefix, out)
        n = min(request.num_tokens_to_compute, self.max_num_batched_tokens)
        need = self.kv.num_pages_needed(request.request_id, n)
        make_room(lambda: need <= self.kv.num_obtainable_pages)
        self.kv.make_room(need)
        out.chunks = [self._chunk(request, n)]
        self._scheduled = [request]
        out.grants += self.kv.reserve([request.request_id], [n])
        return out

    def _chunk(self, request: Request, n: int, num_steps: int = 1) -> ScheduledChunk:
        start = request.num_computed_tokens
        return ScheduledChunk(
            request_id=request.request_id,
            token_ids=request.token_ids[start: start + n],
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
        stop token) finishes after the window, and its extra tokens are dropped. While the batch has room,
        a window runs at most window_ramp steps (1, 2, 4, ... after a prefill).
        """
        if self.max_decode_steps == 1 or not self.running:
            return None
        if self.waiting and len(self.running) < self.max_num_seqs:
            return None
        if len(self.running) > self.max_num_batched_tokens:
            return None
        if any(r.num_tokens_to_compute != 1 for r in self.running):
            return None
        # a full batch admits no one before some request finishes: nothing to ramp for
        limit = self.max_decode_steps if len(self.running) >= self.max_num_seqs else min(self.max_decode_steps,
                                                                                          self.window_ramp)
        steps = [min(limit, r.params.max_new_tokens - len(r.output_token_ids)) for r in self.running]
        if self.kv.checkpoints is not None:  # a hybrid's window stops where a Mamba-state checkpoint is wanted
            steps = [min(n, self.kv.decode_steps_until_checkpoint(r.request_id)) for r, n in zip(self.running, steps)]
        need = sum(self.kv.num_pages_needed(r.request_id, n) for r, n in zip(self.running, steps))
        if need > self.kv.num_obtainable_pages:
            return None
        self.kv.make_room(need)
        return steps

    def update(self, out: SchedulerOutput, sampled: list[list[int]]) -> list[tuple[Hashable, list[int], bool]]:
        """Apply a step's results: advance computed tokens, append sampled ones, finish requests.

        sampled: per chunk, the tokens it sampled ([] mid-prompt, up to num_steps in a decode window).
        Returns (request id, new token ids, finished) per scheduled request.
        """
        if len(sampled) != len(out.chunks):
            raise ValueError(f"got {len(sampled)} sampled token lists for {len(out.chunks)} scheduled chunks")
        self._updating = True
        now = time.perf_counter()
        results = []
        for request, chunk, tokens in zip(self._scheduled, out.chunks, sampled):
            if chunk.sample and not 1 <= len(tokens) <= chunk.num_steps:
                raise ValueError(f"request {chunk.request_id!r}: {len(tokens)} sampled tokens for a chunk "
                                 f"of {chunk.num_steps} step(s)")
            # a row that stops mid-window (EOS, stop token, length) drops the rest
            new_tokens = request.append_tokens(tokens, now) if chunk.sample else []
            # a window's step k computes the token sampled at step k - 1
            request.num_computed_tokens += len(chunk.token_ids) + max(len(new_tokens) - 1, 0)
            self.kv.commit_computed(request.request_id, request.token_ids, request.num_computed_tokens,
                                    request.page_hashes)
            if request.is_finished:
                self._release(request)
                self.running.remove(request)
                self._finished_ids.append(request.request_id)
            else:
                self.kv.release_out_of_window(request.request_id, self.window)
            results.append((request.request_id, new_tokens, request.is_finished))
        return results

    def commit(self) -> None:
        """The step in progress succeeded (update() and whatever its caller did with the results):
        forget what rollback() would need. The next schedule() commits a step nobody committed."""
        if len(self._scheduled) == 1 and self.suspects and self._scheduled[0] is self.suspects[0]:
            self.suspects.pop(0).num_failures = 0  # it ran alone and succeeded
        self._out, self._scheduled, self._admitted, self._admitted_from = None, [], [], []
        self._updating = False

    # -- failed steps ----------------------------------------------------------------------
    def rollback(self, restore: bool = True) -> list[Request]:
        """Undo the step in progress (not yet committed) after schedule(), the forward, update() or the
        caller's work on its results raised. Returns the requests the step scheduled or admitted.

        restore (the model keeps no state that a forward updates in place, i.e. no Mamba layers): when
        the step preempted nothing and update() had not started, the step is undone exactly. Its page
        reservations are taken back and the requests it admitted return to the front of the queue
        as they were, so requests, page tables, refcounts and slots are as before the step. (Pages
        the step evicted from the prefix cache stay evicted.)

        Otherwise every request the step scheduled or admitted gets back the tokens it had before the
        step (outputs appended by a partial update() are dropped, a finish in it is undone). It leaves
        the KV manager and goes to the front of the queue to recompute its K/V; its full pages are
        found again in the prefix cache when caching is on. Recomputing is exact for every model: a
        failed forward may have written Mamba states in place, and a preemption may have handed the
        victim's pages to the step. Requests preempted by the step stay preempted.
        """
        touched = list(dict.fromkeys(self._scheduled + self._admitted))
        out = self._out
        if out is not None:
            self.window_ramp = self._ramp_before
        if restore and out is not None and not self._updating and not out.preempted_ids:
            admitted = {r.request_id for r in self._admitted}
            self.kv.undo([g for g in out.grants if g.seq_id not in admitted])
            for request, (state, num_cached) in zip(reversed(self._admitted), reversed(self._admitted_from)):
                self.running.remove(request)
                self.kv.free(request.request_id)
                request.state, request.num_cached_tokens, request.num_computed_tokens = state, num_cached, 0
                self.waiting.appendleft(request)
            self._end_failed_step()
            return touched
        chunk_of = {c.request_id: c for c in out.chunks} if out is not None else {}
        for request in touched:
            chunk = chunk_of.get(request.request_id)
            if chunk is not None and chunk.sample:  # update() may have appended from here on
                num_outputs = chunk.start_position + len(chunk.token_ids) - request.num_prompt_tokens
                if len(request.output_token_ids) > num_outputs:
                    del request.output_token_ids[num_outputs:]
                    del request.token_times[num_outputs:]
                    if num_outputs == 0:
                        request.first_token_time = None
            if request.is_finished:  # finished by the failed update()
                request.finish_reason = request.error = None
                self._finished_ids = [i for i in self._finished_ids if i != request.request_id]
            if request in self.running:
                self.running.remove(request)
            if request.request_id in self.kv:
                self.kv.free(request.request_id)
            request.state = RequestState.PREEMPTED
            request.num_computed_tokens = 0
        self.waiting.extendleft(reversed(touched))
        self._end_failed_step()
        return touched

    def _end_failed_step(self) -> None:
        self._out, self._scheduled, self._admitted, self._admitted_from = None, [], [], []
        self._updating = False
        self.num_failed_steps += 1

    def isolate(self, failed: list[Request], error: str) -> list[Request]:
        """After rollback() of a step that raised: each failed request runs alone for a step before the
        batch goes on. One that fails twice more running alone as a suspect finishes with finish_reason
        "error" (the others go on); returns those. Two faults in a row harm nobody, even a request that
        was alone in the first failed step; a request that fails every step it is in costs the engine
        at most three failed steps."""
        errored = []
        for request in failed:
            if len(failed) == 1 and request in self.suspects:
                request.num_failures += 1
            if request.num_failures >= 2:
                if request in self.running:  # (an exact rollback keeps running requests running)
                    self._release(request)
                    self.running.remove(request)
                else:
                    self.waiting.remove(request)
                if request in self.suspects:
                    self.suspects.remove(request)
                request.finish(FinishReason.ERROR, f"{request.num_failures} steps with this request alone failed; "
                                                   f"the last: {error}")
                self._finished_ids.append(request.request_id)
                errored.append(request)
            elif request not in self.suspects:
                self.suspects.append(request)
        return errored

    # -- pages -----------------------------------------------------------------------------
    def _release(self, request: Request) -> None:
        """End the request's sequence in the KV manager; cached pages it held may become evictable."""
        self.kv.free(request.request_id)

    def _preempt(self, request: Request) -> None:
        self._release(request)
        self.running.remove(request)
        request.state = RequestState.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)
