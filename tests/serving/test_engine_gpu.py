"""LLMEngine on CUDA: CUDA-graph decode equals eager decode and static SDPA generate (llama "nano", fp32).

head_dim 32: compiled FlexAttention has no fp32 kernel choice for nano's head_dim of 16.
"""

import pytest
import torch

from fms.models import get_model
from fms.serving import LLMEngine, SamplingParams
from fms.utils.generation import generate

pytestmark = [pytest.mark.gpu, pytest.mark.paged,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def model():
    return get_model("llama", "nano", device_type="cuda", data_type="float32", head_dim=32)


def test_cuda_graph_decode_matches_eager_and_sdpa(model):
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 512, (n,), generator=g).tolist() for n in (1, 5, 17, 33, 40, 64, 100)]
    reference = generate(model, prompts, 12, attn_name="sdpa")
    params = SamplingParams(max_new_tokens=12)
    graphed = LLMEngine(model, num_pages=64, max_num_seqs=8, graph_batch_sizes=(1, 2, 4, 8))
    assert graphed.runner.graphs is not None
    outs = graphed.generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in outs] == reference
    assert graphed.stats()["num_graph_forwards"] > 0
    eager = LLMEngine(model, num_pages=64, max_num_seqs=8, use_cuda_graphs=False)
    assert [o.token_ids for o in eager.generate(prompts, params, use_tqdm=False)] == reference
    # a tight pool (preemption) and a small token budget (chunked prefill) with graphs on
    tight = LLMEngine(model, num_pages=12, max_num_seqs=8, max_num_batched_tokens=32, graph_batch_sizes=(1, 2, 4, 8))
    assert [o.token_ids for o in tight.generate(prompts, params, use_tqdm=False)] == reference
    assert tight.stats()["num_preemptions"] > 0


def test_layer_compile_scope_with_graphs_matches_sdpa(model):
    """compile_scope "layers": one compiled decoder layer for every layer, attention outside the graphs, decode
    captured in CUDA graphs and the packed prefill compiled: greedy tokens equal static SDPA generate."""
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(1, 512, (n,), generator=g).tolist() for n in (1, 9, 30, 64)]
    reference = generate(model, prompts, 10, attn_name="sdpa")
    engine = LLMEngine(model, num_pages=64, max_num_seqs=4, graph_batch_sizes=(1, 2, 4), compile_scope="layers",
                       compile_decode=True, compile_prefill=True)
    assert engine.runner.graphs is not None
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=10), use_tqdm=False)
    assert [o.token_ids for o in outs] == reference
    assert engine.stats()["num_graph_forwards"] > 0


