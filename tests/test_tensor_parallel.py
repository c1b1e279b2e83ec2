"""Tensor parallel on CPU (gloo, 2 processes): TP=2 equals the single-process model, a failing rank stops the others,
and a HF checkpoint is read only by slices.

The references are the plain (TP=1) path computed in this process; each launch starts two forked ranks with one
thread each, with collective timeouts and a bound on the whole run, so a broken collective fails instead of hanging.
"""

import time

import pytest
import torch

from fms.distributed import RankFailedError, TensorParallel, current_tensor_parallel, launch
from fms.distributed.sharding import TensorShard, head_ranges, split_range
from fms.models import get_model
from fms.serving import LLMEngine, SamplingParams
from fms.utils.generation import generate

NEW = 8
# name -> (architecture, variant, overrides). Granite's tied, x12 embedding with the default std repeats the
# last prompt token forever; a larger std (and for the hybrid nano, embedding_multiplier 1) gives varied tokens.
MODELS = {
    "llama": ("llama", "micro", {}),
    "granite": ("granite", "micro", dict(init_std=0.3)),
    "granite_4h": ("granite_hybrid", "h-nano", dict(init_std=0.3, embedding_multiplier=1.0)),  # Mamba2 + attention
}
LAUNCH = dict(num_threads=1, start_method="fork", timeout_s=60, max_run_s=240)


def _prompts(vocab_size: int = 512):
    g = torch.Generator().manual_seed(0)
    shared = torch.randint(1, vocab_size, (40,), generator=g).tolist()
    with_prefix = [shared + torch.randint(1, vocab_size, (n,), generator=g).tolist() for n in (3, 9, 20)]
    return with_prefix + [torch.randint(1, vocab_size, (n,), generator=g).tolist() for n in (1, 17, 33)]


def _engine_outputs(model, prompts):
    # 7 pages of 16 tokens for 5 requests of up to 68 tokens: preemption; the first request's two full pages
    # of the shared prefix are cached for the later ones
    engine = LLMEngine(model, num_pages=7, max_num_batched_tokens=64)
    first = engine.generate(prompts[:1], SamplingParams(max_new_tokens=NEW), use_tqdm=False)
    rest = engine.generate(prompts[1:], SamplingParams(max_new_tokens=NEW), use_tqdm=False)
    stats = engine.stats()
    return [o.token_ids for o in first + rest], stats["num_preemptions"], stats["prefix_cache_hit_tokens"]


def _tp_run():
    """On each rank: greedy tokens of every model through generate() (sdpa, paged) and the engine."""
    tp = current_tensor_parallel()
    out = {"rank": tp.rank, "world_size": tp.world_size,
           "broadcast": tp.broadcast_object([("add", tp.rank)]), "min": tp.min_int(7 - tp.rank)}
    for name, (arch, variant, overrides) in MODELS.items():
        model = get_model(arch, variant, distributed_strategy="tp", **overrides)
        prompts = _prompts(model.config.vocab_size)
        state = model.cache_spec().state_spec
        out[name] = {
            "kv_heads": model.cache_spec().num_kv_heads,
            "mamba_heads": None if state is None else state.num_heads,
            "embedding_rows": model.embedding.weight.shape[0],
            "sdpa": generate(model, prompts, NEW, attn_name="sdpa"),
            "paged": generate(model, prompts, NEW, attn_name="paged", page_size=16),
            "engine": _engine_outputs(model, prompts),
        }
    # torch.compile traces the collectives into one graph (what compiled decode and CUDA graphs rely on)
    model, ids = get_model("llama", "nano", distributed_strategy="tp"), torch.tensor([_prompts()[4][:5]])
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out["compiled_max_diff"] = (compiled(ids) - model(ids)).abs().max().item()
    return out


@pytest.fixture(scope="module")
def tp_results():
    return launch(_tp_run, 2, **LAUNCH)


@pytest.mark.parametrize("name", list(MODELS))
def test_tp2_greedy_equals_tp1(tp_results, name):
    arch, variant, overrides = MODELS[name]
    model = get_model(arch, variant, **overrides)
    reference = generate(model, _prompts(model.config.vocab_size), NEW, attn_name="sdpa")
    assert len({t for row in reference for t in row}) > 20  # varied tokens, not one repeated
    for result in tp_results:
        got = result[name]
        # each rank: 1 of the 2 KV heads, half the vocabulary, half the Mamba2 heads (h-nano: 4)
        assert got["kv_heads"] == 1 and got["embedding_rows"] == model.config.vocab_size // 2
        assert got["mamba_heads"] == (2 if name == "granite_4h" else None)
        assert got["sdpa"] == reference
        assert got["paged"] == reference
        tokens, preemptions, prefix_hits = got["engine"]
        assert tokens == reference
        assert preemptions > 0 and prefix_hits > 0
    assert tp_results[0][name] == tp_results[1][name]  # same outputs on every rank (torchrun scripts)


