"""generate(decode_window=k) and Generator: decode windows (k one-token steps per host synchronization,
inputs computed on the device) give the per-token loop's tokens for every cache, model family and
attention variant; EOS and per-row counts cut rows inside a window; storage returns to the pools;
one Generator serves many calls; bad options fail with a clear message."""

import pytest
import torch

from fms.models import get_model
from fms.utils.generation import Generator, generate

PAGED = {"page_size": 16}


def _options(attn_name):
    return PAGED if attn_name == "paged" else {}


def _prompts(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lengths]


# a tiny Granite-4.0-H (Mamba2 + attention) whose greedy tokens vary (init_std large enough)
HYBRID = dict(num_layers=3, layer_types=("mamba", "attention", "mamba"), hidden_size=32, num_heads=2,
              num_kv_heads=1, intermediate_size=64, vocab_size=128, mamba_num_heads=4, mamba_head_dim=8,
              mamba_state_size=16, mamba_num_groups=2, mamba_chunk_size=8, embedding_multiplier=1.0, init_std=0.3)


def _hybrid(device="cpu"):
    return get_model("granite_hybrid", "h-nano", seed=5, device_type=device, data_type="float32", **HYBRID)


@pytest.fixture(scope="module")
def hybrid():
    return _hybrid()


def _eos_inside(reference, row=0, min_index=2):
    """A token that row `row` of the reference emits at index >= min_index, not earlier."""
    seq = reference[row]
    for i in range(min_index, len(seq)):
        if seq[i] not in seq[:i]:
            return seq[i]
    raise AssertionError(f"no fresh token after index {min_index} in {seq}")


@pytest.mark.parametrize("attn_name", ["sdpa", "paged"])
@pytest.mark.parametrize("window", [1, 3, 8])
def test_windows_equal_the_per_token_loop_llama(llama_nano, attn_name, window):
    prompts = _prompts((17, 3, 1, 9), llama_nano.config.vocab_size)
    counts = [6, 2, 9, 5]
    reference = generate(llama_nano, prompts, counts, attn_name=attn_name, **_options(attn_name))
    assert len({t for seq in reference for t in seq}) >= 8  # varied tokens: an off-by-one would show
    out = generate(llama_nano, prompts, counts, attn_name=attn_name, decode_window=window, **_options(attn_name))
    assert out == reference


@pytest.mark.parametrize("attn_name", ["sdpa", "paged"])
def test_windows_equal_the_per_token_loop_hybrid_with_eos(hybrid, attn_name):
    """A hybrid model (Mamba state advanced on the device each step) with rows ending at EOS mid-window:
    the tokens after a row's EOS are dropped, the others continue."""
    prompts = _prompts((5, 19, 3), hybrid.config.vocab_size)
    plain = generate(hybrid, prompts, 10, attn_name=attn_name, **_options(attn_name))
    eos = _eos_inside(plain, row=1)
    reference = generate(hybrid, prompts, 10, attn_name=attn_name, eos_token_id=eos, **_options(attn_name))
    assert reference[1][-1] == eos and len(reference[1]) < 10  # the EOS really cuts row 1
    out = generate(hybrid, prompts, 10, attn_name=attn_name, eos_token_id=eos, decode_window=4,
                   **_options(attn_name))
    assert out == reference


@pytest.mark.parametrize("variant", ["nano-alibi", "nano-window"])
@pytest.mark.parametrize("attn_name", ["sdpa", "flex", "paged"])
def test_windows_cover_attention_variants(variant, attn_name):
    """ALiBi (a per-head bias; FlexAttention decoding on paged) and a sliding window (pages released
    at window starts) through the device-side step."""
    # init_std 0.3 (seed 3): nano's own weights repeat one token on the windowed row
    model = get_model("gpt2", variant, seed=3, data_type="float32", init_std=0.3)
    prompts = _prompts((40, 7), model.config.vocab_size, seed=1)
    reference = generate(model, prompts, 12, attn_name=attn_name, **_options(attn_name))
    assert all(len(set(seq)) >= 6 for seq in reference), reference
    out = generate(model, prompts, 12, attn_name=attn_name, decode_window=5, **_options(attn_name))
    assert out == reference


