"""LLMEngine end to end on llama "nano" (fp32, CPU): greedy output equals static generate() with SDPA."""

import pytest
import torch

from fms.models import get_model
from fms.serving import LLMEngine, SamplingParams
from fms.utils.generation import generate

pytestmark = pytest.mark.paged

NEW = 6
LENGTHS = (1, 5, 17, 33, 40)


@pytest.fixture(scope="module")
def model():
    return get_model("llama", "nano")


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(1, 512, (n,), generator=g).tolist() for n in LENGTHS]


@pytest.fixture(scope="module")
def reference(model, prompts):
    return generate(model, prompts, NEW, attn_name="sdpa")


@pytest.mark.parametrize(
    "options",
    [
        dict(num_pages=16),
        dict(num_pages=5, max_num_batched_tokens=64),  # 80 slots for 5 requests: preemption
        dict(num_pages=16, max_num_batched_tokens=16),  # chunked prefill
        # prefill as right-padded rows (the layout of hybrid models), fresh and resumed chunks apart
        dict(num_pages=16, max_num_batched_tokens=24, pack_prefill=False),
        dict(num_pages=16, max_num_batched_tokens=24, pack_prefill=False, bucket_prefills=True),  # resumed alone
        dict(num_pages=16, max_decode_steps=1),  # a host synchronization every token
    ],
    ids=["roomy", "preempting", "chunked", "padded", "bucketed", "single-step"],
)
def test_greedy_matches_static_generate(model, prompts, reference, options):
    options = dict(options)
    bucket = options.pop("bucket_prefills", False)
    pack = options.pop("pack_prefill", True)
    engine = LLMEngine(model, **options)
    assert engine.runner.pack_prefill  # llama: causal attention, no Mamba layers
    engine.runner.bucket_prefills = bucket
    engine.runner.pack_prefill = pack
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=NEW), use_tqdm=False)
    assert [o.token_ids for o in outs] == reference
    assert all(o.finish_reason == "length" for o in outs)
    stats = engine.stats()
    if options["num_pages"] == 5:
        assert stats["num_preemptions"] > 0
    if options.get("max_num_batched_tokens") == 16:
        assert stats["num_steps"] > 6  # the 40-token prompt alone takes 3 steps of 16
    if options.get("max_decode_steps") == 1:
        assert stats["num_decode_windows"] == 0
    elif options["num_pages"] == 16:
        assert stats["num_decode_windows"] > 0
    _assert_no_leaks(engine)


def test_prefix_caching_reuses_pages_and_keeps_outputs(model):
    g = torch.Generator().manual_seed(1)
    shared = torch.randint(1, 512, (40,), generator=g).tolist()
    prompts = [shared + torch.randint(1, 512, (n,), generator=g).tolist() for n in (3, 9, 20)] + [shared]
    reference = generate(model, prompts, NEW, attn_name="sdpa")
    engine = LLMEngine(model, num_pages=16)
    first = engine.generate(prompts[:1], SamplingParams(max_new_tokens=NEW), use_tqdm=False)
    rest = engine.generate(prompts[1:], SamplingParams(max_new_tokens=NEW), use_tqdm=False)
    assert [o.token_ids for o in first + rest] == reference
    assert [o.num_cached_tokens for o in rest] == [32, 32, 32]
    stats = engine.stats()
    assert stats["prefix_cache_hit_tokens"] > 0 and 0 < stats["prefix_cache_hit_rate"] < 1
    _assert_no_leaks(engine)


def test_never_fitting_request_is_rejected_while_others_complete(model, prompts, reference):
    engine = LLMEngine(model, num_pages=6, max_model_len=256)
    too_big = [7] * 100  # holds up to 100 + 6 - 1 tokens: 7 pages of 16; the pool has 6
    too_long = [7] * 252
    outs = engine.generate([prompts[0], too_big, prompts[1], too_long], SamplingParams(max_new_tokens=NEW),
                           use_tqdm=False)
    assert [o.finish_reason for o in outs] == ["length", "rejected", "length", "rejected"]
    assert outs[0].token_ids == reference[0] and outs[2].token_ids == reference[1]
    assert "whole pool has 6" in outs[1].error and outs[1].token_ids == []
    assert "exceeds the model length of 256" in outs[3].error
    with pytest.raises(ValueError, match="vocabulary|token ids"):
        engine.add_request([1, 2, 100_000])
    with pytest.raises(ValueError, match="no tokenizer"):
        engine.add_request("text without a tokenizer")
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.add_request([1, 2], SamplingParams(max_new_tokens=-3))