def test_host_collectives(tp_results):
    assert [(r["rank"], r["world_size"]) for r in tp_results] == [(0, 2), (1, 2)]
    assert [r["broadcast"] for r in tp_results] == [[("add", 0)]] * 2  # rank 0's object everywhere
    assert [r["min"] for r in tp_results] == [6, 6]


def test_compiled_tp_forward_has_one_graph(tp_results):
    assert [r["compiled_max_diff"] for r in tp_results] == [0.0, 0.0]


# -- failures: a clear error, not a hang -----------------------------------------------------------
def _rank1_raises():
    tp = current_tensor_parallel()
    if tp.rank == 1:
        raise ValueError("rank 1 cannot load its shard")
    tp.all_reduce(torch.ones(4))  # rank 0 waits here for a peer that is gone


def _rank1_hangs():
    tp = current_tensor_parallel()
    if tp.rank == 1:
        time.sleep(120)
    tp.all_reduce(torch.ones(4))


def test_failing_rank_stops_the_others():
    start = time.monotonic()
    with pytest.raises(RankFailedError, match="rank 1 failed") as info:
        launch(_rank1_raises, 2, **LAUNCH)
    assert info.value.rank == 1 and "ValueError: rank 1 cannot load its shard" in info.value.details
    assert time.monotonic() - start < 30


def test_stuck_rank_times_out_the_collective():
    start = time.monotonic()
    with pytest.raises(RankFailedError, match="rank 0 failed") as info:
        launch(_rank1_hangs, 2, **dict(LAUNCH, timeout_s=2))
    assert "Timed out" in info.value.details and "all_reduce" in info.value.details
    assert time.monotonic() - start < 30


# -- checkpoints: each rank reads only its slices -------------------------------------------------------
def _write_checkpoints(root):
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=301, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                  pad_token_id=0)
    cases = {  # an odd vocabulary (uneven split), untied; a tied Granite 4.0 dense model in several files
        "llama": (transformers.LlamaConfig(**common, initializer_range=0.3, tie_word_embeddings=False),
                  transformers.LlamaForCausalLM, {}),
        "granite4": (transformers.GraniteMoeHybridConfig(
            **common, initializer_range=0.4, tie_word_embeddings=True, shared_intermediate_size=96,
            layer_types=["attention"] * 2, position_embedding_type="rope", num_local_experts=0,
            num_experts_per_tok=0, embedding_multiplier=3.0, attention_multiplier=0.1, residual_multiplier=0.5,
            logits_scaling=2.5), transformers.GraniteMoeHybridForCausalLM, {"max_shard_size": "40KB"}),
    }
    # Granite-4.0-H: Mamba2 layers with two B/C groups (each rank holds one group), HF's constant inits
    # (norms, A_log, dt_bias, D, conv bias) made random per channel so that a slice from the wrong place shows
    mamba = transformers.GraniteMoeHybridConfig(num_hidden_layers=1, layer_types=None).layers_block_type[0]
    attention = "full_attention" if mamba == "linear_attention" else "attention"
    cases["granite4h"] = (transformers.GraniteMoeHybridConfig(
        **dict(common, intermediate_size=32, num_hidden_layers=3), initializer_range=0.3, tie_word_embeddings=True,
        shared_intermediate_size=96, layer_types=[mamba, attention, mamba], position_embedding_type="nope",
        num_local_experts=0, num_experts_per_tok=0, mamba_n_heads=4, mamba_d_head=16, mamba_expand=1,
        mamba_d_state=16, mamba_n_groups=2, mamba_d_conv=4, mamba_chunk_size=8),
        transformers.GraniteMoeHybridForCausalLM, {})
    paths = {}
    for name, (config, model_class, save_options) in cases.items():
        torch.manual_seed(0)
        model = model_class(config)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if pname.endswith(("norm.weight", "A_log", "dt_bias", "mamba.D", "conv1d.bias")):
                    p.copy_(torch.empty(p.shape).uniform_(0.5, 1.5, generator=g))
        model.save_pretrained(root / name, safe_serialization=True, **save_options)
        paths[name] = str(root / name)
    return paths


