"""Model level: greedy generation with the paged op equals sdpa token for token (fp32, CPU)."""

import os

import pytest
import torch

from fms.models import get_model
from fms.utils.generation import generate

pytestmark = pytest.mark.paged

# FMS_TEST_DEVICE=cuda runs these on the GPU in fp32 (compiled FlexAttention and the Triton decode kernel).
DEVICE = os.environ.get("FMS_TEST_DEVICE", "cpu")
# Granite's nano weights (embedding_multiplier 12, init_std 0.1) greedily repeat one token per prompt,
# which a cache bug could not change; these overrides give varied continuations.
VARIED = dict(embedding_multiplier=1.0, init_std=0.3)
MODELS = [("llama", "nano", {}), ("granite", "nano", VARIED), ("granite_hybrid", "nano", VARIED)]


def _assert_varied(outputs, min_per_sequence=3, min_total=20):
    """Guards the comparison's power: a reference repeating one token would hide cache bugs."""
    assert all(len(set(seq)) >= min_per_sequence for seq in outputs), outputs
    assert len({t for seq in outputs for t in seq}) >= min_total, outputs


def _prompts(vocab, lengths, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


@pytest.mark.parametrize("architecture,variant,overrides", MODELS, ids=[f"{a}-{v}" for a, v, _ in MODELS])
@pytest.mark.parametrize("page_size", [16, 64])
def test_paged_equals_sdpa(architecture, variant, overrides, page_size):
    model = get_model(architecture, variant, seed=3, device_type=DEVICE, data_type="float32", **overrides)
    prompts = _prompts(model.config.vocab_size, [1, 15, 16, 17, 40], seed=page_size)
    expected = generate(model, prompts, 20, attn_name="sdpa")
    _assert_varied(expected)
    got, stats = generate(model, prompts, 20, attn_name="paged", page_size=page_size, return_stats=True)
    assert got == expected
    assert 0 < stats["kv_bytes_holding_tokens"] <= stats["kv_bytes_in_use"] <= stats["kv_bytes_allocated"]


def test_paged_with_a_tight_pool_and_chunked_prefill():
    model = get_model("llama", "nano", seed=1, device_type=DEVICE, data_type="float32")
    prompts = _prompts(model.config.vocab_size, [33, 7, 20], seed=2)
    expected = generate(model, prompts, 10, attn_name="sdpa")
    # exactly the pages the three sequences need at their longest
    _assert_varied(expected)
    needed = sum(-(-(len(p) + 10) // 16) for p in prompts)
    got = generate(model, prompts, 10, attn_name="paged", page_size=16, num_pages=needed, prefill_chunk_size=8)
    assert got == expected


def test_model_chosen_per_model_and_per_call():
    model = get_model("llama", "nano", attn_name="paged", device_type=DEVICE, data_type="float32")
    prompts = _prompts(model.config.vocab_size, [5, 9], seed=4)
    assert generate(model, prompts, 6) == generate(model, prompts, 6, attn_name="sdpa")


def test_paged_pool_too_small_is_a_clear_error():
    from fms.cache.allocator import OutOfPagesError

    model = get_model("llama", "nano")
    with pytest.raises(OutOfPagesError):
        generate(model, [[1] * 40], 4, attn_name="paged", page_size=16, num_pages=2)
