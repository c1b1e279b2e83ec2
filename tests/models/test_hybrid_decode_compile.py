"""The hybrid (Mamba2 + attention) decode step under torch.compile, as the serving engine runs it.

DecodeWindowRunner compiles the model with dynamic=True and, on CUDA, captures the step in CUDA
graphs. Here (CPU, inductor's C++ backend) the compiled step must give the eager step's tokens,
trace as one graph without breaks, and serve every batch size from one symbolic-batch compile.
The GPU test additionally captures and replays the CUDA graphs (the serving configuration).
"""

import os
import shutil

import pytest
import torch

from fms.models import get_model
from fms.modules.attention import get_attention_op
from fms.runtime.decode import DecodeRow, DecodeWindowRunner
from fms.serving.request import SamplingParams

PAGE_SIZE = 16
STEPS = 4
# smallest hybrid that exercises both mixers, two B/C groups and the gated norm's groups
TINY = dict(num_layers=2, layer_types=("mamba", "attention"), hidden_size=32, num_heads=2, num_kv_heads=1,
            intermediate_size=64, vocab_size=128, mamba_num_heads=4, mamba_head_dim=8, mamba_state_size=16,
            mamba_num_groups=2, mamba_chunk_size=8, embedding_multiplier=1.0, init_std=0.3)


def _why_no_inductor() -> str | None:
    # Inductor's CPU backend builds C++ kernels with the compiler it finds as $CXX or on the path.
    compilers = [os.environ.get("CXX")] + ["g++", "c++", "clang++"]
    if not any(c and shutil.which(c) for c in compilers):
        return "inductor's CPU backend needs a C++ compiler ($CXX, g++, c++ or clang++); none found"
    return None


needs_inductor = pytest.mark.skipif(_why_no_inductor() is not None, reason=str(_why_no_inductor()))


def _model(device="cpu", dtype=torch.float32):
    return get_model("granite_hybrid", "h-nano", seed=5, device_type=device, data_type=dtype, **TINY)


def _prefilled_cache(model, prompts):
    """A paged cache holding the prompts (one eager prefill); -> (cache, first sampled token per prompt)."""
    cache = get_attention_op("paged").create_cache(model.cache_spec(), max_batch_size=4, max_seq_len=64,
                                                   page_size=PAGE_SIZE)
    for i in range(len(prompts)):
        cache.add(i)
    meta = cache.prepare(list(range(len(prompts))), [len(p) for p in prompts])
    device = model.embedding.weight.device
    tokens = torch.tensor([p + [0] * (meta.query_len - len(p)) for p in prompts], device=device)
    last = torch.tensor([len(p) - 1 for p in prompts], device=device)
    with torch.no_grad():
        logits = model(tokens, attn_name="paged", cache=cache, meta=meta, logits_positions=last)[:, 0]
    return cache, logits.argmax(-1).tolist()


def _window(runner, first_tokens, num_steps):
    """Reserve the window's room (the caller's job), then run it."""
    ids = list(range(len(first_tokens)))
    starts = [runner.cache.length(i) for i in ids]
    runner.cache.prepare_decode_window(ids, list(num_steps))
    rows = [DecodeRow(i, t, s, n, SamplingParams(max_new_tokens=n), 0)
            for i, t, s, n in zip(ids, first_tokens, starts, num_steps)]
    with torch.no_grad():
        return runner.run(rows)


def _prompts(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("backend", [
    # dynamo + AOT autograd (functionalization of the pool updates) without code generation: seconds
    "aot_eager",
    # the engine's compile; inductor's C++ kernels take ~40 s to build on 2 cores with a cold cache
    pytest.param("inductor", marks=[pytest.mark.slow, needs_inductor]),
])
def test_compiled_decode_window_matches_eager_with_one_compile(backend):
    """Two windows (3 rows, then 2, one of which idles after 2 steps) through the compiled step and the
    eager one: the same tokens, the same Mamba states and KV pages; no graph breaks, no recompile."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # reset() keeps them: an earlier test's graph breaks would count here
    model = _model()
    prompts = _prompts((5, 19, 3), model.config.vocab_size)
    caches, firsts = zip(*(_prefilled_cache(model, prompts) for _ in range(2)))
    eager = DecodeWindowRunner(model, caches[0], "paged", max_steps=STEPS, graph_batch_sizes=None)
    compiled = DecodeWindowRunner(model, caches[1], "paged", max_steps=STEPS, graph_batch_sizes=None,
                                  compile_model=True)
    assert compiled.compiled
    compiled._set_compiled(True, backend)
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]

    out_eager = _window(eager, firsts[0], [STEPS] * 3)
    out_compiled = _window(compiled, firsts[1], [STEPS] * 3)
    assert out_compiled == out_eager
    assert len({t for row in out_eager for t in row}) > 3  # varied tokens: a state bug would show

    # a smaller batch, a row that stops early (its state must be kept bit for bit after its last step)
    more_eager = _window(eager, [row[-1] for row in out_eager[:2]], [STEPS, 2])
    more_compiled = _window(compiled, [row[-1] for row in out_compiled[:2]], [STEPS, 2])
    assert more_compiled == more_eager
    # one symbolic-batch graph each for the forward, the step's inputs and its bookkeeping
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - frames == 3
    assert not torch._dynamo.utils.counters["graph_break"]

    pools = [c.state_pool for c in caches]
    for a, b in zip(pools[0].conv + pools[0].ssm, pools[1].conv + pools[1].ssm):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    for a, b in zip(caches[0].keys + caches[0].values, caches[1].keys + caches[1].values):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_decode_step_traces_without_graph_breaks():
    """The whole hybrid decode forward is one graph (fullgraph-clean) with the batch symbolic."""
    torch._dynamo.reset()
    model = _model()
    cache, _ = _prefilled_cache(model, _prompts((4, 9), model.config.vocab_size))
    meta = cache.prepare([0, 1], [1, 1])
    tokens = torch.tensor([[3], [7]])
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(tokens, attn_name="paged", cache=cache, meta=meta)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_graphed_decode_on_cuda(dtype):
    """The serving configuration: the compiled step captured in CUDA graphs for several batch buckets
    (no fallback to the uncompiled step). fp32: the eager step's tokens exactly; bf16 (as served): fused
    kernels round differently from eager ones, so a near tie may flip a token: only that it compiles and runs."""
    torch._dynamo.reset()
    model = _model("cuda", dtype)
    prompts = _prompts((5, 19, 3), model.config.vocab_size)
    caches, firsts = zip(*(_prefilled_cache(model, prompts) for _ in range(2)))
    eager = DecodeWindowRunner(model, caches[0], "paged", max_steps=STEPS, graph_batch_sizes=None)
    graphed = DecodeWindowRunner(model, caches[1], "paged", max_steps=STEPS, graph_batch_sizes=(1, 2, 4),
                                 compile_model=True)
    assert graphed.use_graphs and graphed.compiled, "the compiled capture failed and fell back (see the log)"
    got, expected = _window(graphed, firsts[1], [STEPS] * 3), _window(eager, firsts[0], [STEPS] * 3)
    assert graphed.num_graph_steps == STEPS
    if dtype == torch.float32:
        assert got == expected
    else:
        assert all(0 <= t < model.config.vocab_size for row in got for t in row)