def test_stream_yields_the_offline_tokens(model, prompts):
    params = [SamplingParams(max_new_tokens=NEW), SamplingParams(max_new_tokens=NEW, temperature=0.8, seed=11),
              SamplingParams(max_new_tokens=3, temperature=1.2, top_k=20, top_p=0.9, seed=5)]
    engine = LLMEngine(model, num_pages=16)
    offline = engine.generate(prompts[1:4], params, use_tqdm=False)
    streamed = {i: [] for i in range(3)}
    finished = []
    for index, tokens, done in engine.stream(prompts[1:4], params):
        streamed[index] += tokens
        if done:
            finished.append(index)
    assert [streamed[i] for i in range(3)] == [o.token_ids for o in offline]
    assert sorted(finished) == [0, 1, 2] and len(offline[2].token_ids) == 3


@pytest.mark.parametrize("max_decode_steps", [1, 8])
def test_seeded_sampling_does_not_depend_on_the_batch_or_the_window(model, prompts, max_decode_steps):
    params = SamplingParams(max_new_tokens=NEW, temperature=1.0, top_p=0.95, seed=123)
    engine = LLMEngine(model, num_pages=16, max_decode_steps=max_decode_steps)
    alone = engine.generate([prompts[2]], params, use_tqdm=True)[0].token_ids
    batched = engine.generate([prompts[0], prompts[2], prompts[3]],
                              [SamplingParams(max_new_tokens=NEW, temperature=0.5), params, SamplingParams()],
                              use_tqdm=False)[1].token_ids
    assert alone == batched
    single_step = LLMEngine(model, num_pages=16, max_decode_steps=1)
    assert single_step.generate([prompts[2]], params, use_tqdm=False)[0].token_ids == alone


def test_step_api_and_text_prompts(model):
    class CharTokenizer:
        eos_token_id = 0

        def encode(self, text):
            return [ord(c) % 500 + 1 for c in text]

        def decode(self, ids):
            return "".join(chr(97 + i % 26) for i in ids)

    engine = LLMEngine(model, tokenizer=CharTokenizer(), num_pages=8)
    rid = engine.add_request("hello paged world", SamplingParams(max_new_tokens=3, ignore_eos=True))
    seen = []
    while engine.has_unfinished_requests():
        for request_id, tokens, finished in engine.step():
            assert request_id == rid
            seen += tokens
    out = engine.pop_output(rid)
    assert out.token_ids == seen and len(seen) == 3 and out.text == CharTokenizer().decode(seen)
    assert out.time_to_first_token > 0 and len(out.inter_token_latencies) == 2


def _assert_no_leaks(engine):
    cache = engine.cache
    assert cache.sequences == []
    engine.kv.check_invariants()
    evictable = engine.prefix_cache.num_evictable if engine.prefix_cache else 0
    assert engine.kv.allocator.num_free + evictable == cache.num_pages


def test_hybrid_granite_through_the_same_cache():
    """Granite-4.0-H (Mamba + attention): a state slot per sequence, freed on preemption and finish;
    prefill chunks packed into one row (Mamba layers over cu_seqlens), resumed chunks carrying state."""
    hybrid = get_model("granite_hybrid", "h-nano", seed=5, embedding_multiplier=1.0, init_std=0.3)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(1, 512, (n,), generator=g).tolist() for n in (1, 17, 33, 40)]
    reference = generate(hybrid, prompts, NEW, attn_name="sdpa")
    assert len({t for row in reference for t in row}) > 4  # varied tokens: a state mix-up would show
    engine = LLMEngine(hybrid, num_pages=5, max_num_batched_tokens=16)
    assert engine.runner.pack_prefill
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=NEW), use_tqdm=False)
    assert [o.token_ids for o in outs] == reference
    stats = engine.stats()
    assert stats["num_preemptions"] > 0 and stats["prefix_caching"]  # prefixes resume from Mamba checkpoints
    assert engine.kv.num_seqs == 0  # every state slot back
    _assert_no_leaks(engine)


@pytest.mark.parametrize("options", [dict(num_pages=5, max_num_batched_tokens=16), dict(max_decode_steps=4)])
def test_all_mamba_hybrid(options):
    """A hybrid config with no attention layer: pages hold no K/V but still bound the sequences."""
    model = get_model("granite_hybrid", "h-nano", seed=5, embedding_multiplier=1.0, init_std=0.3,
                      layer_types=("mamba",) * 4)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(1, 512, (n,), generator=g).tolist() for n in (1, 17, 33, 40)]
    reference = generate(model, prompts, NEW, attn_name="sdpa")
    engine = LLMEngine(model, **options)
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=NEW), use_tqdm=False)
    assert [o.token_ids for o in outs] == reference
    assert engine.cache.keys == [] and engine.kv.num_seqs == 0
    _assert_no_leaks(engine)


