"""AsyncEngine: one LLMEngine stepped by one background thread, fed by many asyncio clients.

    HTTP handlers (event loop)                  engine thread
    submit(prompt, params) -> RequestStream --> intake queue --> engine.add_request
    async for delta in stream                   engine.step() -> deltas per request
        <-- loop.call_soon_threadsafe(put every delta of the step)
    stream.abort() (client gone) ------------> abort queue  --> engine.abort (pages freed)

Every request that arrives joins the running batch at the next step (continuous batching across
clients). The engine is touched by the engine thread only; handlers talk to it through the two
queues, so no lock is held around a step.

Under `fms serve` (--engine-process, the default) this loop runs in an engine process of its own: its deltas go
to a `sink` (fms.entrypoints.engine_process) instead of event loops, and the HTTP process holds the streams.

Under tensor parallel (fms serve -tp N) the thread also hands what it applied to the engine since the
last step (adds with their seeds, aborts) to `followers` before each step, and a stop when it ends, so
that the other ranks' engines apply the same and step with it (fms.entrypoints.tensor_parallel).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Hashable, Protocol

from fms.runtime.sampler import TokenLogprobs
from fms.serving.detokenizer import INITIAL_CONTEXT_TOKENS, IncrementalDetokenizer
from fms.serving.engine import LLMEngine, StepOutput
from fms.serving.request import SamplingParams

logger = logging.getLogger(__name__)

SNAPSHOT_INTERVAL_S = 0.05
# _hold_burst: how long an idle engine waits for a second request after a first, and for each next one after that
BURST_FIRST_GAP_S = 0.003
BURST_GAP_S = 0.010


def _put_deltas(items) -> None:
    """On an event loop: each (asyncio queue, delta) pair of one step, in order."""
    for queue_, delta in items:
        queue_.put_nowait(delta)


def post_deltas(items) -> None:
    """From any thread: each (stream, event loop, delta) to its stream, one wake-up per event loop (not one per
    request); a closed loop's clients are gone and get nothing."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = {}
    for stream, loop, delta in items:
        by_loop.setdefault(loop, []).append((stream._queue, delta))
    for loop, pairs in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_deltas, pairs)
        except RuntimeError:  # that loop is closed
            pass


class EngineFollowers(Protocol):
    """The other ranks of a tensor-parallel engine, as the engine thread of rank 0 sees them."""

    def send(self, events: list[tuple], will_step: bool) -> None:
        """Before each loop iteration's step (will_step) or idle wait: the events applied to the engine since
        the last call, in order: ("add", request_id, token_ids, params with its seed), ("abort", request_id)."""

    def stop(self) -> None:
        """The loop has ended: the followers leave theirs."""


class DeltaSink(Protocol):
    """Where the engine thread hands deltas when the clients live in another process (engine_process)."""

    def publish(self, deltas: list[tuple[Hashable, "Delta | Exception"]], stats: dict | None) -> None:
        """Once per step (and when stats change while idle): every delta of the step, in order, and the
        latest statistics snapshot when it changed since the last call (else None)."""


class EngineOverloaded(Exception):
    """The waiting queue is at its bound (--max-waiting): the client should retry later (HTTP 429)."""


class EngineStopped(Exception):
    """The server is shutting down and takes no new requests (HTTP 503)."""


@dataclass
class Delta:
    """What one step added to one request: new tokens, the text that may be sent now, their logprobs.
    text None: the engine built no text for it (no stop strings); the client side decodes the tokens."""

    token_ids: list[int]
    text: str | None
    logprobs: list[TokenLogprobs] | None = None
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: str | None = None
    error: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0


@dataclass
class RequestStream:
    """The client side of one request: an asyncio queue of Deltas, ended by one with finished=True."""

    request_id: Hashable
    num_prompt_tokens: int
    _client: "StreamOwner"
    _prompt_tail: list[int] = field(default_factory=list)
    _queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    _detokenizer: IncrementalDetokenizer | None = None
    finished: bool = False

    def __aiter__(self):
        return self

    async def __anext__(self) -> Delta:
        if self.finished:
            raise StopAsyncIteration
        delta = await self._queue.get()
        if isinstance(delta, BaseException):
            self.finished = True
            raise delta
        self.finished = delta.finished
        tokenizer = self._client.tokenizer
        if delta.text is None and tokenizer is None:
            delta.text = ""
        elif delta.text is None:  # decoded here, on the event loop, while the engine thread runs the model
            if self._detokenizer is None:
                self._detokenizer = IncrementalDetokenizer(tokenizer, self._prompt_tail)
            start = len(self._detokenizer.text)
            self._detokenizer.add_tokens(delta.token_ids)
            delta.text = self._detokenizer.text[start:]
        return delta

    def abort(self) -> None:
        """Give up on the request (the client went away): the engine aborts it and frees its pages."""
        if not self.finished:
            self.finished = True
            self._client.abort(self.request_id)


