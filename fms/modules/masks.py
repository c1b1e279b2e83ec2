"""Attention variants (causal, sliding window, ALiBi, softcap) as logical-position predicates and score functions.

Everything here is written in terms of LOGICAL token positions (position 0 is the first token of
the sequence), never kernel indices. Each attention op translates its own kernel indices to
logical positions and then calls these predicates; `contiguous_mask_mod` / `contiguous_score_mod`
are that translation for a plain contiguous cache, the paged op builds its own.

Conventions (checked against HF transformers 5.x):
- sliding window W: a query at position p sees keys at positions in (p - W, p], i.e. W keys
  including itself; key visible iff q_pos - kv_pos < W (HF `masking_utils.sliding_window_overlay`:
  `kv_idx > q_idx - sliding_window`, used by Mistral / Gemma2 sliding layers).
- softcap: scores are scaled, then soft-capped (cap * tanh(score / cap)), then biased and masked
  (HF Gemma2 `eager_attention_forward`: `q @ k^T * scaling`, softcap, then `+ attention_mask`).
  ALiBi is an additive bias, so it is added after the softcap, like HF's additive mask.
- ALiBi: bias = slope[head] * (kv_pos - q_pos) (<= 0 for visible keys); softmax-equivalent to
  BLOOM's `slope * kv_pos` since the two differ by a per-row constant.
"""

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

# (q_pos, kv_pos) -> bool tensor, elementwise on broadcastable integer tensors.
Predicate = Callable[[Tensor, Tensor], Tensor]
# (score, head, q_pos, kv_pos) -> modified score.
ScoreFn = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
# FlexAttention signatures.
MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
ScoreMod = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]


def _check_window(window: int) -> None:
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"sliding_window={window!r} is invalid: use an int >= 1 (keys seen, self included) or None")


@dataclass(frozen=True)
class AttentionVariant:
    """Which causal attention a layer computes; all variants are causal.

    sliding_window: W >= 1; a query at position p sees keys in (p - W, p]. None: full causal.
    alibi: add ALiBi bias slope[head] * (kv_pos - q_pos), slopes from `alibi_slopes`.
    softcap: cap > 0; scores (already scaled) become cap * tanh(score / cap) before bias and mask.
    """

    sliding_window: int | None = None
    alibi: bool = False
    softcap: float | None = None

    def __post_init__(self):
        if self.sliding_window is not None:
            _check_window(self.sliding_window)
        if not isinstance(self.alibi, bool):
            raise ValueError(f"alibi={self.alibi!r} is invalid: use True or False")
        cap = self.softcap
        if cap is not None and (
            isinstance(cap, bool) or not isinstance(cap, (int, float)) or not math.isfinite(cap) or cap <= 0
        ):
            raise ValueError(f"softcap={cap!r} is invalid: use a finite number > 0 or None")

    @property
    def is_causal_only(self) -> bool:
        return self.sliding_window is None and not self.alibi and self.softcap is None


def alibi_slopes(num_heads: int) -> Tensor:
    """ALiBi slopes, fp32 [num_heads] (Press et al. 2022; the BLOOM / HF rule for any head count).

    For n a power of two: slope_i = 2^(-8 i / n), i = 1..n. Otherwise, with m the largest power of
    two below n: the m slopes for m heads, then the first n - m odd-indexed slopes for 2m heads.
    """
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads={num_heads!r} is invalid: use an int >= 1")

    def power_of_two_slopes(n: int) -> list[float]:
        return [2.0 ** (-8.0 * i / n) for i in range(1, n + 1)]

    m = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = power_of_two_slopes(m) + power_of_two_slopes(2 * m)[0::2][: num_heads - m]
    return torch.tensor(slopes, dtype=torch.float32)


def causal_predicate() -> Predicate:
    def causal(q_pos: Tensor, kv_pos: Tensor) -> Tensor:
        return kv_pos <= q_pos

    return causal


def sliding_window_predicate(window: int) -> Predicate:
    """Keys less than `window` positions behind the query (not causal on its own: combine it)."""
    _check_window(window)

    def in_window(q_pos: Tensor, kv_pos: Tensor) -> Tensor:
        return q_pos - kv_pos < window

    return in_window


def combine_predicates(*preds: Predicate) -> Predicate:
    """Logical AND of predicates."""
    if not preds:
        raise ValueError("combine_predicates needs at least one predicate, got none")

    def combined(q_pos: Tensor, kv_pos: Tensor) -> Tensor:
        return functools.reduce(torch.logical_and, (pred(q_pos, kv_pos) for pred in preds))

    return combined


def variant_predicate(variant: AttentionVariant) -> Predicate:
    if variant.sliding_window is None:
        return causal_predicate()
    return combine_predicates(causal_predicate(), sliding_window_predicate(variant.sliding_window))


def _alibi_bias(slope: Tensor, q_pos: Tensor, kv_pos: Tensor) -> Tensor:
    return slope * (kv_pos - q_pos)


def _softcap(score: Tensor, cap: float) -> Tensor:
    return cap * torch.tanh(score / cap)


