"""generate() through a torch.compile'd model forward, as scripts/benchmark_inference.py --compile runs it.

For each model family and cache (contiguous "sdpa", "paged"): the compiled forward gives eager's
greedy tokens, traces without graph breaks, and compiles a bounded number of graphs: not one per
decode step (the contiguous cache grows every step), and none for a later call with a new batch
size, new prompt lengths and a new pool size. aot_eager: dynamo and AOT autograd without code
generation (seconds); the guards, and so the graph count, are inductor's. Inductor itself (C++ kernels,
minutes on a 2-core CPU) is marked slow.
"""

import os
import shutil

import pytest
import torch
from torch._dynamo.utils import counters

from fms.models import get_model
from fms.utils.generation import generate

# (prompt lengths, new tokens) per call. Sizes of 1 are specialized into graphs of their own, so every
# call has a batch > 1 and a page table over 1 page wide (16-token pages); the longest prompt stays
# within one Mamba chunk (the CPU scan carries the state across chunks in a Python loop).
CALLS = [((5, 12), 6), ((3, 30, 7), 5), ((8, 4, 6, 20), 4)]
# smallest hybrid with both mixers (tests/models/test_hybrid_decode_compile.py), one 64-token chunk
HYBRID = dict(num_layers=2, layer_types=("mamba", "attention"), hidden_size=32, num_heads=2, num_kv_heads=1,
              intermediate_size=64, vocab_size=128, mamba_num_heads=4, mamba_head_dim=8, mamba_state_size=16,
              mamba_num_groups=2, mamba_chunk_size=64, embedding_multiplier=1.0, init_std=0.3)


def _has_cxx() -> bool:
    return any(c and shutil.which(c) for c in (os.environ.get("CXX"), "g++", "c++", "clang++"))


def _model(architecture):
    if architecture == "llama":
        return get_model("llama", "nano", seed=0)
    return get_model("granite_hybrid", "h-nano", seed=5, **HYBRID)


def _prompts(lengths, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("backend", [
    "aot_eager",
    pytest.param("inductor", marks=[pytest.mark.slow, pytest.mark.skipif(
        not _has_cxx(), reason="inductor's CPU backend needs a C++ compiler ($CXX, g++, c++ or clang++)")]),
])
@pytest.mark.parametrize("attn_name", ["sdpa", "paged"])
@pytest.mark.parametrize("architecture", ["llama", "granite_hybrid"])
def test_compiled_generate_matches_eager_with_few_graphs(architecture, attn_name, backend):
    torch._dynamo.reset()
    counters.clear()  # reset() keeps them
    model = _model(architecture)
    compiled_forward = torch.compile(model.forward, backend=backend)
    graphs, tokens = [], set()
    for i, (lengths, new) in enumerate(CALLS):
        prompts = _prompts(lengths, model.config.vocab_size, seed=i)
        expected = generate(model, prompts, new, attn_name=attn_name)
        model.forward = compiled_forward
        try:
            got = generate(model, prompts, new, attn_name=attn_name)
        finally:
            del model.forward
        assert got == expected, f"call {i}"
        tokens |= {t for row in expected for t in row}
        graphs.append(counters["stats"]["unique_graphs"])
    assert len(tokens) > 5  # varied tokens: a cache or state bug would show
    assert not counters["graph_break"], list(counters["graph_break"])
    # call 0: one prefill graph and the decode graphs of 5 steps: static, then symbolic in what the first
    # decode steps changed (the contiguous cache's length); never one per step
    assert graphs[0] <= 3, graphs
    # call 2: new batch size, lengths and pool sizes, all symbolic by now
    assert graphs[2] == graphs[1], graphs
