"""LLMEngine: continuous batching over the paged KV cache (offline generate, online add_request / step / stream)."""

from __future__ import annotations

import itertools
import logging
import math
import time
from dataclasses import replace
from typing import Callable, Hashable, Iterator, NamedTuple

import torch

from fms.cache.kv_manager import KVManager
from fms.cache.paged import pages_for_budget
from fms.cache.state import CheckpointLayout
from fms.modules.attention import get_attention_op
from fms.runtime.inputs import prompt_token_ids
from fms.serving.config import EngineConfig
from fms.serving.detokenizer import IncrementalDetokenizer
from fms.serving.model_runner import ModelRunner
from fms.serving.request import FinishReason, Request, RequestOutput, SamplingParams
from fms.serving.scheduler import ScheduledChunk, Scheduler, SchedulerOutput
from fms.serving.trace import StepTrace, from_env as step_trace_from_env

logger = logging.getLogger(__name__)



class _StartupProgress:
    """Times the engine's start-up phases into `into` and shows them with tqdm on a terminal."""

    def __init__(self, into: dict[str, float], names: tuple[str, ...]):
        from tqdm.auto import tqdm

        self.into, self.names, self.start = into, names, time.perf_counter()
        self.bar = tqdm(total=len(names), desc=f"engine start-up: {names[0]}", unit="phase", disable=None,
                        leave=False, dynamic_ncols=True)

    def done(self) -> None:
        now = time.perf_counter()
        name = self.names[len(self.into)]
        self.into[name] = now - self.start
        self.start = now
        self.bar.update(1)
        if len(self.into) < len(self.names):
            self.bar.set_description(f"engine start-up: {self.names[len(self.into)]} "
                                     f"({sum(self.into.values()):.1f} s so far)")
        else:
            self.bar.close()
            logger.info("engine ready in %.1f s: %s", sum(self.into.values()),
                        ", ".join(f"{k} {v:.1f} s" for k, v in self.into.items()))


class StepOutput(NamedTuple):
    request_id: Hashable
    new_token_ids: list[int]
    finished: bool