def test_compiled_decode_captures_a_batch_of_one_from_the_same_trace(model):
    """With unbacked_batch the compiled decode step (compile_scope "layers"; its projections go through the op
    fms::gemv) is traced once for every captured size, 1 included (compiled.unbacked_batch): no function of the step has a second
    compiled entry, and a lone request replays the size-1 graph with tokens equal to static SDPA generate."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    from fms.runtime import compiled, decode

    torch._dynamo.reset()
    engine = LLMEngine(model, num_pages=64, max_num_seqs=4, graph_batch_sizes=(1, 2, 4), compile_scope="layers",
                       compile_decode=True, compile_prefill=False, unbacked_batch=True)
    runner = engine.runner.graphs
    assert runner.compiled and runner.unbacked and {key[0] for key in runner._graphs} == {1, 2, 4}
    step_functions = (compiled._attention_inputs, compiled._attention_output, decode._step_outputs,
                      type(runner.cache).window_inputs)
    assert [len(_debug_get_cache_entry_list(fn.__code__)) for fn in step_functions] == [1, 1, 1, 1]
    prompt = torch.randint(1, 512, (21,), generator=torch.Generator().manual_seed(3)).tolist()
    out = engine.generate([prompt], SamplingParams(max_new_tokens=12), use_tqdm=False)
    assert [o.token_ids for o in out] == generate(model, [prompt], 12, attn_name="sdpa")
    assert engine.stats()["num_graph_forwards"] > 0


def test_a_lone_request_runs_in_the_smallest_captured_size(model):
    """graph_batch_sizes without 1 (--cuda-graph-sizes 2,4): a batch of one replays the size-2 graph with an idle
    row beside it; greedy tokens equal static SDPA generate."""
    prompt = torch.randint(1, 512, (21,), generator=torch.Generator().manual_seed(3)).tolist()
    engine = LLMEngine(model, num_pages=64, max_num_seqs=4, graph_batch_sizes=(2, 4))
    assert engine.runner.graphs.batch_sizes == [2, 4]
    out = engine.generate([prompt], SamplingParams(max_new_tokens=12), use_tqdm=False)
    assert [o.token_ids for o in out] == generate(model, [prompt], 12, attn_name="sdpa")
    assert engine.stats()["num_graph_forwards"] > 0
    assert all(key[0] != 1 for key in engine.runner.graphs._graphs)


def test_graphed_sampling_and_windows_equal_eager(model):
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 512, (n,), generator=g).tolist() for n in (3, 20, 50)]
    params = [SamplingParams(max_new_tokens=20, temperature=0.9, seed=4),
              SamplingParams(max_new_tokens=13, temperature=1.1, top_k=30, top_p=0.9, seed=5),
              SamplingParams(max_new_tokens=17)]
    graphed = LLMEngine(model, num_pages=64, max_num_seqs=4, graph_batch_sizes=(1, 2, 4))
    eager = LLMEngine(model, num_pages=64, max_num_seqs=4, use_cuda_graphs=False, max_decode_steps=1)
    a = [o.token_ids for o in graphed.generate(prompts, params, use_tqdm=False)]
    assert a == [o.token_ids for o in eager.generate(prompts, params, use_tqdm=False)]
    assert graphed.stats()["num_decode_windows"] > 0 and graphed.stats()["num_graph_forwards"] > 0


def test_hybrid_decode_replays_graphs_and_matches_sdpa():
    # h-nano's own random weights greedily repeat one token; these overrides give varied continuations
    hybrid = get_model("granite_hybrid", "h-nano", device_type="cuda", data_type="float32", seed=5,
                       embedding_multiplier=1.0, init_std=0.3)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(1, 512, (n,), generator=g).tolist() for n in (1, 17, 33, 40)]
    reference = generate(hybrid, prompts, 10, attn_name="sdpa")
    assert all(len(set(o)) >= 4 for o in reference), reference
    engine = LLMEngine(hybrid, num_pages=32, max_num_seqs=4, graph_batch_sizes=(1, 2, 4))
    assert engine.runner.graphs is not None
    assert [o.token_ids for o in engine.generate(prompts, SamplingParams(max_new_tokens=10), use_tqdm=False)] \
        == reference
    assert engine.stats()["num_graph_forwards"] > 0
    assert engine.kv.num_seqs == 0  # every state slot back


def test_hybrid_layer_compile_scope_with_graphs_matches_sdpa():
    """Granite-4.0-H under compile_scope "layers": attention layers as two compiled halves, Mamba layers compiled
    whole with their own state pools, decode captured in CUDA graphs. Greedy tokens equal static SDPA generate."""
    hybrid = get_model("granite_hybrid", "h-nano", device_type="cuda", data_type="float32", seed=5,
                       embedding_multiplier=1.0, init_std=0.3, head_dim=32)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(1, 512, (n,), generator=g).tolist() for n in (1, 12, 31, 48)]
    reference = generate(hybrid, prompts, 10, attn_name="sdpa")
    assert all(len(set(o)) >= 4 for o in reference), reference
    engine = LLMEngine(hybrid, num_pages=32, max_num_seqs=4, graph_batch_sizes=(1, 2, 4), compile_scope="layers",
                       compile_decode=True)
    assert engine.runner.graphs is not None
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=10), use_tqdm=False)
    assert [o.token_ids for o in outs] == reference
    assert engine.stats()["num_graph_forwards"] > 0
    assert engine.kv.num_seqs == 0


def test_packed_compiled_prefill_matches_padded_eager_bf16():
    """bf16: flash varlen over packed rows, compiled, against the padded eager forward (the same
    kernel family on right-padded rows). Logits within bf16 rounding; both steps: fresh rows, then
    chunks after cached context (keys gathered from the pool)."""
    from fms.modules.attention import get_attention_op
    from dataclasses import replace

    from fms.serving.config import EngineConfig
    from fms.serving.model_runner import ModelRunner

    model = get_model("llama", "nano", device_type="cuda", data_type="bfloat16", head_dim=64)
    op = get_attention_op("paged")
    caches = [op.create_cache(model.cache_spec(), max_batch_size=3, max_seq_len=512, num_pages=64) for _ in range(2)]
    config = EngineConfig(compile_prefill=True).for_device(True, model.config.max_position_embeddings)
    packed = ModelRunner(model, caches[0], config)
    assert packed.pack_prefill and packed.prefill_compiled
    padded = ModelRunner(model, caches[1], replace(config, compile_prefill=False))
    padded.pack_prefill = False
    g = torch.Generator().manual_seed(3)
    for cache in caches:
        for i in range(3):
            cache.add(i)
    from fms.serving.request import SamplingParams as Params
    from fms.serving.scheduler import ScheduledChunk

    starts = [0, 0, 0]
    for lengths in ((5, 37, 130), (4, 9, 1)):
        tokens = [torch.randint(1, 512, (n,), generator=g).tolist() for n in lengths]
        chunks = [ScheduledChunk(i, t, s, True, Params()) for i, (t, s) in enumerate(zip(tokens, starts))]
        for cache in caches:  # the room a scheduler would have reserved
            cache.apply(cache.manager.reserve([0, 1, 2], [len(t) for t in tokens]))
        a = packed._forward(chunks, "packed").float()
        kind = "fresh" if starts[0] == 0 else "resumed"
        b = padded._forward(chunks, kind).float()
        torch.testing.assert_close(a, b, atol=3e-2, rtol=3e-2)
        starts = [s + n for s, n in zip(starts, lengths)]
    assert packed.prefill_compiled  # no fallback to eager happened
