"""Attention variants: flex (mask_mod/score_mod) and SDPA (dense bias) paths against a dense reference."""

import math
import warnings
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from fms.modules.masks import (
    AttentionVariant,
    alibi_slopes,
    causal_predicate,
    combine_predicates,
    contiguous_mask_mod,
    contiguous_score_mod,
    dense_attention_bias,
    first_needed_position,
    sliding_window_predicate,
    variant_predicate,
    variant_score_fn,
)

FP32_ATOL = 1e-5
FP32_RTOL = 1e-5
NUM_HEADS = 6  # not a power of two, so ALiBi's extra-slope rule is exercised
HEAD_DIM = 8

VARIANTS = {
    "causal": AttentionVariant(),
    "window1": AttentionVariant(sliding_window=1),
    "window3": AttentionVariant(sliding_window=3),
    "window8": AttentionVariant(sliding_window=8),
    "window17": AttentionVariant(sliding_window=17),
    "alibi": AttentionVariant(alibi=True),
    "softcap5": AttentionVariant(softcap=5.0),
    "window8_alibi": AttentionVariant(sliding_window=8, alibi=True),
    "window3_softcap5_alibi": AttentionVariant(sliding_window=3, alibi=True, softcap=5.0),
}

# name -> (q_len, q_offset per row, kv_len); kv_len is the contiguous cache length.
SHAPES = {
    "prefill": (24, [0, 0], 24),
    "prefill_two_mask_blocks": (130, [0, 0], 130),
    "decode": (1, [9, 20], 24),
    "decode_long": (1, [140, 255], 256),
    "chunked_prefill": (5, [7, 12], 24),
    "chunked_prefill_long": (5, [7, 131], 256),
}


# ---------------------------------------------------------------------------- reference


def paper_alibi_slopes(n: int) -> list[float]:
    """ALiBi paper / BLOOM: geometric slopes starting at 2^(-8/n) with ratio 2^(-8/n) for n a power
    of two; otherwise the slopes of the closest lower power of two m, then every other slope of 2m."""

    def geometric(k):
        start = 2 ** (-(2 ** -(math.log2(k) - 3)))  # == 2^(-8/k)
        return [start * start**i for i in range(k)]

    if math.log2(n).is_integer():
        return geometric(n)
    m = 2 ** math.floor(math.log2(n))
    return geometric(m) + paper_alibi_slopes(2 * m)[0::2][: n - m]


def reference_attention(q, k, v, scale, q_pos, kv_pos, window=None, slopes=None, softcap=None, kv_valid=None):
    """Dense attention written out: q, k, v (B, H, T, D); q_pos (B, Tq); kv_pos (B, Tk)."""
    scores = q @ k.transpose(-1, -2) * scale  # (B, H, Tq, Tk)
    if softcap is not None:  # HF Gemma2: after scaling, before the mask
        scores = softcap * torch.tanh(scores / softcap)
    qp = q_pos[:, None, :, None].float()
    kp = kv_pos[:, None, None, :].float()
    if slopes is not None:
        scores = scores + slopes[None, :, None, None] * (kp - qp)
    visible = kp <= qp
    if window is not None:
        visible = visible & (kp > qp - window)  # HF sliding_window_overlay
    if kv_valid is not None:
        visible = visible & kv_valid[:, None, None, :]
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def random_qkv(batch, q_len, kv_len, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, NUM_HEADS, q_len, HEAD_DIM, generator=gen)
    k = torch.randn(batch, NUM_HEADS, kv_len, HEAD_DIM, generator=gen)
    v = torch.randn(batch, NUM_HEADS, kv_len, HEAD_DIM, generator=gen)
    return q * 2.0, k * 2.0, v  # larger scores so softcap and window actually change the output


def reference_for(variant, q, k, v, scale, q_offset, kv_valid=None):
    batch, _, q_len, _ = q.shape
    kv_len = k.shape[2]
    q_pos = q_offset[:, None] + torch.arange(q_len)[None, :]
    kv_pos = torch.arange(kv_len).expand(batch, kv_len)
    slopes = torch.tensor(paper_alibi_slopes(NUM_HEADS)) if variant.alibi else None
    return reference_attention(
        q, k, v, scale, q_pos, kv_pos, variant.sliding_window, slopes, variant.softcap, kv_valid
    )


