"""A serving request's parameters, state and timings, and what the engine hands back for it."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from collections.abc import Sequence
from typing import Hashable

import torch

from fms.runtime.sampler import TokenLogprobs
from fms.runtime.sampling_params import SamplingParams, check_seed
from fms.serving.detokenizer import IncrementalDetokenizer



class RequestState(enum.Enum):
    WAITING = "waiting"  # queued, holds no pages
    RUNNING = "running"  # holds pages, computed each step
    PREEMPTED = "preempted"  # pages taken back; recomputes prompt + outputs when readmitted
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    LENGTH = "length"  # reached max_new_tokens
    STOP = "stop"  # produced EOS, a stop token or a stop string
    REJECTED = "rejected"  # can never fit the page pool or the model context; see Request.error
    ABORTED = "aborted"  # the caller gave up on it (LLMEngine.abort)
    ERROR = "error"  # two steps with it alone failed (see Request.error)


class TokenIds(Sequence):
    """A request's prompt + outputs read in place: a slice copies only the tokens it covers (the
    scheduler reads a few tokens of long sequences every step)."""

    __slots__ = ("prompt", "outputs")

    def __init__(self, prompt: list[int], outputs: list[int]):
        self.prompt, self.outputs = prompt, outputs

    def __len__(self) -> int:
        return len(self.prompt) + len(self.outputs)

    def __getitem__(self, index):
        n = len(self.prompt)
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                return (self.prompt + self.outputs)[index]
            if stop <= n:
                return self.prompt[start:stop]
            if start >= n:
                return self.outputs[start - n: stop - n]
            return self.prompt[start:] + self.outputs[:stop - n]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"token index {index} out of range for {len(self)} tokens")
        return self.prompt[index] if index < n else self.outputs[index - n]


@dataclass(eq=False)
class Request:
    """One sequence being served. Tokens [0, num_computed_tokens) have K/V in the cache.

    The scheduler only reasons about num_computed_tokens against num_tokens: a request with
    num_tokens - num_computed_tokens > 1 is prefilling (a prompt, or prompt + outputs after a
    preemption), one with exactly 1 left is decoding its last sampled token.
    """

    request_id: Hashable
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    output_token_ids: list[int] = field(default_factory=list)
    state: RequestState = RequestState.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at the last admission
    num_preemptions: int = 0
    num_failures: int = 0  # failed steps it ran alone in as a suspect, since its last step alone that succeeded
    finish_reason: FinishReason | None = None
    error: str | None = None
    arrival_time: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    token_times: list[float] = field(default_factory=list)
    # chained hashes of this sequence's full pages, filled as the prefix cache registers them
    page_hashes: list[int] = field(default_factory=list)
    # the sampler's noise counter key: params.seed, or one drawn from torch's host generator
    seed: int | None = None
    # the output's text, built token by token (stop strings, streaming); None: decoded when asked
    detokenizer: IncrementalDetokenizer | None = None
    logprobs: list[TokenLogprobs] | None = None  # one per output token, when params.logprobs is set

    def __post_init__(self):
        if self.seed is None:
            self.seed = self.params.seed if self.params.seed is not None else int(torch.randint(0, 2**31 - 1, ()))
        else:
            self.seed = check_seed(self.seed)
        if self.params.logprobs is not None and self.logprobs is None:
            self.logprobs = []
        # every token that can end this request early (append_tokens checks a window's tokens at once)
        self._stop_ids = frozenset(self.params.stop_token_ids) | (
            frozenset() if self.params.ignore_eos else frozenset(self.eos_token_ids))

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def token_ids(self) -> TokenIds:
        """prompt + outputs without copying them (slice it for a list)."""
        return TokenIds(self.prompt_token_ids, self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_tokens_to_compute(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.state is RequestState.FINISHED

    @property
    def max_num_tokens(self) -> int:
        """Most tokens this request can ever hold in the cache (the last sampled one is never computed)."""
        return self.num_prompt_tokens + self.params.max_new_tokens - 1

    def append_token(self, token: int, now: float) -> None:
        """Record a sampled token and finish the request if it stops here."""
        self.output_token_ids.append(token)
        if self.first_token_time is None:
            self.first_token_time = now
        self.token_times.append(now)
        if len(self.output_token_ids) > self.params.min_tokens and token in self._stop_ids:
            self.finish(FinishReason.STOP)
        elif len(self.output_token_ids) >= self.params.max_new_tokens:
            self.finish(FinishReason.LENGTH)

    def append_tokens(self, tokens: list[int], now: float) -> list[int]:
        """append_token for each of tokens (ints), stopping at the one that finishes the request;
        returns the tokens kept. One pass in C when no stop token is among them (decode windows)."""
        params = self.params
        kept = tokens[:params.max_new_tokens - len(self.output_token_ids)]
        if not self._stop_ids.isdisjoint(kept):
            for i, token in enumerate(kept):
                self.append_token(token, now)
                if self.is_finished:
                    return kept[:i + 1]
            return kept
        if kept:
            if self.first_token_time is None:
                self.first_token_time = now
            self.output_token_ids += kept
            self.token_times += [now] * len(kept)
            if len(self.output_token_ids) >= params.max_new_tokens:
                self.finish(FinishReason.LENGTH)
        return kept

    def finish(self, reason: FinishReason, error: str | None = None) -> None:
        self.state = RequestState.FINISHED
        self.finish_reason = reason
        self.error = error


@dataclass
class RequestOutput:
    """What generate() returns per prompt; times are seconds.

    logprobs: one TokenLogprobs per token of token_ids when the request asked (SamplingParams.logprobs).
    stop_reason: the stop string that ended the request, if one did.
    """

    request_id: Hashable
    prompt_token_ids: list[int]
    token_ids: list[int]
    finish_reason: str
    text: str | None = None
    error: str | None = None
    time_to_first_token: float | None = None
    inter_token_latencies: list[float] = field(default_factory=list)
    latency: float | None = None  # arrival to last token
    num_cached_tokens: int = 0
    num_preemptions: int = 0
    logprobs: list[TokenLogprobs] | None = None
    stop_reason: str | None = None

    @classmethod
    def from_request(cls, request: Request, text: str | None = None) -> "RequestOutput":
        times = request.token_times
        return cls(
            request_id=request.request_id,
            prompt_token_ids=list(request.prompt_token_ids),
            token_ids=list(request.output_token_ids),
            finish_reason=request.finish_reason.value if request.finish_reason else "",
            text=text,
            error=request.error,
            time_to_first_token=None if request.first_token_time is None
            else request.first_token_time - request.arrival_time,
            inter_token_latencies=[b - a for a, b in zip(times, times[1:])],
            latency=times[-1] - request.arrival_time if times else None,
            num_cached_tokens=request.num_cached_tokens,
            num_preemptions=request.num_preemptions,
            logprobs=None if request.logprobs is None else list(request.logprobs),
            stop_reason=request.detokenizer.stop_reason if request.detokenizer is not None else None,
        )