PROMPT = [[5, 17, 300, 42, 7, 99, 150]]


def _load_by_slices(paths):
    from fms.utils import serialization

    whole = []  # tensors a rank reads whole (one by one, or in the batch read by offset): only the unsplit ones
    read, read_into = serialization._Reader.get, serialization._Reader.read_into
    serialization._Reader.get = lambda self, name: whole.append(name) or read(self, name)

    def batch(self, pairs):
        left = read_into(self, pairs)
        whole.extend(name for name, _ in pairs if all(name != n for n, _ in left))
        return left

    serialization._Reader.read_into = batch
    out = {}
    for name, path in paths.items():
        model = get_model("hf_pretrained", model_path=path, distributed_strategy="tp")
        out[name] = (model(torch.tensor(PROMPT))[0], generate(model, PROMPT, NEW)[0])
    return out, whole


def test_checkpoint_shards_equal_the_full_load(tmp_path):
    paths = _write_checkpoints(tmp_path)
    results = launch(_load_by_slices, 2, (paths,), **LAUNCH)
    for name, path in paths.items():
        full = get_model("hf_pretrained", model_path=path)
        logits = full(torch.tensor(PROMPT))[0]
        tokens = generate(full, PROMPT, NEW)[0]
        assert len(set(tokens)) > 3
        for out, whole in results:
            torch.testing.assert_close(out[name][0], logits, atol=1e-4, rtol=1e-4)  # fp32, sums split over ranks
            assert out[name][1] == tokens
    for _, whole in results:  # read whole: RMSNorm weights only (the Mamba gated norm's weight is split)
        assert whole and all(n.endswith("layernorm.weight") or n == "model.norm.weight" for n in whole), whole


# -- sharding arithmetic and refusals (no processes) ------------------------------------------------
def test_head_and_row_splits():
    # 8 query heads, 2 KV heads over 4 ranks: KV heads replicated on the two ranks whose queries read them
    assert [head_ranges(8, 2, r, 4) for r in range(4)] == [((0, 2), (0, 1)), ((2, 4), (0, 1)),
                                                         ((4, 6), (1, 2)), ((6, 8), (1, 2))]
    assert [head_ranges(8, 4, r, 2) for r in range(2)] == [((0, 4), (0, 2)), ((4, 8), (2, 4))]
    assert [split_range(301, r, 2) for r in range(2)] == [(0, 151), (151, 301)]
    with pytest.raises(ValueError, match="must divide num_heads"):
        head_ranges(6, 2, 0, 4)
    with pytest.raises(ValueError, match="num_kv_heads must divide"):
        head_ranges(12, 3, 0, 4)
    shard = TensorShard((6, 2), 0, ((0, 1), (4, 6)))
    assert shard.take(torch.arange(12).view(6, 2)).tolist() == [[0, 1], [8, 9], [10, 11]]


def test_unsupported_models_are_refused_clearly():
    from fms.models.registry import get_config, lookup_architecture

    tp = TensorParallel(0, 2)
    hybrid = lookup_architecture("granite_hybrid").model_class
    h_nano = get_config("granite_hybrid", "h-nano")  # 4 Mamba2 heads, one B/C group
    with torch.device("meta"), pytest.raises(ValueError, match="mamba_num_groups"):
        hybrid(h_nano.updated(mamba_num_groups=2), tp=TensorParallel(0, 4))  # 2 groups over 4 ranks
    with torch.device("meta"), pytest.raises(ValueError, match="mixture-of-experts"):
        hybrid(h_nano.updated(num_experts=4, num_experts_per_token=2, expert_intermediate_size=32), tp=tp)
    llama = lookup_architecture("llama").model_class
    with torch.device("meta"), pytest.raises(ValueError, match="alibi"):
        llama(get_config("llama", "nano").updated(alibi=True), tp=tp)
    with torch.device("meta"), pytest.raises(ValueError, match="must divide num_heads"):
        llama(get_config("llama", "nano"), tp=TensorParallel(0, 8))
    with pytest.raises(ValueError, match="distributed_strategy"):
        get_model("llama", "nano", distributed_strategy="fsdp")
    with pytest.raises(ValueError, match="no tensor-parallel form"):
        get_model("gpt2", "nano", distributed_strategy="tp")
    with pytest.raises(RuntimeError, match="torchrun"):
        get_model("llama", "nano", distributed_strategy="tp")
