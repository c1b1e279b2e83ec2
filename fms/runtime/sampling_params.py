"""SamplingParams: how one sequence picks its tokens and when it stops (used by generate() and the engine)."""

from __future__ import annotations

import math
import numbers
from dataclasses import InitVar, dataclass

from fms.runtime.inputs import as_int

# Temperatures in (0, MIN_TEMPERATURE) are greedy: logits / T would overflow float32 (T = 1e-44
# turned every logit into inf and sampled token 0), and T -> 0 is greedy in the limit anyway.
MIN_TEMPERATURE = 1e-5
# top_p below this keeps the most likely token alone, as the value given would; a smaller one
# rounds to 0 in float32, and a nucleus of mass 0 would drop every token.
MIN_TOP_P = 1e-6
# A seed is any int torch.manual_seed takes: the signed and the unsigned 64-bit ranges.
MIN_SEED, MAX_SEED = -(2**63), 2**64 - 1
DEFAULT_MAX_NEW_TOKENS = 16
# Most top alternatives a request may ask logprobs for (OpenAI's top_logprobs bound, vLLM's default
# max_logprobs); a decode window computes this many for every row when any row asks.
MAX_LOGPROBS = 20


def check_seed(seed, name: str = "seed") -> int | None:
    """seed (None or an int in [MIN_SEED, MAX_SEED]) as a Python int; ValueError naming it otherwise."""
    if seed is None:
        return None
    value = as_int(seed)
    if value is None or not MIN_SEED <= value <= MAX_SEED:
        raise ValueError(f"{name} must be None or an int in [-2**63, 2**64 - 1], got {seed!r}")
    return value


def _real(value, name: str, allowed: str) -> float:
    # float and int by type first (bool is neither): the numbers.Real ABC check costs microseconds per request
    real = type(value) in (float, int) or (not isinstance(value, bool) and isinstance(value, numbers.Real))
    if not real or not math.isfinite(value):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens and when it stops.

    Greedy decoding is `temperature == 0` (the default); any temperature >= MIN_TEMPERATURE
    (1e-5) samples, after top_k / top_p filtering. A temperature in (0, 1e-5) is greedy and is
    stored as 0.0. top_p in (0, 1]; one below MIN_TOP_P (1e-6) is stored as 1e-6 (it keeps the
    most likely token alone either way).

    seed: with a seed, a request's samples depend only on the seed and the token's position, not
    on what else is in the batch. Any int in [-2**63, 2**64 - 1] (torch.manual_seed's range);
    the sampler mixes all 64 bits into its noise, so seeds differing in any bit sample apart. As in
    torch, a seed is read as 64 bits: s and s - 2**64 (e.g. 2**64 - 1 and -1) are the same seed.
    Without a seed, one is drawn from torch's generator when the request starts, so that
    torch.manual_seed makes a run repeatable.

    The request stops at max_new_tokens (max_tokens is vLLM's name for it: give either, or both
    equal), at an EOS token of the model / tokenizer (unless ignore_eos), at any of
    stop_token_ids, or when its text contains one of the `stop` strings (the engine needs a
    tokenizer for those; the returned text ends before the stop string unless
    include_stop_str_in_output). Before min_tokens output tokens none of these stop it (as in
    vLLM, except that here an EOS / stop token sampled early is kept in the output).

    stream_text: build the output text token by token as the request runs (what a streaming server
    reads each step) instead of decoding it once when asked; stop strings imply it.

    logprobs: None, or k in [0, 20]: each output token carries its log-probability under the
    model (log_softmax of the raw logits, before temperature / top-k / top-p) and the k most
    likely tokens with theirs, computed on the device in the step that samples it.
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float = 1.0
    seed: int | None = None
    max_new_tokens: int | None = None  # None: max_tokens, or DEFAULT_MAX_NEW_TOKENS
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    stop: tuple[str, ...] = ()
    include_stop_str_in_output: bool = False
    min_tokens: int = 0
    logprobs: int | None = None
    stream_text: bool = False
    max_tokens: InitVar[int | None] = None

    def __post_init__(self, max_tokens):
        def store(name, value):
            object.__setattr__(self, name, value)

        temperature = _real(self.temperature, "temperature", "a finite number >= 0 (0 = greedy)")
        if temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        store("temperature", 0.0 if temperature < MIN_TEMPERATURE else temperature)
        if self.top_k is not None:
            top_k = as_int(self.top_k)
            if top_k is None or top_k < 1:
                raise ValueError(f"top_k must be None (no limit) or an int >= 1, got {self.top_k!r}")
            store("top_k", top_k)
        top_p = _real(self.top_p, "top_p", "a number in (0, 1]")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        store("top_p", max(top_p, MIN_TOP_P))
        store("seed", check_seed(self.seed))
        store("max_new_tokens", self._resolve_max_new_tokens(max_tokens))
        stops = self.stop_token_ids
        if isinstance(stops, (str, bytes)) or not hasattr(stops, "__iter__"):
            raise ValueError(f"stop_token_ids must be a sequence of token ids, got {stops!r}")
        stops = tuple(stops)
        ids = tuple(as_int(t) for t in stops)
        if not all(t is not None and t >= 0 for t in ids):
            raise ValueError(f"stop_token_ids must be ints >= 0, got {list(stops)}")
        store("stop_token_ids", ids)
        for name in ("ignore_eos", "include_stop_str_in_output", "stream_text"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        store("stop", _stop_strings(self.stop))
        min_tokens = as_int(self.min_tokens)
        if min_tokens is None or not 0 <= min_tokens <= self.max_new_tokens:
            raise ValueError(f"min_tokens must be an int in [0, max_new_tokens={self.max_new_tokens}], "
                             f"got {self.min_tokens!r}")
        store("min_tokens", min_tokens)
        if self.logprobs is not None:
            logprobs = as_int(self.logprobs)
            if logprobs is None or not 0 <= logprobs <= MAX_LOGPROBS:
                raise ValueError(f"logprobs must be None or an int in [0, {MAX_LOGPROBS}] (top alternatives per "
                                 f"token), got {self.logprobs!r}")
            store("logprobs", logprobs)

    def _resolve_max_new_tokens(self, max_tokens) -> int:
        given = {name: value for name, value in (("max_new_tokens", self.max_new_tokens), ("max_tokens", max_tokens))
                 if value is not None}
        for name, value in given.items():
            count = as_int(value)
            if count is None or count < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
            given[name] = count
        if len(set(given.values())) > 1:
            raise ValueError(f"max_new_tokens={given['max_new_tokens']} and max_tokens={given['max_tokens']} "
                             "name the same limit: give one of them")
        return next(iter(given.values()), DEFAULT_MAX_NEW_TOKENS)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0


def _stop_strings(stop) -> tuple[str, ...]:
    """None, a string or a sequence of non-empty strings -> a tuple of strings."""
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = (stop,)
    if isinstance(stop, bytes) or not hasattr(stop, "__iter__"):
        raise ValueError(f"stop must be a string or a list of strings, got {stop!r}")
    stop = tuple(stop)
    if not all(isinstance(s, str) and s for s in stop):
        raise ValueError(f"stop must hold non-empty strings, got {list(stop)!r}")
    return stop