def eager_flex(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention(*args, **kwargs)


# ---------------------------------------------------------------------------- slopes


def test_alibi_slopes_power_of_two():
    expected = torch.tensor([2 ** (-8 / 8 * i) for i in range(1, 9)])
    torch.testing.assert_close(alibi_slopes(8), expected, rtol=0, atol=0)
    assert alibi_slopes(8).dtype == torch.float32


@pytest.mark.parametrize("num_heads", [1, 2, 3, 5, 6, 12, 20, 33])
def test_alibi_slopes_any_head_count(num_heads):
    expected = torch.tensor(paper_alibi_slopes(num_heads), dtype=torch.float32)
    torch.testing.assert_close(alibi_slopes(num_heads), expected)


def test_alibi_slopes_12_heads_explicit():
    # m = 8: 2^-1 .. 2^-8, then slopes of 16 heads at odd exponents 2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5
    expected = torch.tensor([2.0**-i for i in range(1, 9)] + [2.0 ** -(i + 0.5) for i in range(4)])
    torch.testing.assert_close(alibi_slopes(12), expected)


# ---------------------------------------------------------------------------- predicates


def test_sliding_window_is_inclusive_of_self_and_w_wide():
    pred = variant_predicate(AttentionVariant(sliding_window=3))
    q_pos = torch.tensor(4)
    kv_pos = torch.arange(8)
    assert pred(q_pos, kv_pos).tolist() == [False, False, True, True, True, False, False, False]


def test_predicates_broadcast_on_dense_tensors():
    q_pos = torch.arange(6)[:, None]
    kv_pos = torch.arange(6)[None, :]
    assert torch.equal(causal_predicate()(q_pos, kv_pos), torch.ones(6, 6, dtype=torch.bool).tril())
    band = combine_predicates(causal_predicate(), sliding_window_predicate(2))(q_pos, kv_pos)
    assert torch.equal(band, torch.ones(6, 6, dtype=torch.bool).tril() & ~torch.ones(6, 6, dtype=torch.bool).tril(-2))
    assert torch.equal(sliding_window_predicate(2)(q_pos, kv_pos), ~torch.ones(6, 6, dtype=torch.bool).tril(-2))


def test_is_causal_only_and_score_fn_presence():
    assert AttentionVariant().is_causal_only
    for variant in (AttentionVariant(sliding_window=4), AttentionVariant(alibi=True), AttentionVariant(softcap=1.0)):
        assert not variant.is_causal_only
    assert variant_score_fn(AttentionVariant(sliding_window=4), NUM_HEADS) is None
    assert contiguous_score_mod(AttentionVariant(), NUM_HEADS, torch.zeros(2, dtype=torch.long)) is None
    assert variant_score_fn(AttentionVariant(softcap=2.0), NUM_HEADS) is not None


# ---------------------------------------------------------------------------- flex and SDPA vs reference


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("variant_name", list(VARIANTS))
def test_flex_contiguous_matches_dense_reference(variant_name, shape):
    variant = VARIANTS[variant_name]
    q_len, offsets, kv_len = SHAPES[shape]
    q_offset = torch.tensor(offsets)
    q, k, v = random_qkv(len(offsets), q_len, kv_len)
    scale = HEAD_DIM**-0.5
    block_mask = create_block_mask(
        contiguous_mask_mod(variant, q_offset), B=len(offsets), H=None, Q_LEN=q_len, KV_LEN=kv_len, device="cpu"
    )
    out = eager_flex(
        q, k, v, score_mod=contiguous_score_mod(variant, NUM_HEADS, q_offset), block_mask=block_mask, scale=scale
    )
    expected = reference_for(variant, q, k, v, scale, q_offset)
    torch.testing.assert_close(out, expected, atol=FP32_ATOL, rtol=FP32_RTOL)


@pytest.mark.parametrize("block_size", [16, 32])
def test_flex_small_mask_blocks_match_reference(block_size):
    # Small mask blocks split the window band into full / partial / empty blocks.
    variant = VARIANTS["window17"]
    q_offset = torch.tensor([7, 40])
    q, k, v = random_qkv(2, 21, 64, seed=1)
    block_mask = create_block_mask(
        contiguous_mask_mod(variant, q_offset), 2, None, 21, 64, device="cpu", BLOCK_SIZE=block_size
    )
    out = eager_flex(q, k, v, block_mask=block_mask, scale=0.3)
    torch.testing.assert_close(out, reference_for(variant, q, k, v, 0.3, q_offset), atol=FP32_ATOL, rtol=FP32_RTOL)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("variant_name", [n for n, v in VARIANTS.items() if v.softcap is None])
def test_sdpa_dense_bias_matches_dense_reference(variant_name, shape):
    variant = VARIANTS[variant_name]
    q_len, offsets, kv_len = SHAPES[shape]
    q_offset = torch.tensor(offsets)
    q, k, v = random_qkv(len(offsets), q_len, kv_len)
    scale = HEAD_DIM**-0.5
    q_pos = q_offset[:, None] + torch.arange(q_len)[None, :]
    bias = dense_attention_bias(variant, q_pos, torch.arange(kv_len), NUM_HEADS)
    assert bias.shape == (len(offsets), NUM_HEADS if variant.alibi else 1, q_len, kv_len)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    expected = reference_for(variant, q, k, v, scale, q_offset)
    torch.testing.assert_close(out, expected, atol=FP32_ATOL, rtol=FP32_RTOL)


def test_dense_bias_per_row_kv_positions_and_kv_valid():
    # Per-row kv positions in a scrambled order (as a gathered page pool would give) plus holes.
    variant = AttentionVariant(sliding_window=5, alibi=True)
    gen = torch.Generator().manual_seed(2)
    kv_len, q_len = 16, 3
    kv_pos = torch.stack([torch.randperm(kv_len, generator=gen) for _ in range(2)])  # (B, Tk)
    kv_valid = torch.rand(2, kv_len, generator=gen) > 0.3
    q_offset = torch.tensor([10, 13])
    q_pos = q_offset[:, None] + torch.arange(q_len)[None, :]
    kv_valid |= kv_pos[:, :] == q_pos[:, :1]  # every query row keeps at least one visible key
    q, k, v = random_qkv(2, q_len, kv_len, seed=3)
    bias = dense_attention_bias(variant, q_pos, kv_pos, NUM_HEADS, kv_valid=kv_valid, dtype=torch.float32)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=0.5)
    slopes = torch.tensor(paper_alibi_slopes(NUM_HEADS))
    expected = reference_attention(q, k, v, 0.5, q_pos, kv_pos, 5, slopes, None, kv_valid)
    torch.testing.assert_close(out, expected, atol=FP32_ATOL, rtol=FP32_RTOL)


