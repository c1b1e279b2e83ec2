"""How many times the engine's dynamic-shape compiles trace, on the CPU (dynamo + AOT autograd, no codegen).

Each extra trace is a whole-model compile at start-up on the GPU (tens of seconds each for a 1B model on the
H200, final_project section 8), so these pin the shapes that used to cause one:
- a decode window of the full batch, then a smaller one: the step's inputs are views [:bs] of
  preallocated buffers, and a view as long as its buffer made dynamo guard on the two sizes being equal;
- a packed prefill of one sequence after one of several: a (1, 1) logits_positions specialized on size 1.
"""

import os
from types import SimpleNamespace

import pytest
import torch

from fms.models import get_model
from fms.modules.attention import get_attention_op
from fms.runtime.decode import DecodeRow, DecodeWindowRunner
from fms.runtime.sampling_params import SamplingParams
from fms.serving.config import EngineConfig
from fms.serving.model_runner import ModelRunner

MAX_BATCH = 4


@pytest.fixture
def model():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    return get_model("llama", "nano", seed=0, device_type="cpu", data_type=torch.float32, head_dim=32)


def _cache(model):
    return get_attention_op("paged").create_cache(model.cache_spec(), max_batch_size=MAX_BATCH, max_seq_len=128,
                                                  page_size=16)


def _traces() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def test_decode_windows_of_the_full_batch_then_fewer_rows_trace_each_function_once(model):
    cache = _cache(model)
    runner = DecodeWindowRunner(model, cache, "paged", max_steps=3, graph_batch_sizes=None, compile_model=True)
    runner._set_compiled(True, "aot_eager")
    _windows_equal_eager(model, runner, (MAX_BATCH, 2, 3))
    # the forward, the step's inputs and its bookkeeping: one symbolic-batch trace each
    assert _traces() == 3


def run_window(runner, batch):
    """A window of 3 steps over `batch` new sequences on runner (their pages freed after it): its tokens per row."""
    ids = [(batch, i) for i in range(batch)]
    for i in ids:
        runner.cache.add(i)
    runner.cache.prepare_decode_window(ids, [3] * batch)
    rows = [DecodeRow(i, 5 + k, 0, 3, SamplingParams(max_new_tokens=3), 0) for k, i in enumerate(ids)]
    with torch.no_grad():
        tokens = runner.run(rows)
    for i in ids:
        runner.cache.free(i)
    return tokens


def _windows_equal_eager(model, runner, batches, eager_model=None):
    """A window of each batch size on runner and on an eager runner over its own cache (of eager_model, default
    the same model): the same tokens."""
    eager_model = eager_model or model
    eager = DecodeWindowRunner(eager_model, _cache(eager_model), "paged", max_steps=3, graph_batch_sizes=None)
    sampled = set()
    for batch in batches:
        outs = [run_window(r, batch) for r in (runner, eager)]
        assert outs[0] == outs[1]
        sampled |= {t for row in outs[0] for t in row}
    assert len(sampled) > 2  # varied tokens


def _chunk(i, tokens):
    return SimpleNamespace(request_id=i, token_ids=tokens, start_position=0)


def test_packed_prefill_of_one_sequence_reuses_the_trace_of_several(model):
    cache = _cache(model)
    config = EngineConfig(compile_prefill=True).for_device(False, model.config.max_position_embeddings)
    runner = ModelRunner(model, cache, config)
    assert runner.pack_prefill  # on the CPU the packed step runs the varlen reference
    runner.prefill_compiled = True
    runner._prefill_forward = torch.compile(model, dynamic=True, backend="aot_eager")
    g = torch.Generator().manual_seed(0)
    steps = [(48, 16), (8,), (30, 7, 21)]
    for n, lengths in enumerate(steps):
        chunks = [_chunk((n, i), torch.randint(1, 256, (m,), generator=g).tolist()) for i, m in enumerate(lengths)]
        for c in chunks:
            cache.add(c.request_id)
        cache.apply(cache.manager.reserve([c.request_id for c in chunks], list(lengths)))
        logits = runner._forward(chunks, "packed")
        assert logits.shape == (len(lengths), model.config.vocab_size)
        for row, c in zip(logits, chunks):  # each chunk alone, eagerly, with no cache
            with torch.no_grad():
                alone = model(torch.tensor([c.token_ids]), attn_name="sdpa")[0, -1]
            torch.testing.assert_close(row, alone, atol=1e-4, rtol=1e-4)
        for c in chunks:
            cache.free(c.request_id)
    assert _traces() == 1