class StreamOwner(Protocol):
    """What a RequestStream needs from whoever created it (AsyncEngine, or engine_process.EngineProcessClient)."""

    tokenizer: object

    def abort(self, request_id: Hashable) -> None:
        ...


@dataclass
class _Tracked:
    """A request the engine thread delivers to: to stream on loop, or (both None) to the sink."""

    stream: RequestStream | None
    loop: asyncio.AbstractEventLoop | None
    num_prompt_tokens: int
    num_sent_chars: int = 0
    num_sent_tokens: int = 0


class AsyncEngine:
    """max_waiting: most requests queued but not yet running (None: no bound); one more is refused with
    EngineOverloaded. on_finish(output): called on the engine thread for each finished request (metrics).
    stats: engine.stats() plus num_pending_requests, refreshed by the engine thread every SNAPSHOT_INTERVAL_S.
    followers: under tensor parallel, the other ranks' engines to replicate every change to (None: one rank).
    sink: deliver to it instead of to event loops; requests then come through add() (the engine process).
    burst_wait_s: at most how long an idle engine holds its first step while a burst of requests is still
    arriving (_hold_burst); 0: never."""

    def __init__(self, engine: LLMEngine, max_waiting: int | None = None, on_finish=None,
                 followers: EngineFollowers | None = None, sink: DeltaSink | None = None,
                 burst_wait_s: float = 0.0):
        if max_waiting is not None and max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0 or None, got {max_waiting}")
        if isinstance(burst_wait_s, bool) or not isinstance(burst_wait_s, (int, float)) or not 0 <= burst_wait_s <= 1:
            raise ValueError(f"burst_wait_s must be in [0, 1] seconds, got {burst_wait_s!r}")
        self.burst_wait_s = burst_wait_s
        self.engine = engine
        self.max_waiting = max_waiting
        self.on_finish = on_finish
        self.followers = followers
        self.sink = sink
        self.stats = {**engine.stats(), "num_pending_requests": 0}
        self._snapshot_time = 0.0
        self._intake: queue.Queue = queue.Queue()
        self._aborts: queue.Queue = queue.Queue()
        self._wake = threading.Event()
        self._tracked: dict[Hashable, _Tracked] = {}
        self._outbox: list[tuple[Hashable, _Tracked, Delta | Exception]] = []  # this step's deliveries
        self._ids = itertools.count()
        self._num_pending = 0  # submitted, not yet running; read by submit() for the bound
        self._accepting = True
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.num_step_failures = 0

    # -- client side (event loop) ------------------------------------------------------------------
    def submit(self, prompt_token_ids: list[int], params: SamplingParams) -> RequestStream:
        """Queue a prompt (already tokenized and checked); raises EngineOverloaded / EngineStopped."""
        if not self._accepting or self._stop.is_set():
            raise EngineStopped("the server is shutting down and takes no new requests")
        if self.max_waiting is not None and self._num_pending >= self.max_waiting:
            raise EngineOverloaded(f"{self._num_pending} requests are already waiting (--max-waiting "
                                   f"{self.max_waiting}); retry later")
        request_id = f"cmpl-{next(self._ids)}"
        stream = RequestStream(request_id, len(prompt_token_ids), self, prompt_token_ids[-INITIAL_CONTEXT_TOKENS:])
        self._num_pending += 1
        tracked = _Tracked(stream, asyncio.get_running_loop(), len(prompt_token_ids))
        self._intake.put((request_id, prompt_token_ids, params, tracked))
        self._wake.set()
        return stream

    def add(self, request_id: Hashable, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Queue a prompt whose deltas go to the sink (any thread; no bound: the sender applied it)."""
        self._num_pending += 1
        self._intake.put((request_id, prompt_token_ids, params, _Tracked(None, None, len(prompt_token_ids))))
        self._wake.set()

    def abort(self, request_id: Hashable) -> None:
        """Abort a request (any thread): the engine thread frees its pages before the next step."""
        self._aborts.put(request_id)
        self._wake.set()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def vocab_size(self) -> int:
        return self.engine.model.config.vocab_size

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def num_pending(self) -> int:
        return self._num_pending

    @property
    def is_accepting(self) -> bool:
        return self._accepting and not self._stop.is_set()

    @property
    def failure(self) -> str | None:
        """Why the engine can no longer serve (None: it can); the engine thread's failures end single steps."""
        return None

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the engine loop is already running")
        self._thread = threading.Thread(target=self._run, name="fms-engine-loop", daemon=True)
        self._thread.start()

    def stop_intake(self) -> None:
        """Refuse new requests from now on; the ones in flight keep running."""
        self._accepting = False

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stop intake, let in-flight requests finish for up to timeout_s, abort the rest, end the loop."""
        self.stop_intake()
        deadline = time.monotonic() + timeout_s
        while self._tracked or not self._intake.empty():
            if time.monotonic() > deadline or self._thread is None or not self._thread.is_alive():
                break
            time.sleep(0.02)
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, timeout_s))

    # -- engine thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        followers = self.followers
        # A step's tokens are delivered (deltas built, handed to the sink or the event loops) while the device
        # runs the next step (LLMEngine.step's while_waiting), not between the two: the delivery of 128 requests
        # kept a 1B model's GPU idle ~1 ms a step under fms serve (session 25's step traces). With no next step
        # they are delivered at once. An error in a delivery is raised after the step, which stands.
        pending: list[StepOutput] = []
        delivery_error: list[BaseException] = []
        was_idle = True  # the last iteration found nothing to step

        def deliver_pending() -> None:
            nonlocal pending
            results, pending = pending, []
            try:
                self._deliver_results(results)
            except BaseException as e:  # noqa: BLE001  (raised below, outside the step, which must not roll back)
                delivery_error.append(e)

        try:
            while not self._stop.is_set():
                events = None if followers is None else []
                self._take_intake(events)
                self._take_aborts(events)
                # here too, not only after a step: aborts of waiting requests lower it without a step to follow
                self._num_pending = len(engine.scheduler.waiting) + self._intake.qsize()
                will_step = engine.has_unfinished_requests()
                if will_step and was_idle and self.burst_wait_s > 0:
                    self._hold_burst(events)
                was_idle = not will_step
                if followers is not None:
                    followers.send(events, will_step)
                if not will_step:
                    deliver_pending()
                    if delivery_error:
                        raise delivery_error[0]
                    if self._snapshot(force=False) and self.sink is not None:
                        self._flush(with_stats=True)
                    self._wake.wait(0.05)
                    self._wake.clear()
                    continue
                try:
                    results = engine.step(while_waiting=deliver_pending if pending else None)
                except Exception as e:  # the step rolled back; requests that keep failing end with an error
                    self.num_step_failures += 1
                    logger.exception("engine step failed: %s", e)
                    results = []
                    if not getattr(engine, "last_failed_request_ids", None):
                        time.sleep(0.05)  # nothing was rolled back: do not spin on a broken engine
                finally:
                    deliver_pending()  # when the step ended (or failed) before it ran them
                if delivery_error:
                    raise delivery_error[0]
                self._num_pending = len(engine.scheduler.waiting) + self._intake.qsize()
                pending = results
                if self._snapshot(force=False):
                    self._flush(with_stats=True)
        finally:
            deliver_pending()  # the last step's tokens (a request it finished ends as it did, not as aborted)
            self._abort_all("the server shut down before the request finished")
            if followers is not None:
                followers.stop()

    def _deliver_results(self, results: list[StepOutput]) -> None:
        """One step's tokens to their streams (requests aborted since are skipped), then one flush."""
        for request_id, _, finished in results:
            if request_id in self._tracked:
                self._deliver(request_id, finished)
        self._flush(with_stats=False)

    def _snapshot(self, force: bool) -> bool:
        """Engine statistics for other threads (metrics), taken here where the engine is not changing;
        True when they were taken and differ from the last snapshot."""
        now = time.monotonic()
        if not (force or now - self._snapshot_time >= SNAPSHOT_INTERVAL_S):
            return False
        stats = {**self.engine.stats(), "num_pending_requests": self._num_pending}
        self._snapshot_time = now
        if stats == self.stats:
            return False
        self.stats = stats
        return True

    def _hold_burst(self, events: list | None) -> None:
        """An idle engine that just took requests waits before its first step while more keep coming, so that a
        burst starts with a full step instead of a step over its first request or two. A prefill step costs about
        the same host time whatever its size (a 185-token step of a 1B model took 30-40 ms on an H100 against
        ~40 ms for 8,192 tokens, 1.9 ms of it GPU work; session 25's prefill probe), and under fms serve a burst
        of 128 requests reaches the engine over ~55 ms. It waits BURST_FIRST_GAP_S for a second arrival (a lone
        request waits no longer), then as long as requests keep coming less than BURST_GAP_S apart, until the
        waiting prompts fill one step's token budget or burst_wait_s has passed."""
        engine = self.engine
        budget = engine.config.max_num_batched_tokens
        start = last = time.monotonic()
        gap = BURST_FIRST_GAP_S
        while sum(r.num_prompt_tokens for r in engine.scheduler.waiting) < budget:
            now = time.monotonic()
            timeout = min(start + self.burst_wait_s, last + gap) - now
            if timeout <= 0 or self._stop.is_set():
                return
            self._wake.wait(timeout)
            self._wake.clear()
            if self._take_intake(events):
                last, gap = time.monotonic(), BURST_GAP_S
            self._take_aborts(events)

    def _take_intake(self, events: list | None) -> int:
        """Hand the queued requests to the engine; -> how many were taken."""
        taken = 0
        while True:
            try:
                request_id, token_ids, params, tracked = self._intake.get_nowait()
            except queue.Empty:
                return taken
            taken += 1
            if tracked.stream is not None and tracked.stream.finished:  # aborted before it reached the engine
                self._num_pending -= 1
                continue
            self._tracked[request_id] = tracked
            try:
                self.engine.add_request(token_ids, params, request_id=request_id)
            except Exception as e:  # checked before submit(); anything left is reported to that client alone
                del self._tracked[request_id]
                self._outbox.append((request_id, tracked, e))
                self._flush(with_stats=False)
                self._num_pending -= 1
                continue
            if events is not None:  # a follower must sample with the seed this request drew here
                seed = self.engine.requests[request_id].seed
                events.append(("add", request_id, token_ids, params if params.seed is not None
                               else replace(params, seed=seed)))
            if self.engine.requests[request_id].is_finished:  # rejected: can never fit the pool
                self._deliver(request_id, True)
                self._flush(with_stats=False)

    def _take_aborts(self, events: list | None) -> None:
        while True:
            try:
                request_id = self._aborts.get_nowait()
            except queue.Empty:
                return
            if self._tracked.pop(request_id, None) is not None and request_id in self.engine.requests:
                self.engine.abort(request_id)
                self.engine.pop_output(request_id)
                if events is not None:
                    events.append(("abort", request_id))

    def _deliver(self, request_id: Hashable, finished: bool) -> None:
        tracked = self._tracked[request_id]
        engine = self.engine
        request = engine.requests[request_id]
        finished = finished or request.is_finished
        output = engine.pop_output(request_id) if finished else None
        detokenizer = request.detokenizer
        text = None
        if detokenizer is not None:
            stable = detokenizer.text if finished else detokenizer.stable_text(False)
            text, tracked.num_sent_chars = stable[tracked.num_sent_chars:], len(stable)
        num_out, sent = len(request.output_token_ids), tracked.num_sent_tokens
        tracked.num_sent_tokens = num_out
        delta = Delta(
            token_ids=list(request.output_token_ids[sent:]),
            text=text,
            logprobs=None if request.logprobs is None else list(request.logprobs[sent:num_out]),
            finished=finished,
            num_prompt_tokens=request.num_prompt_tokens,
            num_output_tokens=num_out,
        )
        if finished:
            delta.finish_reason = output.finish_reason
            delta.stop_reason = output.stop_reason
            delta.error = output.error
            del self._tracked[request_id]
            if self.on_finish is not None:
                self.on_finish(output)
        self._outbox.append((request_id, tracked, delta))

    def _flush(self, with_stats: bool) -> None:
        """Hand this step's deltas to the sink, or to each event loop in one wake-up (not one per request)."""
        outbox, self._outbox = self._outbox, []
        if self.sink is not None:
            if outbox or with_stats:
                self.sink.publish([(request_id, delta) for request_id, _, delta in outbox],
                                  self.stats if with_stats else None)
            return
        post_deltas((tracked.stream, tracked.loop, delta) for _, tracked, delta in outbox)

    def _abort_all(self, reason: str) -> None:
        for request_id, tracked in list(self._tracked.items()):
            if request_id in self.engine.requests:
                try:
                    self.engine.abort(request_id)
                    self.engine.pop_output(request_id)
                except Exception:  # the loop is ending; the client still gets told
                    logger.exception("aborting %r at shutdown failed", request_id)
            self._outbox.append((request_id, tracked, Delta([], None, finished=True, finish_reason="abort",
                                                            error=reason,
                                                            num_prompt_tokens=tracked.num_prompt_tokens)))
        self._tracked.clear()
        try:
            self._flush(with_stats=False)
        except Exception:  # a sink whose process is gone; nobody is left to tell
            logger.exception("could not deliver the aborts at shutdown")