def test_generator_serves_many_calls_and_returns_storage(hybrid):
    gen = Generator(hybrid, "paged", max_batch_size=3, max_seq_len=40, decode_window=4, **PAGED)
    cache = gen.cache
    prompts = _prompts((5, 19, 3), hybrid.config.vocab_size)
    reference = generate(hybrid, prompts, 8, attn_name="paged", **PAGED)
    for _ in range(2):
        assert gen.generate(prompts, 8) == reference
        assert cache.sequences == [] and cache.manager.allocator.num_used == 0
        assert cache.manager.num_seqs == 0
    # fewer rows than max_batch_size, in another order
    assert gen.generate(prompts[::-1][:2], 8) == generate(hybrid, prompts[::-1][:2], 8, attn_name="paged", **PAGED)
    with pytest.raises(ValueError, match="max_batch_size of 3"):
        gen.generate(prompts + prompts[:1], 4)
    with pytest.raises(ValueError, match="max_seq_len of 40"):
        gen.generate([prompts[1]], 30)


def test_contiguous_rows_out_of_order(llama_nano):
    """Once a row ends, the contiguous cache's remaining rows are no longer 0..B-1: the step gathers
    them (another window layout) and still gives the per-token tokens."""
    prompts = _prompts((6, 11, 4), llama_nano.config.vocab_size, seed=3)
    counts = [2, 9, 7]  # row 0 leaves after the first window
    reference = generate(llama_nano, prompts, counts, attn_name="sdpa")
    assert generate(llama_nano, prompts, counts, attn_name="sdpa", decode_window=3) == reference


@pytest.mark.parametrize("attn_name", ["sdpa", "paged"])
def test_sampled_windows_are_seeded(llama_nano, attn_name):
    prompts = _prompts((17, 3), llama_nano.config.vocab_size)
    opts = dict(do_sample=True, temperature=1.0, top_k=50, decode_window=4, **_options(attn_name))
    a = generate(llama_nano, prompts, 12, attn_name=attn_name, seed=1, **opts)
    b = generate(llama_nano, prompts, 12, attn_name=attn_name, seed=1, **opts)
    c = generate(llama_nano, prompts, 12, attn_name=attn_name, seed=2, **opts)
    greedy = generate(llama_nano, prompts, 12, attn_name=attn_name, decode_window=4, **_options(attn_name))
    assert a == b and a != c and a != greedy
    assert all(len(row) == 12 for row in a)


def test_step_hook_counts_window_steps(llama_nano):
    steps = []
    prompts = _prompts((5, 9), llama_nano.config.vocab_size)
    generate(llama_nano, prompts, [10, 4], attn_name="paged", decode_window=4,
             on_step=lambda kind, cache, n: steps.append((kind, n)), **PAGED)
    # the first token comes from the prefill; 9 more for row 0 in windows of at most 4
    assert steps == [("prefill", 0), ("decode", 4), ("decode", 4), ("decode", 1)]


def test_bad_window_options(llama_nano):
    prompts = [[1, 2, 3]]
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="decode_window must be an int >= 1"):
            generate(llama_nano, prompts, 4, decode_window=bad)
    with pytest.raises(ValueError, match="give decode_window too"):
        generate(llama_nano, prompts, 4, cuda_graphs=True)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda_graphs cannot be used here: the model is on cpu, not CUDA"):
            generate(llama_nano, prompts, 4, decode_window=4, cuda_graphs=True)


def test_graph_blockers_are_named(llama_nano):
    from fms.runtime.decode import why_no_graphs

    cuda = torch.device("cuda")
    assert "not CUDA" in why_no_graphs(llama_nano, "sdpa", torch.device("cpu"))
    assert "FlexAttention" in why_no_graphs(llama_nano, "flex", cuda)  # a BlockMask built every step
    assert "FlexAttention" in why_no_graphs(get_model("gpt2", "nano-alibi"), "paged", cuda)
    assert why_no_graphs(llama_nano, "sdpa", cuda) is None
    assert why_no_graphs(get_model("gpt2", "nano-alibi"), "sdpa", cuda) is None  # ALiBi as an SDPA bias


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("attn_name", ["sdpa", "paged"])
@pytest.mark.parametrize("compile_decode", [False, True])
def test_graphed_windows_on_gpu(attn_name, compile_decode):
    """CUDA graphs (and the compiled step) over both caches, hybrid model: the per-token tokens."""
    model = _hybrid("cuda")
    prompts = _prompts((5, 19, 3, 33), model.config.vocab_size)
    counts = [9, 14, 3, 14]
    reference = generate(model, prompts, counts, attn_name=attn_name, **_options(attn_name))
    gen = Generator(model, attn_name, max_batch_size=4, max_seq_len=64, decode_window=5, cuda_graphs=True,
                    compile_decode=compile_decode, **_options(attn_name))
    assert gen.runner.use_graphs and gen.runner.compiled == compile_decode
    for _ in range(2):
        assert gen.generate(prompts, counts) == reference
    assert gen.runner.num_graph_steps > 0 and gen.runner.num_eager_steps == 0
