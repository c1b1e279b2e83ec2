"""Next-token sampling on the device, with per-row parameters and counter-based random numbers.

Every row draws its noise from a hash of (request seed, position of the token being sampled,
vocabulary index), not from a stateful torch.Generator:

    noise[b, v] = uniform(hash(seed[b], position[b], v))      ->  token = argmax(logits / T - log(-log noise))

so a request's samples depend only on its seed and position: not on the batch it runs in, not on
how many decode steps run inside one CUDA graph, and replaying a captured graph draws fresh
numbers because the positions advance. torch.Generator cannot give this (one stream per row,
usable inside graph capture), which is why the hash is written here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch

from fms.runtime.sampling_params import SamplingParams
from fms.runtime.transfer import to_device
from fms.triton import argmax as argmax_kernel

_MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finalizer on int64 tensors holding values < 2**32 (products stay < 2**63)."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    return (x >> 16) ^ x


def uniform_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(B,) int64 seeds (all 64 bits count) and positions -> (B, V) float32 uniforms strictly inside (0, 1).

    The low 32 seed bits key the row with the position; the high 32 bits, mixed, key the final
    mix. _mix32 is a bijection on 32 bits (and _mix32(0) == 0), so two seeds that differ only in
    their low half, or only in their high half, get different noise at every vocabulary index,
    and seeds below 2**32 draw the same numbers as when only the low half was used.
    """
    high = _mix32((seeds >> 32) & _MASK32)  # (B,) arithmetic shift: masked to the high 32 bits
    row = _mix32((seeds & _MASK32) ^ _mix32((positions * 0x9E3779B1) & _MASK32))  # (B,)
    vocab = torch.arange(vocab_size, device=seeds.device)
    bits = _mix32(_mix32(row[:, None] ^ vocab[None, :]) ^ (high ^ 0x27D4EB2F)[:, None])  # (B, V)
    return ((bits >> 8).float() + 0.5) * (1.0 / (1 << 24))  # top 24 bits: exact in float32, never 0 or 1


def seed_bits(seed: int) -> int:
    """Any int seed -> its 64-bit two's-complement pattern as an int64 value (seed mod 2**64).

    SamplingParams bounds seeds to [-2**63, 2**64 - 1]; generate() seeds row i with seed + i,
    which may pass 2**64 - 1 and wraps here instead of overflowing the int64 tensor.
    """
    return ((seed + 2**63) % 2**64) - 2**63


@dataclass
class SamplingTensors:
    """Per-row sampling parameters as device tensors (greedy rows: temperature 0)."""

    temperature: torch.Tensor  # (B,) float32
    top_k: torch.Tensor  # (B,) int64, vocab size when off
    top_p: torch.Tensor  # (B,) float32, 1 when off
    seeds: torch.Tensor  # (B,) int64

    @staticmethod
    def pack(params: Sequence[SamplingParams], seeds: Sequence[int], vocab_size: int):
        """Host rows: (B, 2) float32 [temperature, top_p] and (B, 2) int64 [top_k, seed]."""
        floats = torch.tensor([[p.temperature, p.top_p] for p in params], dtype=torch.float32)
        longs = torch.tensor([[min(p.top_k or vocab_size, vocab_size), seed_bits(s)] for p, s in zip(params, seeds)],
                             dtype=torch.int64)
        return floats, longs

    @classmethod
    def build(cls, params: Sequence[SamplingParams], seeds: Sequence[int], vocab_size: int, device):
        floats, longs = cls.pack(params, seeds, vocab_size)
        floats, longs = to_device(floats, device), to_device(longs, device)
        return cls(floats[:, 0], longs[:, 0], floats[:, 1], longs[:, 1])


def nucleus_drop(sorted_logits: torch.Tensor, top_p) -> torch.Tensor:
    """Top-p over logits sorted descending (B, V): True where a token falls outside the nucleus.

    A token is dropped once the probability mass ranked before it already reaches top_p (a float,
    or a (B, 1) tensor), so the first token always stays.
    """
    probs = sorted_logits.softmax(dim=-1)
    return (probs.cumsum(dim=-1) - probs) >= top_p