# -- compile_scope "layers": one decoder layer compiled once for every layer ---------------------------------------
def _layered_decode(num_layers, backend="aot_eager"):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = get_model("llama", "nano", seed=0, device_type="cpu", data_type=torch.float32, head_dim=32,
                      num_layers=num_layers)
    runner = DecodeWindowRunner(model, _cache(model), "paged", max_steps=3, graph_batch_sizes=None,
                                compile_model=True, compile_scope="layers", unbacked_batch=True)
    runner._set_compiled(True, backend)
    _windows_equal_eager(model, runner, (MAX_BATCH, 2, 1))
    # one trace each: the layer's two halves around the attention op, the step's inputs and its bookkeeping
    # (the first window's batch of 4 equals nano's head count: a size tied to it would recompile at 2; a batch of 1,
    # which dynamo specializes unless its size is unbacked (compiled.mark_batch), would trace every function again)
    assert _traces() == 4
    # operations dynamo put into graphs: a whole-model trace holds every layer's
    return torch._dynamo.utils.counters["stats"]["calls_captured"]


def test_layer_scope_decode_equals_eager_and_its_tracing_does_not_grow_with_depth():
    shallow, deep = _layered_decode(2), _layered_decode(6)
    assert shallow == deep, (shallow, deep)


def test_layer_scope_decode_under_inductor_traces_a_batch_of_one_with_the_others():
    """With inductor's lowering (not aot_eager's): a backed batch symbol picks up guards there (size >= 2, under
    torch.fx's backed_size_oblivious) that a batch of 1 fails, and the step compiled again (four recompiles of
    Granite-4.0-H's cold start on the H100, final_project section 25). The unbacked batch has none: windows of 4,
    2 and 1 rows, one trace of each function, tokens equal to eager."""
    _layered_decode(2, backend="inductor")


@pytest.mark.parametrize("family", ["llama", "granite_hybrid"])
def test_an_unbacked_batch_traces_once_with_the_decode_kernels_output_layout(monkeypatch, family):
    """On CUDA the paged decode kernel writes a fresh (B, Hq, D) tensor (paged_decode.new_output) and the op returns
    the view (B, Hq, 1, D) of it. The torch reference the CPU runs returns another layout; here it hands out the
    kernel's, under inductor (with the projections through the GEMV op in Triton's interpreter where it is on), and a
    batch of 1 traces nothing again. Two causes of a second trace of attention_output on the H100 (final_project
    section 26) each fail here without their fix: the view's base, which dynamo sizes on its own (its backed batch
    guarded >= 2; llama), and an output allocated like q, which kept the stride of q's slice of the fused q/k/v
    projection at a batch of 1 only (Granite-4.0-H, whose attention has no rotary embedding to copy q)."""
    from fms.modules import attention as attention_mod
    from fms.triton.paged_decode import new_output

    reference = attention_mod._paged_decode

    def kernel_layout(q, *args, **kwargs):
        return new_output(q).copy_(reference(q, *args, **kwargs))

    monkeypatch.setattr(attention_mod, "_paged_decode", kernel_layout)
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    launched = _gemv_kernel_on_cpu_rows(monkeypatch) if interpreted else []  # the projections as on CUDA
    if family == "llama":
        _layered_decode(2, backend="inductor")  # asserts one trace of each function
    else:  # the attention halves, the Mamba layer, the step's inputs and its bookkeeping
        assert _hybrid_layered_decode(("mamba", "attention"), backend="inductor")[0] == 5
    assert launched or not interpreted