def variant_score_fn(
    variant: AttentionVariant, num_heads: int, device: torch.device | str | None = None
) -> ScoreFn | None:
    """Score modification (softcap, then ALiBi bias) on already-scaled scores; None when there is none."""
    if not variant.alibi and variant.softcap is None:
        return None
    slopes = alibi_slopes(num_heads).to(device) if variant.alibi else None
    cap = variant.softcap

    def score_fn(score: Tensor, head: Tensor, q_pos: Tensor, kv_pos: Tensor) -> Tensor:
        if cap is not None:
            score = _softcap(score, cap)
        if slopes is not None:
            score = score + _alibi_bias(slopes[head], q_pos, kv_pos)
        return score

    return score_fn


def _check_q_offset(q_offset: Tensor) -> None:
    if not isinstance(q_offset, Tensor) or q_offset.dim() != 1 or q_offset.is_floating_point():
        is_tensor = isinstance(q_offset, Tensor)
        got = f"shape {tuple(q_offset.shape)} dtype {q_offset.dtype}" if is_tensor else type(q_offset).__name__
        raise ValueError(f"q_offset must be a 1-D integer tensor [batch] of logical positions, got {got}")


# Contiguous cache: row b holds logical positions 0..kv_len-1 in order; its queries start at q_offset[b].
#
#   kv_idx:  0 1 2 3 4 5 6 7        kv_pos = kv_idx
#   q_idx:             0 1 2        q_pos  = q_offset[b] + q_idx   (here q_offset[b] = 5)
def contiguous_mask_mod(variant: AttentionVariant, q_offset: Tensor) -> MaskMod:
    _check_q_offset(q_offset)
    pred = variant_predicate(variant)

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return pred(q_offset[b] + q_idx, kv_idx)

    return mask_mod


def contiguous_score_mod(variant: AttentionVariant, num_heads: int, q_offset: Tensor) -> ScoreMod | None:
    _check_q_offset(q_offset)
    score_fn = variant_score_fn(variant, num_heads, q_offset.device)
    if score_fn is None:
        return None

    def score_mod(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return score_fn(score, h, q_offset[b] + q_idx, kv_idx)

    return score_mod


def dense_attention_bias(
    variant: AttentionVariant,
    q_pos: Tensor,
    kv_pos: Tensor,
    num_heads: int,
    kv_valid: Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Additive attention bias [B, num_heads if alibi else 1, Tq, Tk] for SDPA's attn_mask.

    q_pos: [B, Tq] logical positions; kv_pos: [Tk] or [B, Tk]; kv_valid: optional bool [B, Tk],
    False for slots holding no token. Entries are 0 or -inf, plus the ALiBi bias. A query row with
    no visible key is all -inf and SDPA returns NaN for it: callers must not ask for such rows.
    """
    if variant.softcap is not None:
        raise ValueError(
            f"softcap={variant.softcap} cannot be expressed as an additive bias; use the flex attention op"
        )
    if q_pos.dim() != 2:
        raise ValueError(f"q_pos must be [batch, q_len], got shape {tuple(q_pos.shape)}")
    batch = q_pos.shape[0]
    if kv_pos.dim() == 1:
        kv_pos = kv_pos.unsqueeze(0)
    if kv_pos.dim() != 2 or kv_pos.shape[0] not in (1, batch):
        raise ValueError(f"kv_pos must be [kv_len] or [{batch}, kv_len], got shape {tuple(kv_pos.shape)}")
    kv_len = kv_pos.shape[1]
    qp = q_pos[:, None, :, None]  # (B, 1, Tq, 1)
    kp = kv_pos[:, None, None, :]  # (B or 1, 1, 1, Tk)
    visible = variant_predicate(variant)(qp, kp)  # (B, 1, Tq, Tk)
    if kv_valid is not None:
        if kv_valid.dtype != torch.bool or tuple(kv_valid.shape) != (batch, kv_len):
            raise ValueError(
                f"kv_valid must be a bool tensor of shape {(batch, kv_len)}, "
                f"got dtype {kv_valid.dtype} shape {tuple(kv_valid.shape)}"
            )
        visible = visible & kv_valid[:, None, None, :]
    bias = torch.zeros(visible.shape, dtype=torch.float32, device=q_pos.device)
    bias = bias.masked_fill(~visible, float("-inf"))
    if variant.alibi:
        slopes = alibi_slopes(num_heads).to(q_pos.device)[None, :, None, None]  # (1, H, 1, 1)
        bias = bias + _alibi_bias(slopes, qp, kp)  # (B, H, Tq, Tk)
    return bias.to(dtype)


def first_needed_position(variant: AttentionVariant, next_query_pos: int) -> int:
    """Smallest logical kv position that any query at position >= next_query_pos can still see.

    0 without a sliding window. Keys (and whole pages) before it can be freed.
    """
    if isinstance(next_query_pos, bool) or not isinstance(next_query_pos, int) or next_query_pos < 0:
        raise ValueError(f"next_query_pos={next_query_pos!r} is invalid: use an int >= 0")
    if variant.sliding_window is None:
        return 0
    return max(0, next_query_pos - variant.sliding_window + 1)