def test_dense_bias_dtype():
    bias = dense_attention_bias(AttentionVariant(), torch.arange(4)[None], torch.arange(4), 2, dtype=torch.bfloat16)
    assert bias.dtype == torch.bfloat16 and bias.shape == (1, 1, 4, 4)


# ---------------------------------------------------------------------------- HF conventions


@pytest.mark.hf
def test_conventions_match_hf_transformers():
    masking_utils = pytest.importorskip("transformers.masking_utils")
    modeling_gemma2 = pytest.importorskip("transformers.models.gemma2.modeling_gemma2")
    modeling_bloom = pytest.importorskip("transformers.models.bloom.modeling_bloom")

    for num_heads in (8, 12, 6):
        torch.testing.assert_close(alibi_slopes(num_heads), modeling_bloom._get_alibi_slopes(num_heads, "cpu"))

    q_idx = torch.arange(20)[:, None]
    kv_idx = torch.arange(20)[None, :]
    hf_window = masking_utils.sliding_window_causal_mask_function(4)
    ours = variant_predicate(AttentionVariant(sliding_window=4))
    assert torch.equal(ours(q_idx, kv_idx), hf_window(0, 0, q_idx, kv_idx))

    # Gemma2 eager: scale, softcap, then add the mask. Our flex path must agree.
    variant = AttentionVariant(sliding_window=4, softcap=5.0)
    q_offset = torch.tensor([0])
    q, k, v = random_qkv(1, 12, 12, seed=4)
    module = SimpleNamespace(num_key_value_groups=1, head_dim=HEAD_DIM, training=False)
    hf_mask = dense_attention_bias(AttentionVariant(sliding_window=4), torch.arange(12)[None], torch.arange(12), 1)
    hf_out, _ = modeling_gemma2.eager_attention_forward(module, q, k, v, hf_mask, scaling=0.4, softcap=5.0)
    block_mask = create_block_mask(contiguous_mask_mod(variant, q_offset), 1, None, 12, 12, device="cpu")
    out = eager_flex(
        q, k, v, score_mod=contiguous_score_mod(variant, NUM_HEADS, q_offset), block_mask=block_mask, scale=0.4
    )
    torch.testing.assert_close(out.transpose(1, 2), hf_out, atol=FP32_ATOL, rtol=FP32_RTOL)