class LLMEngine:
    """Serve many requests at once from one page pool.

        engine = LLMEngine(model, tokenizer)
        outs = engine.generate(["Hello", [1, 2, 3]], SamplingParams(max_new_tokens=32))
        rid = engine.add_request([1, 2, 3], SamplingParams()); engine.step() ...

    Options: an EngineConfig (fms.serving.config), or its fields as keywords
    (LLMEngine(model, max_num_seqs=8) is LLMEngine(model, config=EngineConfig(max_num_seqs=8))).
    Prefill chunks of one step run as one packed row without padding when the model allows it
    (causal attention without a window); otherwise as right-padded rows.
    """

    def __init__(self, model, tokenizer=None, config: EngineConfig | None = None, **options):
        if config is None:
            config = EngineConfig.from_kwargs(**options)
        elif not isinstance(config, EngineConfig):
            raise ValueError(f"config must be an EngineConfig, got {type(config).__name__}")
        elif options:
            EngineConfig.check_names(options)
            config = replace(config, **options)
        self.model = model
        self.tokenizer = tokenizer
        spec = model.cache_spec()
        is_cuda = spec.device.type == "cuda"
        self.config = config = config.for_device(is_cuda, model.config.max_position_embeddings)
        self.max_model_len = config.max_model_len
        num_pages = config.num_pages
        if num_pages is None:
            if config.memory_gb is not None:
                num_pages = pages_for_budget(spec, config.page_size, memory_gb=config.memory_gb)
            elif is_cuda:
                num_pages = pages_for_budget(spec, config.page_size, memory_fraction=config.memory_fraction or 0.9)
            else:
                num_pages = config.max_num_seqs * math.ceil(min(config.max_model_len, 1024) / config.page_size)
        tp = getattr(model, "tp", None)
        if tp is not None:  # every rank's scheduler must see the same pool: the smallest of the ranks'
            num_pages = tp.min_int(num_pages)
        enable_prefix_caching = config.enable_prefix_caching
        checkpoints = None  # a hybrid resumes a cached prefix from a checkpoint of its Mamba state, kept in pages
        if enable_prefix_caching and spec.state_spec is not None:
            layout = CheckpointLayout.for_spec(spec, config.page_size)
            if layout is None:
                logger.info("prefix caching off: a model without attention layers has no pages for state checkpoints")
                enable_prefix_caching = False
            else:
                checkpoints = layout.policy()
        # start-up by phase, in seconds (shown as they run on a terminal; in stats()["startup_s"])
        self.startup_s: dict[str, float] = {}
        phases = _StartupProgress(self.startup_s, ("KV pool", "decode step: compile + graph capture",
                                                   "prefill warm-up"))
        # the one host owner of pages, slots and prefix hits; the scheduler decides through it, the
        # cache (the paged op's device pool) applies its grants
        self.kv = KVManager(num_pages, config.page_size, config.max_num_seqs,
                            enable_prefix_caching=enable_prefix_caching, checkpoints=checkpoints)
        self.cache = get_attention_op("paged").create_cache(spec, max_batch_size=config.max_num_seqs,
                                                            max_seq_len=config.max_model_len, manager=self.kv)
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens, config.max_model_len,
                                   max_decode_steps=config.max_decode_steps, window=self.cache.window)
        phases.done()
        self.runner = ModelRunner(model, self.cache, config)
        phases.done()
        if is_cuda:
            self._warmup_prefill(config.max_num_batched_tokens)
        phases.done()
        eos = set(model.config.eos_token_ids) if hasattr(model.config, "eos_token_ids") else set()
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)
        self.requests: dict[Hashable, Request] = {}
        self._ids = itertools.count()
        self._rejected: list[Hashable] = []  # finished outside a step (rejected, error): reported by the next step()
        self.last_failed_request_ids: list[Hashable] = []  # requeued by the last step that raised
        self.num_steps = 0
        self.num_batched_tokens = 0
        self.num_decode_windows = 0  # steps that ran several decode steps back to back
        self.time_s = dict.fromkeys(("schedule", "execute", "update"), 0.0)  # host wall time per phase
        self.trace: StepTrace | None = step_trace_from_env()  # FMS_STEP_TRACE: a timeline of adds and steps

    @property
    def prefix_cache(self):
        """The KV manager's prefix cache, or None when prefix caching is off."""
        return self.kv.prefix_cache

    # -- online API ------------------------------------------------------------------------
    def add_request(self, prompt, params: SamplingParams | None = None, request_id: Hashable | None = None) -> Hashable:
        """Queue a prompt (token ids, or text with a tokenizer); returns its request id.

        Raises ValueError for a malformed prompt. A prompt that can never fit (model length, page
        pool) is not an error here: it finishes at once with finish_reason "rejected" and a message.
        """
        return self._add(self._encode(prompt), params, request_id)

    def _add(self, token_ids: list[int], params: SamplingParams | None, request_id: Hashable | None = None) -> Hashable:
        """add_request on a prompt already encoded and checked."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        vocab_size = self.model.config.vocab_size
        outside = [t for t in params.stop_token_ids if t >= vocab_size]
        if outside:
            raise ValueError(f"stop_token_ids {outside} are outside the vocabulary (ids 0..{vocab_size - 1})")
        if (params.stop or params.stream_text) and self.tokenizer is None:
            raise ValueError("stop strings and stream_text need the engine's tokenizer; pass LLMEngine(model, "
                             "tokenizer) or use stop_token_ids")
        if request_id is None:
            request_id = next(self._ids)
            while request_id in self.requests:
                request_id = next(self._ids)
        elif request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        request = Request(request_id, token_ids, params, eos_token_ids=self.eos_token_ids)
        self.requests[request_id] = request
        if self.trace is not None:
            self.trace.add(time.perf_counter())
        if not self.scheduler.add(request):
            logger.warning("request %r rejected: %s", request_id, request.error)
            self._rejected.append(request_id)
        return request_id

    def step(self, while_waiting: Callable[[], None] | None = None) -> list[StepOutput]:
        """Run one scheduled batch; returns the new tokens per request touched (and rejections).

        while_waiting: host work to run once while the device runs this step (AsyncEngine delivers the last
        step's tokens there). It must not touch the requests of this step; what it raises is raised by step()
        as a step failure would be, so it should not raise (AsyncEngine keeps its errors to raise afterwards).

        A step is a transaction. If anything in it raises (the forward, sampling, an interrupt), the
        scheduler rolls it back before the exception reaches the caller: no request gains or loses a
        token, the step's requests recompute their K/V later, and calling step() again goes on. After
        an Exception (not an interrupt) each request of the failed step runs alone for one step; one
        that fails twice alone finishes with finish_reason "error", reported by the next step.
        """
        held, self._rejected = self._rejected, []
        t0 = time.perf_counter()
        try:
            out = self.scheduler.schedule()
            if not out.chunks and self.scheduler.has_unfinished():
                raise RuntimeError("the scheduler could not schedule any request; this is a bug in the page "
                                   "accounting")
            t1 = time.perf_counter()
            sampled = self.runner.execute(out, while_waiting)
            t2 = time.perf_counter()
            results = self.scheduler.update(out, sampled)
            results = self._apply_text_and_logprobs(out, results)
            self.scheduler.commit()
        except BaseException as e:
            # a model with Mamba layers updates their state in place: its requests recompute instead
            failed = self.scheduler.rollback(restore=self.cache.state_pool is None)
            for request in failed:
                self._resync_outputs(request)
            self.last_failed_request_ids = [r.request_id for r in failed]
            errored = []
            if isinstance(e, Exception):
                errored = self.scheduler.isolate(failed, f"{type(e).__name__}: {e}")
            self._rejected = held + self._rejected + [r.request_id for r in errored]
            logger.warning("step failed (%s: %s); rolled back %d request(s)%s", type(e).__name__, e, len(failed),
                           f", finished {len(errored)} with an error" if errored else "")
            raise
        rejected = [StepOutput(rid, [], True) for rid in held]
        t3 = time.perf_counter()
        self.time_s["schedule"] += t1 - t0
        self.time_s["execute"] += t2 - t1
        self.time_s["update"] += t3 - t2
        self.num_steps += 1
        self.num_batched_tokens += out.num_batched_tokens
        self.num_decode_windows += out.num_decode_steps > 1
        if self.trace is not None:
            self.trace.step(t0, t3, out.num_batched_tokens, out.num_decode_steps)
        return rejected + [StepOutput(*r) for r in results]

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def _request(self, request_id: Hashable) -> Request:
        try:
            return self.requests[request_id]
        except KeyError:
            raise KeyError(f"unknown request id {request_id!r}: not added to this engine, or its output was "
                           f"already popped ({len(self.requests)} requests held)") from None

    def abort(self, request_id: Hashable) -> None:
        request = self._request(request_id)
        if not request.is_finished:
            self.scheduler.abort(request)

    def get_output(self, request_id: Hashable) -> RequestOutput:
        request = self._request(request_id)
        if request.detokenizer is not None:  # built token by token; cut at a stop string
            text = request.detokenizer.text
        else:
            text = self.tokenizer.decode(request.output_token_ids) if self.tokenizer is not None else None
        return RequestOutput.from_request(request, text)

    def pop_output(self, request_id: Hashable) -> RequestOutput:
        """The finished request's output; the engine forgets the request."""
        output = self.get_output(request_id)
        if not self._request(request_id).is_finished:
            raise ValueError(f"request {request_id!r} has not finished")
        del self.requests[request_id]
        return output

    def stream(self, prompts, sampling_params=None) -> Iterator[StepOutput]:
        """Queue prompts and yield (index of the prompt, new token ids, finished) as tokens come out.

        Other requests already queued run alongside but are not reported here. Each request is released
        once its last tokens are yielded (the stream is its output); closing the stream early aborts
        and releases the rest. A request that fails (see step()) ends with no new tokens; its reason
        is not reported here, use add_request/get_output for it.
        """
        ids = self._add_all(prompts, sampling_params)
        index = {rid: i for i, rid in enumerate(ids)}
        pending = set(ids)
        try:
            for rid in ids:
                if self.requests[rid].is_finished:  # rejected on arrival
                    pending.discard(rid)
                    del self.requests[rid]
                    yield StepOutput(index[rid], [], True)
            while pending:
                for rid, tokens, finished in self._step_on():
                    if rid in pending and (tokens or finished):
                        if finished:
                            pending.discard(rid)
                            del self.requests[rid]
                        yield StepOutput(index[rid], tokens, finished)
        finally:
            self._release(ids)

    def _step_on(self) -> list[StepOutput]:
        """step() for generate() and stream(): a step that failed and rolled back requests is logged
        (by step()) and the loop goes on, since isolation ends each request that keeps failing with an
        error; a failure that rolled back nothing, or an interrupt, is raised."""
        try:
            return self.step()
        except Exception:
            if not self.last_failed_request_ids:
                raise
            return []

    def _release(self, ids) -> None:
        """Abort and forget these requests, whatever state they are in (generate/stream cleanup)."""
        for rid in ids:
            request = self.requests.pop(rid, None)
            if request is not None and not request.is_finished:
                self.scheduler.abort(request)

    # -- offline API -----------------------------------------------------------------------
    def generate(self, prompts, sampling_params=None, use_tqdm: bool = True) -> list[RequestOutput]:
        """Run prompts to completion; one RequestOutput per prompt, in order."""
        ids = self._add_all(prompts, sampling_params)
        pending = {rid for rid in ids if not self.requests[rid].is_finished}
        progress = None
        if use_tqdm:
            from tqdm.auto import tqdm

            progress = tqdm(total=len(ids), desc="requests", unit="req", dynamic_ncols=True)
            progress.update(len(ids) - len(pending))
        start, num_out = time.perf_counter(), 0
        try:
            while pending:
                for rid, tokens, finished in self._step_on():
                    num_out += len(tokens)
                    if finished and rid in pending:
                        pending.discard(rid)
                        if progress is not None:
                            progress.update(1)
                if progress is not None:
                    progress.set_postfix_str(f"{num_out / (time.perf_counter() - start):.1f} output tok/s",
                                             refresh=False)
            return [self.pop_output(rid) for rid in ids]
        finally:  # an interrupt leaves no request of this call behind
            if progress is not None:
                progress.close()
            self._release(ids)

    def reset_stats(self) -> None:
        """Zero the counters stats() reports (e.g. after a warm-up run)."""
        self.num_steps = self.num_batched_tokens = self.num_decode_windows = 0
        self.time_s = dict.fromkeys(self.time_s, 0.0)
        self.scheduler.num_preemptions = 0
        self.runner.reset_counters()
        if self.kv.prefix_cache is not None:
            self.kv.prefix_cache.num_queried_tokens = self.kv.prefix_cache.num_hit_tokens = 0

    def stats(self) -> dict:
        pc = self.kv.prefix_cache
        kv = self.kv.stats()
        return {
            "num_steps": self.num_steps,
            "num_batched_tokens": self.num_batched_tokens,
            "num_preemptions": self.scheduler.num_preemptions,
            "num_decode_windows": self.num_decode_windows,
            "num_decode_forwards": self.runner.num_decode_forwards,
            "num_graph_forwards": self.runner.num_graph_forwards,
            "num_eager_forwards": self.runner.num_eager_forwards,
            "cuda_graphs": self.runner.graphs is not None,
            "compiled_decode": self.runner.decoder.compiled,
            "packed_prefill": self.runner.pack_prefill,
            "compiled_prefill": self.runner.prefill_compiled,
            "max_decode_steps": self.scheduler.max_decode_steps,
            "startup_s": dict(self.startup_s),
            "num_failed_steps": self.scheduler.num_failed_steps,
            # wall time: scheduler, runner (decode windows split into host launch and waiting for
            # the GPU), applying results; prefill forwards are in execute - decode
            "time_s": {**self.time_s, **self.runner.decoder.time_s},
            "num_pages": kv.num_pages,
            "page_size": self.kv.page_size,
            "num_running_requests": len(self.scheduler.running),
            "num_waiting_requests": len(self.scheduler.waiting),
            "num_finished_held_requests": sum(r.is_finished for r in self.requests.values()),
            "num_free_pages": kv.num_free_pages,
            "num_cached_pages": kv.num_cached_pages,
            "num_used_pages": kv.num_used_pages,
            "prefix_caching": pc is not None,
            "prefix_cache_queried_tokens": pc.num_queried_tokens if pc else 0,
            "prefix_cache_hit_tokens": pc.num_hit_tokens if pc else 0,
            "prefix_cache_hit_rate": pc.hit_rate if pc else 0.0,
            # hybrid models: Mamba-state checkpoints, in pages of the same pool (bytes = their whole pages)
            "num_cached_checkpoints": kv.num_checkpoints,
            "checkpoint_pages": kv.num_checkpoint_pages,
            "checkpoint_bytes": kv.checkpoint_bytes,
            "checkpoint_interval_pages": self.kv.checkpoints.interval if self.kv.checkpoints else 0,
        }

    # -- helpers ---------------------------------------------------------------------------
    def _resync_outputs(self, request: Request) -> None:
        """After a rollback dropped a request's outputs of the failed step: drop their logprobs, and
        rebuild its text from the outputs it kept (the detokenizer may have read the dropped ones)."""
        n = len(request.output_token_ids)
        if request.logprobs is not None:
            del request.logprobs[n:]
        detokenizer = request.detokenizer
        if detokenizer is not None and detokenizer.num_output_tokens != n:
            request.detokenizer = self._detokenizer(request)
            if n:
                request.detokenizer.add_tokens(request.output_token_ids)

    def _detokenizer(self, request: Request) -> IncrementalDetokenizer:
        """A fresh incremental detokenizer for this request's outputs (its stop strings, min_tokens)."""
        params = request.params
        return IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids, params.stop,
                                      params.include_stop_str_in_output, params.min_tokens)

    def _apply_text_and_logprobs(self, out: SchedulerOutput, results: list[tuple]) -> list[tuple]:
        """After the scheduler appended a step's tokens: attach their logprobs, extend the text of requests
        that build it token by token, and end those whose text reached a stop string. Such a request keeps
        its tokens up to the one that completed the stop string (later ones of a decode window are dropped)
        and is released through the scheduler, finishing with reason "stop"."""
        logprobs = {c.request_id: lp for c, lp in zip(out.chunks, self.runner.last_logprobs) if lp is not None}
        applied = []
        for rid, tokens, finished in results:
            request = self.requests.get(rid)
            if request is None or not tokens:
                applied.append((rid, tokens, finished))
                continue
            if rid in logprobs and request.logprobs is not None:
                request.logprobs.extend(logprobs[rid][:len(tokens)])
            params = request.params
            if request.detokenizer is None and (params.stop or params.stream_text):
                request.detokenizer = self._detokenizer(request)
            keep = request.detokenizer.add_tokens(tokens) if request.detokenizer is not None else None
            if keep is not None:
                extra = len(tokens) - keep
                if extra:
                    del request.output_token_ids[-extra:], request.token_times[-extra:]
                    if request.logprobs is not None:
                        del request.logprobs[len(request.output_token_ids):]
                    tokens = tokens[:keep]
                if finished:  # ended by length in the same step: the stop string names the reason
                    request.finish(FinishReason.STOP)
                else:
                    self.scheduler.abort(request, FinishReason.STOP)  # releases its pages
                finished = True
            applied.append((rid, tokens, finished))
        return applied

    def _warmup_prefill(self, max_chunk_tokens: int) -> None:
        """Run the runner's warm-up prefill steps on scratch sequences, freed afterwards whatever happens."""
        kv, ps = self.kv, self.kv.page_size
        for scenario in self.runner.warmup_steps(max_chunk_tokens):
            totals: dict[int, int] = {}
            for step in scenario:
                for i, n in step.items():
                    totals[i] = totals.get(i, 0) + n
            if sum(math.ceil(n / ps) for n in totals.values()) > kv.num_free_pages:
                break
            ids = {i: ("fms.serving", "warmup", i) for i in totals}
            new_slots = [kv.add(seq_id)[0] for seq_id in ids.values()]
            try:
                for step in scenario:
                    chunks = [ScheduledChunk(ids[i], [0] * n, kv.length(ids[i]), False, SamplingParams())
                              for i, n in step.items()]
                    grants = kv.reserve([c.request_id for c in chunks], [len(c.token_ids) for c in chunks])
                    self.runner.execute(SchedulerOutput(chunks=chunks, grants=grants, new_slots=new_slots))
                    new_slots = []
            finally:
                for seq_id in ids.values():
                    kv.free(seq_id)
        self.runner.num_eager_forwards = 0

    def _add_all(self, prompts, sampling_params) -> list[Hashable]:
        if isinstance(prompts, (str, torch.Tensor)) or not isinstance(prompts, (list, tuple)):
            raise ValueError("prompts must be a list of prompts (token-id lists, or strings with a tokenizer)")
        if not prompts:
            raise ValueError("prompts is empty: give at least one prompt")
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"got {len(params)} sampling params for {len(prompts)} prompts; give one or one each")
        # Encode (and so validate) everything before queueing anything.
        encoded = [self._encode(p) for p in prompts]
        return [self._add(ids, p) for ids, p in zip(encoded, params)]

    def _encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("got a text prompt but the engine has no tokenizer; pass token ids or a tokenizer")
            prompt = self.tokenizer.encode(prompt)
        return prompt_token_ids(prompt, self.model.config.vocab_size)
