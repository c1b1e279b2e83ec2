"""Static-batch generation on llama "nano": batching, chunked prefill and every attention op give the
tokens of a prompt run alone; sampling is seeded; EOS stops; bad input fails early with a clear message."""

import pytest
import torch

from fms.utils.generation import generate

VOCAB = 512  # llama "nano"
ALL_OPS = ["sdpa", "flex", "paged"]
PAGED = {"page_size": 16}


def _options(attn_name):
    return PAGED if attn_name == "paged" else {}


def _prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


# lengths on both sides of a 16-token page, and a single-token prompt
PROMPTS = _prompts((17, 3, 1, 9))


@pytest.fixture(scope="module")
def greedy_alone(llama_nano):
    """Reference: each prompt generated alone with sdpa."""
    return [generate(llama_nano, [p], 6, attn_name="sdpa")[0] for p in PROMPTS]


def test_reference_is_not_degenerate(greedy_alone):
    assert len({t for seq in greedy_alone for t in seq}) >= 8


@pytest.mark.parametrize("attn_name", ALL_OPS)
def test_batch_equals_each_prompt_alone(llama_nano, greedy_alone, attn_name):
    opts = _options(attn_name)
    batch = generate(llama_nano, PROMPTS, 6, attn_name=attn_name, **opts)
    assert batch == greedy_alone
    if attn_name != "sdpa":  # the same op alone too (sdpa alone is the reference itself)
        alone = [generate(llama_nano, [p], 6, attn_name=attn_name, **opts)[0] for p in PROMPTS[:1]]
        assert alone == greedy_alone[:1]


@pytest.mark.parametrize("attn_name", ["sdpa", "paged"])
def test_chunked_prefill_equals_one_shot(llama_nano, greedy_alone, attn_name):
    out = generate(llama_nano, PROMPTS, 6, attn_name=attn_name, prefill_chunk_size=5, **_options(attn_name))
    assert out == greedy_alone


def test_sampling_is_seeded(llama_nano):
    prompts = PROMPTS[:2]
    a = generate(llama_nano, prompts, 16, do_sample=True, seed=1)
    b = generate(llama_nano, prompts, 16, do_sample=True, seed=1)
    c = generate(llama_nano, prompts, 16, do_sample=True, seed=2)
    assert a == b
    assert a != c


def test_top_k_1_sampling_equals_greedy(llama_nano, greedy_alone):
    out = generate(llama_nano, PROMPTS, 6, do_sample=True, top_k=1, temperature=0.7, seed=3)
    assert out == greedy_alone


def test_eos_stops_only_its_sequence(llama_nano, greedy_alone):
    ref = greedy_alone[0]
    # the first step k >= 2 whose token did not occur before it, so EOS cannot fire earlier
    k = next(i for i in range(2, len(ref)) if ref[i] not in ref[:i])
    eos = ref[k]
    out = generate(llama_nano, PROMPTS, 6, eos_token_id=eos)
    assert out[0] == ref[: k + 1]  # the EOS token is emitted, then the sequence stops
    for got, full in zip(out[1:], greedy_alone[1:]):
        expected = full[: full.index(eos) + 1] if eos in full else full
        assert got == expected
    # a list of EOS ids works the same (the other id never occurs in this output)
    unused = next(t for t in range(VOCAB) if t not in ref)
    assert generate(llama_nano, PROMPTS[:1], 6, eos_token_id=[unused, eos])[0] == ref[: k + 1]


def test_max_new_tokens_zero(llama_nano):
    assert generate(llama_nano, PROMPTS, 0) == [[] for _ in PROMPTS]


def test_paged_stats(llama_nano, greedy_alone):
    out, stats = generate(llama_nano, PROMPTS, 2, attn_name="paged", return_stats=True, **PAGED)
    assert out == [seq[:2] for seq in greedy_alone]
    for key in ("pages_in_use", "kv_bytes_allocated", "kv_bytes_in_use", "kv_bytes_holding_tokens"):
        assert key in stats, key
    assert 0 < stats["kv_bytes_holding_tokens"] <= stats["kv_bytes_in_use"] <= stats["kv_bytes_allocated"]
    # the fullest point holds at least every prompt; pages: 17 tokens need 2, the others 1 each
    assert stats["pages_in_use"] >= 5
    bytes_per_token = stats["kv_bytes_in_use"] // (stats["pages_in_use"] * PAGED["page_size"])
    assert stats["kv_bytes_holding_tokens"] >= sum(map(len, PROMPTS)) * bytes_per_token


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "prompts, max_new_tokens, kwargs, message",
    [
        ([], 4, {}, "prompts is empty"),
        ([[1, 2], []], 4, {}, "prompt 1 is empty"),
        ([[1, VOCAB]], 4, {}, rf"outside the vocabulary \[0, {VOCAB}\): \[{VOCAB}\]"),
        ([[-1, 2]], 4, {}, r"outside the vocabulary .*\[-1\]"),
        ([[1, 2]], -1, {}, "max_new_tokens must be an int >= 0, got -1"),
        ([[1] * 1000], 30, {}, "1030, over the model's context of 1024"),
        ([[1, 2]], 4, {"attn_name": "nope"}, "unknown attn_name 'nope'"),
        ([[1, 2]], 4, {"do_sample": True, "temperature": 0.0}, "temperature must be > 0"),
        ([[1, 2]], 4, {"prefill_chunk_size": 0}, "prefill_chunk_size must be >= 1"),
    ],
)
def test_bad_input_raises(llama_nano, prompts, max_new_tokens, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(llama_nano, prompts, max_new_tokens, **kwargs)


def test_unknown_attn_name_lists_registered_ops(llama_nano):
    with pytest.raises(ValueError) as err:
        generate(llama_nano, [[1, 2]], 4, attn_name="nope")
    for name in ALL_OPS:
        assert repr(name) in str(err.value)


@pytest.mark.parametrize("attn_name", ["sdpa", "paged"])
def test_per_prompt_max_new_tokens_and_step_hook(llama_nano, attn_name):
    counts = [3, 0, 7, 1]
    steps = []
    base = PROMPTS
    full = generate(llama_nano, base, 7, attn_name=attn_name)
    out = generate(llama_nano, base, counts, attn_name=attn_name, on_step=lambda kind, cache, n: steps.append((kind, n)),
                   **_options(attn_name))
    assert out == [f[:n] for f, n in zip(full, counts)]  # each row stops at its own count
    assert steps == [("prefill", 0)] + [("decode", 1)] * (max(counts) - 1)
    with pytest.raises(ValueError, match="one such int per prompt"):
        generate(llama_nano, base, [1, 2], attn_name=attn_name)