def _gemv_kernel_on_cpu_rows(monkeypatch) -> list:
    """The GEMV kernel (in Triton's interpreter) for CPU rows where it would take CUDA rows: fits widened, one block
    shape. -> a list that gets an entry per kernel launch."""
    from fms.modules import linear as linear_mod
    from fms.triton import gemv as gemv_mod
    from tests.triton_interpreter import fits_cpu_rows

    launched, launch = [], gemv_mod._launch
    monkeypatch.setattr(gemv_mod, "_launch", lambda *a, **k: launched.append(1) or launch(*a, **k))
    monkeypatch.setattr(gemv_mod, "tuned_choice", lambda *a: (32, 64, 1, 1))
    monkeypatch.setattr(linear_mod, "fits", fits_cpu_rows(linear_mod.fits))
    return launched


def test_gemv_kernel_in_the_lm_head_does_not_retrace_sampling(monkeypatch):
    """The LM head runs eagerly between the compiled layers and the compiled sampling (_step_outputs). Its logits
    come from the GEMV kernel at 2 rows and from cuBLAS at 4; both must be new tensors, not a view of a 2-D result
    in one case only, or dynamo (which guards a view's base) traces _step_outputs twice. On the CPU the kernel runs
    in Triton's interpreter: fits is widened to CPU rows here."""
    pytest.importorskip("triton", reason="the GEMV kernel needs triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs the GEMV kernel on CPU rows, in Triton's interpreter (set on machines without CUDA)")
    launched = _gemv_kernel_on_cpu_rows(monkeypatch)
    assert _layered_decode(2) > 0
    assert launched  # the head's two rows (and the op's, in the layers) went through the kernel


def test_layer_scope_prefill_equals_the_uncached_model():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    from fms.runtime.compiled import compile_forward

    model = get_model("llama", "nano", seed=0, device_type="cpu", data_type=torch.float32, head_dim=32, num_layers=4)
    cache = _cache(model)
    runner = ModelRunner(model, cache, EngineConfig(compile_prefill=True, compile_scope="layers").for_device(
        False, model.config.max_position_embeddings))
    runner.prefill_compiled = True
    runner._prefill_forward = compile_forward(model, "layers", backend="aot_eager")
    g = torch.Generator().manual_seed(1)
    # 64 packed tokens first: as many as nano's hidden size (a size tied to it would recompile at 13)
    for n, lengths in enumerate([(48, 16), (20, 9), (13,)]):
        chunks = [_chunk((n, i), torch.randint(1, 256, (m,), generator=g).tolist()) for i, m in enumerate(lengths)]
        for c in chunks:
            cache.add(c.request_id)
        cache.apply(cache.manager.reserve([c.request_id for c in chunks], list(lengths)))
        logits = runner._forward(chunks, "packed")
        for row, c in zip(logits, chunks):
            with torch.no_grad():
                alone = model(torch.tensor([c.token_ids]), attn_name="sdpa")[0, -1]
            torch.testing.assert_close(row, alone, atol=1e-4, rtol=1e-4)
        for c in chunks:
            cache.free(c.request_id)
    frames = _traces()
    assert frames == 2, frames  # the two halves of one layer around the attention op, not one per layer