@pytest.mark.parametrize("options, match", [
    (dict(max_num_seqs=0), "max_num_seqs must be an int >= 1 or None"),
    (dict(max_num_seqs=-1), "max_num_seqs must be"),
    (dict(max_num_seqs=2.5), r"max_num_seqs must be .* got 2\.5"),
    (dict(max_num_batched_tokens=0), "max_num_batched_tokens must be"),
    (dict(page_size=True), "page_size must be an int >= 1, got True"),
    (dict(num_pages=8, memory_gb=1.0), "at most one of num_pages, memory_gb, memory_fraction"),
    (dict(memory_fraction=1.5), r"memory_fraction must be in \(0, 1\]"),
    (dict(graph_batch_sizes=[4, 0]), "graph_batch_sizes must be"),
    (dict(enable_prefix_caching="yes"), "enable_prefix_caching must be a bool"),
    (dict(max_model_len=10**9), r"max_model_len must be in \[1, "),
    (dict(memory_fraction=0.5), "on CPU give num_pages or memory_gb"),
])
def test_engine_options_are_validated_with_the_value_named(options, match):
    model = get_model("llama", "nano", seed=0)
    with pytest.raises(ValueError, match=match):
        LLMEngine(model, **options)


def test_engine_config_and_keywords_are_one_thing():
    from fms.serving import EngineConfig

    model = get_model("llama", "nano", seed=0)
    engine = LLMEngine(model, config=EngineConfig(max_num_seqs=3, num_pages=20), max_decode_steps=2)
    assert (engine.config.max_num_seqs, engine.kv.num_pages, engine.scheduler.max_decode_steps,
            engine.runner.decoder.max_steps) == (3, 20, 2, 2)  # one value feeds scheduler and runner
    assert engine.config.max_num_batched_tokens == 256 and engine.config.use_cuda_graphs is False  # CPU defaults
    with pytest.raises(TypeError, match=r"unknown engine option\(s\) \['max_num_seq'\]"):
        LLMEngine(model, max_num_seq=3)
    pages = LLMEngine(model, memory_gb=0.001).kv.num_pages  # a byte budget on CPU
    assert pages == int(1e6 // (model.cache_spec().kv_bytes_per_token * 16)) - 1


def test_default_graph_sizes_leave_out_batch_1_for_a_compiled_step_unless_its_batch_is_unbacked():
    """Dynamo specializes a size-1 batch, so a compiled step's batch-1 graph would be a second compile: by default a
    compiled step runs batch 1 in the batch-2 graph. With unbacked_batch and the layers scope one trace serves batch 1
    too (tests/runtime/test_compile_counts.py), and it has its own graph. Sizes given are kept, sorted."""
    from fms.serving import EngineConfig

    assert EngineConfig().graph_batch_sizes is None
    cuda = EngineConfig().for_device(True, 4096)
    assert cuda.compile_decode and cuda.graph_batch_sizes == (2, 4, 8, 16, 32, 64, 128, 256)
    assert EngineConfig(unbacked_batch=True).for_device(True, 4096).graph_batch_sizes[0] == 1
    assert EngineConfig(compile_decode=False).for_device(True, 4096).graph_batch_sizes == (
        1, 2, 4, 8, 16, 32, 64, 128, 256)
    assert EngineConfig().for_device(False, 4096).graph_batch_sizes[0] == 1
    assert EngineConfig(graph_batch_sizes=(4, 2)).for_device(True, 4096).graph_batch_sizes == (2, 4)
    whole = EngineConfig(compile_scope="model", unbacked_batch=True)  # the whole-model trace keeps a backed batch
    assert whole.for_device(True, 4096).graph_batch_sizes == (2, 4, 8, 16, 32, 64, 128, 256)
    with pytest.raises(ValueError, match="unbacked_batch must be a bool, got 1"):
        EngineConfig(unbacked_batch=1)


def test_unknown_request_ids_and_request_counts_in_stats():
    model = get_model("llama", "nano", seed=0)
    engine = LLMEngine(model, num_pages=32)
    for call in (engine.abort, engine.get_output, engine.pop_output):
        with pytest.raises(KeyError, match="unknown request id 'nope'"):
            call("nope")
    rid = engine.add_request([1, 2, 3], SamplingParams(max_new_tokens=2))
    engine.add_request([4, 5], SamplingParams(max_new_tokens=2))
    stats = engine.stats()
    assert (stats["num_waiting_requests"], stats["num_running_requests"], stats["num_finished_held_requests"]) == (2, 0, 0)
    while engine.has_unfinished_requests():
        engine.step()
    stats = engine.stats()
    assert (stats["num_waiting_requests"], stats["num_running_requests"], stats["num_finished_held_requests"]) == (0, 0, 2)
    assert stats["num_used_pages"] == 0 and stats["num_free_pages"] + stats["num_cached_pages"] == 32
    engine.pop_output(rid)
    assert engine.stats()["num_finished_held_requests"] == 1
    with pytest.raises(KeyError, match="already popped"):
        engine.get_output(rid)