# ---------------------------------------------------------------------------- freeing out-of-window keys


def test_first_needed_position_examples():
    assert first_needed_position(AttentionVariant(), 1000) == 0
    assert first_needed_position(AttentionVariant(sliding_window=3), 10) == 8
    assert first_needed_position(AttentionVariant(sliding_window=3), 1) == 0
    assert first_needed_position(AttentionVariant(sliding_window=1), 5) == 5


@settings(max_examples=50, deadline=None)
@given(window=st.integers(1, 40), next_query_pos=st.integers(0, 100), later=st.integers(0, 30))
def test_first_needed_position_is_tight_lower_bound(window, next_query_pos, later):
    variant = AttentionVariant(sliding_window=window)
    first = first_needed_position(variant, next_query_pos)
    pred = variant_predicate(variant)
    kv_pos = torch.arange(next_query_pos + later + 1)
    visible = pred(torch.tensor(next_query_pos + later), kv_pos)
    assert not visible[:first].any()  # nothing before it is seen by any later query
    assert pred(torch.tensor(next_query_pos), torch.tensor(first))  # and the next query sees it


# ---------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kwargs, bad",
    [
        ({"sliding_window": 0}, "sliding_window=0"),
        ({"sliding_window": -2}, "sliding_window=-2"),
        ({"sliding_window": 2.5}, "sliding_window=2.5"),
        ({"sliding_window": True}, "sliding_window=True"),
        ({"softcap": 0.0}, "softcap=0.0"),
        ({"softcap": -1.0}, "softcap=-1.0"),
        ({"softcap": float("inf")}, "softcap=inf"),
        ({"softcap": float("nan")}, "softcap=nan"),
        ({"alibi": 1}, "alibi=1"),
    ],
)
def test_variant_validation_names_bad_value(kwargs, bad):
    with pytest.raises(ValueError, match=bad.replace(".", r"\.")):
        AttentionVariant(**kwargs)


def test_other_validation_errors():
    with pytest.raises(ValueError, match="num_heads=0"):
        alibi_slopes(0)
    with pytest.raises(ValueError, match="sliding_window=0"):
        sliding_window_predicate(0)
    with pytest.raises(ValueError, match="at least one predicate"):
        combine_predicates()
    with pytest.raises(ValueError, match="softcap=5.0 .*flex"):
        dense_attention_bias(AttentionVariant(softcap=5.0), torch.zeros(1, 1, dtype=torch.long), torch.arange(3), 2)
    with pytest.raises(ValueError, match=r"kv_pos must be .*got shape \(3, 4\)"):
        dense_attention_bias(AttentionVariant(), torch.zeros(2, 1, dtype=torch.long), torch.zeros(3, 4), 2)
    with pytest.raises(ValueError, match=r"kv_valid must be a bool tensor of shape \(2, 4\)"):
        dense_attention_bias(
            AttentionVariant(), torch.zeros(2, 1, dtype=torch.long), torch.arange(4), 2, kv_valid=torch.ones(2, 3)
        )
    with pytest.raises(ValueError, match="q_offset must be a 1-D integer tensor"):
        contiguous_mask_mod(AttentionVariant(), torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="q_offset must be a 1-D integer tensor"):
        contiguous_score_mod(AttentionVariant(alibi=True), 4, torch.zeros(2))
    with pytest.raises(ValueError, match="next_query_pos=-1"):
        first_needed_position(AttentionVariant(sliding_window=2), -1)