def test_compile_scope_is_checked_and_unsupported_layers_compile_the_whole_model(caplog):
    from fms.runtime.compiled import compile_forward, why_no_layer_scope

    with pytest.raises(ValueError, match="compile_scope must be one of model, layers, got 'blocks'"):
        EngineConfig(compile_scope="blocks")
    hybrid = get_model("granite_hybrid", "h-nano", seed=0, device_type="cpu", data_type=torch.float32)
    assert why_no_layer_scope(hybrid) is None  # attention and Mamba layers
    hybrid.layers[0].mixer = torch.nn.Identity()  # layer 0 is a Mamba layer
    assert "mamba layers (Identity) hand out no per-layer cache" in why_no_layer_scope(hybrid)
    assert why_no_layer_scope(get_model("llama", "nano", device_type="cpu")) is None
    model = get_model("llama", "nano", seed=0, device_type="cpu", data_type=torch.float32)
    model.layers[1].mixer = torch.nn.Identity()  # a mixer with no way to serve every layer from one compile
    assert "do not split around the attention op" in why_no_layer_scope(model)
    with caplog.at_level("WARNING"):
        forward = compile_forward(model, "layers", backend="eager")
    assert isinstance(forward, torch.nn.Module)  # torch.compile of the whole model
    assert "whole model" in caplog.text


def _hybrid_layered_decode(layer_types, backend="aot_eager"):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    # h-nano's own random weights greedily repeat one token; these overrides give varied continuations
    model = get_model("granite_hybrid", "h-nano", seed=5, device_type="cpu", data_type=torch.float32,
                      num_layers=len(layer_types), layer_types=layer_types, embedding_multiplier=1.0, init_std=0.3)
    runner = DecodeWindowRunner(model, _cache(model), "paged", max_steps=3, graph_batch_sizes=None,
                                compile_model=True, compile_scope="layers", unbacked_batch=True)
    runner._set_compiled(True, backend)
    _windows_equal_eager(model, runner, (MAX_BATCH, 2, 1))
    return _traces(), torch._dynamo.utils.counters["stats"]["calls_captured"]


def test_layer_scope_hybrid_decode_equals_eager_with_one_trace_per_layer_kind():
    """Granite-4.0-H: attention layers in two compiled halves, Mamba layers compiled whole with their own state
    pools as inputs; the traces do not grow with depth."""
    shallow = _hybrid_layered_decode(("mamba", "attention", "mamba", "attention"))
    deep = _hybrid_layered_decode(("mamba", "mamba", "attention", "mamba", "mamba", "attention", "mamba", "mamba"))
    # the attention halves, the Mamba layer, the step's inputs and its bookkeeping
    assert shallow == deep and shallow[0] == 5, (shallow, deep)


@pytest.mark.parametrize("architecture,variant", [("gpt2", "nano"), ("gpt2", "nano-alibi"), ("gpt2", "nano-window"),
                                                  ("gpt2", "nano-softcap"), ("granite", "nano")])
def test_layer_scope_decode_equals_eager_for_every_attention_family(architecture, variant):
    """compile_scope "layers" on every attention family and variant: GPT-2 (learned positions, ALiBi, sliding window,
    soft-capping) and Granite (its multipliers); llama and Granite-4.0-H above. Decode windows equal eager, and each
    compiled half of the layer is traced once (no recompile: FlexAttention's own compile, which the ALiBi and
    soft-capping decode takes eagerly, is not counted)."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    from fms.runtime import compiled

    torch._dynamo.reset()
    varied = dict(embedding_multiplier=1.0) if architecture == "granite" else {}  # else it repeats one token
    model = get_model(architecture, variant, seed=1, device_type="cpu", data_type=torch.float32, init_std=0.3, **varied)
    assert compiled.why_no_layer_scope(model) is None
    runner = DecodeWindowRunner(model, _cache(model), "paged", max_steps=3, graph_batch_sizes=None,
                                compile_model=True, compile_scope="layers", unbacked_batch=True)
    runner._set_compiled(True, "aot_eager")
    _windows_equal_eager(model, runner, (MAX_BATCH, 2, 1))
    for fn in (compiled._attention_inputs, compiled._attention_output):
        assert len(_debug_get_cache_entry_list(fn.__code__)) == 1, fn.__name__