def argmax_rows(x: torch.Tensor, parts: int = 64) -> torch.Tensor:
    """x (B, V) -> (B,) index of each row's first maximum, as x.argmax(-1).

    Split in two passes over up to 64 column blocks when the vocabulary divides: one row of a
    128k vocabulary is otherwise a single-block reduction (measured 34 us of a 1.66 ms batch-1
    decode step on the H100). The first maximum of the first block holding the row maximum is the
    row's first maximum, so ties resolve as in argmax. `parts` is the most column blocks (a benchmark knob).
    With FMS_ARGMAX_KERNEL=1, the op fms::argmax_rows instead: a Triton kernel where it can run, else argmax.
    """
    if argmax_kernel.KERNEL_ON:  # FMS_ARGMAX_KERNEL=1; the op itself checks where its kernel can run
        return argmax_kernel.argmax_rows_op(x)
    b, v = x.shape
    while parts > 1 and v % parts:
        parts //= 2
    if parts == 1 or v < 8192:
        return x.argmax(dim=-1)
    block_max, block_arg = x.view(b, parts, v // parts).max(dim=-1)  # (B, P)
    best = block_max.argmax(dim=-1, keepdim=True)  # (B, 1)
    return (best * (v // parts) + block_arg.gather(1, best))[:, 0]


def needs_sampling(params: Sequence[SamplingParams]) -> bool:
    return not all(p.is_greedy for p in params)


def sample(logits: torch.Tensor, params: SamplingTensors | None, positions: torch.Tensor | None = None) -> torch.Tensor:
    """logits (B, V) -> token ids (B,). params None: every row greedy (argmax only).

    positions (B,): the position the sampled token will take in its sequence (the noise counter).
    No host synchronization: safe inside CUDA-graph capture.
    """
    greedy = argmax_rows(logits)
    if params is None:
        return greedy
    vocab = logits.shape[-1]
    is_greedy = params.temperature <= 0
    x = logits.float() / torch.where(is_greedy, 1.0, params.temperature)[:, None]
    # top-k and top-p on one descending sort; rows with neither keep every token
    sorted_x, order = x.sort(dim=-1, descending=True)
    rank = torch.arange(vocab, device=x.device)[None, :]
    drop = rank >= params.top_k[:, None]
    drop |= nucleus_drop(sorted_x.masked_fill(drop, float("-inf")), params.top_p[:, None]) & (params.top_p < 1)[:, None]
    x = x.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    gumbel = -torch.log(-torch.log(uniform_noise(params.seeds, positions, vocab)))
    sampled = argmax_rows(x + gumbel)
    return torch.where(is_greedy, greedy, sampled)


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor, k: int):
    """log-probabilities under the raw logits (B, V) of the sampled tokens (B,) and of each row's k most
    likely tokens: -> (token_logprob (B,), top_ids (B, k), top_logprobs (B, k)), all on the device.

    The caller passes only the rows that asked (prefill), or a decode window's rows (fixed shapes for
    CUDA graphs). No host synchronization.
    """
    logprobs = logits.float().log_softmax(dim=-1)  # (B, V)
    chosen = logprobs.gather(1, tokens[:, None].long())[:, 0]  # (B,)
    top_logprobs, top_ids = logprobs.topk(k, dim=-1) if k > 0 else (logprobs[:, :0], tokens[:, None][:, :0])
    return chosen, top_ids, top_logprobs


class TokenLogprobs(NamedTuple):
    """One output token's log-probability and its request's top-k alternatives [(token id, logprob)], most
    likely first (k = SamplingParams.logprobs; the sampled token may or may not be among them)."""

    logprob: float
    top: list[tuple[int, float]]


def host_logprobs(chosen: torch.Tensor, top_ids: torch.Tensor, top_logprobs: torch.Tensor,
                  ks: Sequence[int]) -> list[TokenLogprobs]:
    """logprobs_of's device tensors for B rows -> B TokenLogprobs, row b keeping its first ks[b] alternatives."""
    chosen, top_ids, top_logprobs = chosen.tolist(), top_ids.tolist(), top_logprobs.tolist()
    return [TokenLogprobs(c, list(zip(ids[:k], lps[:k]))) for c, ids, lps, k in zip(chosen, top_ids, top_logprobs, ks)]
