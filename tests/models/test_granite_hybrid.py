"""Granite-4.0-H hybrids (Mamba2 + attention layers, HF `granitemoehybrid`) end to end on tiny fp32 models.

HF part (marked `hf`): a seeded tiny `GraniteMoeHybridForCausalLM` per layer pattern is saved with
save_pretrained, loaded with get_model("hf_pretrained", ...), and compared with HF on logits (one
unpadded sequence longer than two Mamba chunks; the same sequence fed through our caches in uneven
pieces; a right-padded batch in one cached prefill) and on greedy generation (our batch of unequal
prompts vs HF one prompt at a time, so HF's padding semantics never enter).

Without HF: paged equals sdpa token for token, a hand-driven cache gives every KV page and every Mamba
state slot back, a reused state slot starts from zero, and the registered variants build and generate.

Tolerance, fp32: atol 1e-4, rtol 1e-4 on logits of O(1) (the chunked scan and HF's differ in summation
order only; observed differences are ~1e-6).
"""

import pytest
import torch

from fms.models import get_config, get_model
from fms.models.granite_hybrid import GraniteHybrid, granite_hybrid_config_from_hf
from fms.modules.attention import get_attention_op
from fms.utils.generation import generate
from tests.hf_helpers import hf_greedy, hf_logits

ATOL = RTOL = 1e-4
VOCAB = 300
CHUNK = 8  # mamba_chunk_size: test lengths span several chunks and end mid-chunk
MAX_NEW_TOKENS = 6
# unequal; one single-token prompt; 19 and 26 cross a chunk and a 16-token page boundary
PROMPT_LENGTHS = (5, 19, 1, 26)
PAGE_SIZE = 16

_BASE = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0,
             embedding_multiplier=3.0, residual_multiplier=0.5, logits_scaling=2.5,
             # 0.1, not 1/sqrt(head_dim) = 0.25: a wrong attention scale shows
             attention_multiplier=0.1, initializer_range=0.2, tie_word_embeddings=True,
             shared_intermediate_size=96, intermediate_size=32,
             # mamba_expand * hidden_size must equal n_heads * d_head in HF's config: 1 * 64 = 4 * 16
             mamba_n_heads=4, mamba_d_head=16, mamba_expand=1, mamba_d_state=16, mamba_n_groups=1,
             mamba_d_conv=4, mamba_chunk_size=CHUNK)
_DENSE = dict(num_local_experts=0, num_experts_per_tok=0)
_MOE = dict(num_local_experts=4, num_experts_per_tok=2)

# layer pattern (fms spelling), HF config overrides
CASES = {
    "mam_nope_dense": (("mamba", "attention", "mamba"), dict(_DENSE, position_embedding_type="nope")),
    "amma_rope_moe": (("attention", "mamba", "mamba", "attention"), dict(_MOE, position_embedding_type="rope")),
    # two B/C groups: heads 0-1 read group 0, heads 2-3 group 1; the gated norm runs per group
    "mamm_nope_moe_2groups": (("mamba", "attention", "mamba", "mamba"),
                              dict(_MOE, position_embedding_type="nope", mamba_n_groups=2)),
}

hf_test = pytest.mark.hf


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These models are tiny: on a shared CPU, intra-op threads only contend (10x slower), so run on one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _prompts(lengths=PROMPT_LENGTHS, vocab=VOCAB, seed=123):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


# ---------------------------------------------------------------------------------------------
# HF reference models
# ---------------------------------------------------------------------------------------------
def _hf_layer_spelling(transformers) -> dict[str, str]:
    """fms layer kind -> the installed transformers' spelling ("mamba"/"attention" in v4,
    "linear_attention"/"full_attention" in v5); HF builds a Mamba layer only for its own spelling."""
    default = transformers.GraniteMoeHybridConfig(num_hidden_layers=1, layer_types=None)
    mamba = default.layers_block_type[0]
    return {"mamba": mamba, "attention": "full_attention" if mamba == "linear_attention" else "attention"}


class HFCase:
    def __init__(self, name, hf_model, path):
        self.name, self.hf, self.path = name, hf_model, path
        self._fms = {}
        self._greedy = None

    def fms(self, attn_name="sdpa"):
        if attn_name not in self._fms:
            self._fms[attn_name] = get_model("hf_pretrained", model_path=str(self.path), attn_name=attn_name)
        return self._fms[attn_name]

    def hf_greedy(self) -> list[list[int]]:
        if self._greedy is None:
            self._greedy = [hf_greedy(self.hf, p, MAX_NEW_TOKENS) for p in _prompts()]
        return self._greedy


@torch.no_grad()
def _randomise_hf(hf):
    """Move every parameter HF initialises to a constant (norms, dt_bias, A_log, D) to random per-channel
    values, so a swapped head, group or norm slot changes the output."""
    g = torch.Generator().manual_seed(1)
    for name, p in hf.named_parameters():
        if name.endswith("norm.weight") or "layernorm" in name:  # also the Mamba gated norm
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
        elif name.endswith("mamba.A_log"):
            p.copy_(torch.empty(p.shape).uniform_(1.0, 8.0, generator=g).log())
        elif name.endswith("mamba.dt_bias"):
            p.copy_(torch.empty(p.shape).uniform_(-3.0, 1.0, generator=g))
        elif name.endswith("mamba.D"):
            p.copy_(torch.empty(p.shape).uniform_(0.5, 1.5, generator=g))
        elif name.endswith("conv1d.bias"):
            p.copy_(0.1 * torch.randn(p.shape, generator=g))


def _build_hf(name, root) -> HFCase:
    transformers = pytest.importorskip("transformers")
    kinds, overrides = CASES[name]
    spelling = _hf_layer_spelling(transformers)
    config = transformers.GraniteMoeHybridConfig(
        **{**_BASE, **overrides}, num_hidden_layers=len(kinds), layer_types=[spelling[k] for k in kinds]
    )
    torch.manual_seed(0)
    hf = transformers.GraniteMoeHybridForCausalLM(config).eval()
    _randomise_hf(hf)
    hf.generation_config.eos_token_id = None  # never stop early: compare all MAX_NEW_TOKENS
    hf.save_pretrained(root, safe_serialization=True)
    return HFCase(name, hf, root)


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory) -> HFCase:
    return _build_hf(request.param, tmp_path_factory.mktemp(request.param))




def _cache_options(attn_name):
    return {"page_size": PAGE_SIZE} if attn_name == "paged" else {}


@torch.no_grad()
def _step(model, cache, op, seq_ids, chunks, **kw):
    """One driver step: rows right-padded to the longest chunk -> logits (B, T, V) or (B, 1, V)."""
    meta = cache.prepare(seq_ids, [len(c) for c in chunks])
    tokens = torch.tensor([c + [0] * (meta.query_len - len(c)) for c in chunks])
    return model(tokens, attn_name=op.name, cache=cache, meta=meta, **kw)


# ---------------------------------------------------------------------------------------------
# HF equivalence
# ---------------------------------------------------------------------------------------------
@hf_test
def test_config_read_from_hf(case):
    kinds, overrides = CASES[case.name]
    c = case.fms().config
    assert c.layer_types == kinds
    assert c.position_embedding_type == overrides["position_embedding_type"]
    assert (c.num_experts, c.num_experts_per_token) == (overrides["num_local_experts"],
                                                        overrides["num_experts_per_tok"])
    assert (c.mamba_num_heads, c.mamba_head_dim, c.mamba_state_size, c.mamba_chunk_size) == (4, 16, 16, CHUNK)
    assert c.mamba_num_groups == overrides.get("mamba_n_groups", 1)
    assert c.attention_multiplier == 0.1 and c.intermediate_size == 96
    assert (case.fms().rotary is None) == (c.position_embedding_type == "nope")


@hf_test
def test_logits_match_hf_beyond_two_chunks(case):
    ids = _prompts([3 * CHUNK + 5], seed=7)[0]  # 29 tokens: three full chunks and a partial one
    with torch.no_grad():
        ours = case.fms()(torch.tensor([ids]))[0]
    theirs = hf_logits(case.hf, ids)
    assert ours.shape == theirs.shape == (len(ids), VOCAB)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=RTOL)


@hf_test
@pytest.mark.parametrize("attn_name", ["sdpa", "paged"])
def test_cached_pieces_match_hf(case, attn_name):
    """One sequence fed in uneven pieces (mid-chunk, then single-token steps): the conv and SSM states
    carried between steps give HF's full-sequence logits."""
    ids = _prompts([3 * CHUNK + 5], seed=7)[0]
    pieces = [11, 1, 9, 1, 1, 6]
    assert sum(pieces) == len(ids)
    model, op = case.fms(attn_name), get_attention_op(attn_name)
    cache = op.create_cache(model.cache_spec(), max_batch_size=1, max_seq_len=len(ids), **_cache_options(attn_name))
    cache.add(0)
    ours, start = [], 0
    for n in pieces:
        ours.append(_step(model, cache, op, [0], [ids[start: start + n]])[0])
        start += n
    cache.free(0)
    torch.testing.assert_close(torch.cat(ours), hf_logits(case.hf, ids), atol=ATOL, rtol=RTOL)


@hf_test
@pytest.mark.parametrize("attn_name", ["sdpa", "paged"])
def test_padded_batch_prefill_matches_hf(case, attn_name):
    """Right padding in a batched prefill must not reach the real tokens or the Mamba state."""
    prompts = _prompts()
    model, op = case.fms(attn_name), get_attention_op(attn_name)
    cache = op.create_cache(model.cache_spec(), max_batch_size=len(prompts), max_seq_len=max(map(len, prompts)),
                            **_cache_options(attn_name))
    for s in range(len(prompts)):
        cache.add(s)
    logits = _step(model, cache, op, list(range(len(prompts))), prompts)
    for i, p in enumerate(prompts):
        torch.testing.assert_close(logits[i, : len(p)], hf_logits(case.hf, p), atol=ATOL, rtol=RTOL)


@hf_test
@pytest.mark.parametrize("attn_name", ["sdpa", "paged"])
def test_greedy_generate_matches_hf(case, attn_name):
    ours = generate(case.fms(attn_name), _prompts(), MAX_NEW_TOKENS, attn_name=attn_name,
                    **_cache_options(attn_name))
    theirs = case.hf_greedy()
    assert all(len(t) == MAX_NEW_TOKENS for t in theirs)
    assert ours == theirs


@hf_test
def test_greedy_sequences_are_not_degenerate(case):
    """Guards the tests' power: outputs that repeat one token would hide state and cache bugs."""
    assert len({t for seq in case.hf_greedy() for t in seq}) >= 5


# ---------------------------------------------------------------------------------------------
# paged == sdpa, and the cache's pools drain (no transformers needed)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def h_nano():
    # h-nano's random weights with embedding_multiplier 12 greedily repeat one token per prompt, which
    # would hide state bugs; these two overrides give varied continuations
    model = get_model("granite_hybrid", "h-nano", seed=5, embedding_multiplier=1.0, init_std=0.3)
    assert {"mamba", "attention"} <= set(model.config.layer_types)
    return model


@pytest.mark.paged
@pytest.mark.parametrize("prefill_chunk_size", [None, 5])
def test_paged_equals_sdpa_on_hybrid(h_nano, prefill_chunk_size):
    # chunk_size 16 in h-nano; 5-token prefill chunks end mid-Mamba-chunk and mid-page
    prompts = _prompts([1, 15, 17, 40], vocab=h_nano.config.vocab_size, seed=3)
    expected = generate(h_nano, prompts, 12, attn_name="sdpa")
    got = generate(h_nano, prompts, 12, attn_name="paged", page_size=PAGE_SIZE, prefill_chunk_size=prefill_chunk_size)
    assert got == expected
    assert generate(h_nano, prompts, 12, attn_name="sdpa", prefill_chunk_size=prefill_chunk_size) == expected
    assert len({t for seq in expected for t in seq}) >= 5


def _drive_greedy(model, cache, op, prompts, budgets, seq_ids):
    """Greedy by hand: one prefill step, then decode; sequence i stops after budgets[i] tokens and is
    freed at once, so later steps run with fewer rows."""
    kv = cache.manager
    live_before = kv.num_seqs
    for s in seq_ids:
        cache.add(s)
    assert kv.num_seqs == live_before + len(seq_ids)
    assert sorted(kv.slot_of(s) for s in seq_ids) == list(range(len(seq_ids)))  # one state slot each
    in_use = kv.num_seqs * model.cache_spec().state_spec.bytes_per_sequence
    assert cache.memory_stats().state_bytes == in_use > 0

    last = torch.tensor([len(p) - 1 for p in prompts])
    logits = _step(model, cache, op, seq_ids, prompts, logits_positions=last)
    out = {s: [t] for s, t in zip(seq_ids, logits[:, 0].argmax(-1).tolist())}
    budget = dict(zip(seq_ids, budgets))
    active = list(seq_ids)
    while True:
        for s in [s for s in active if len(out[s]) == budget[s]]:
            cache.free(s)
            active.remove(s)
        if not active:
            break
        logits = _step(model, cache, op, active, [[out[s][-1]] for s in active])
        for s, t in zip(active, logits[:, 0].argmax(-1).tolist()):
            out[s].append(t)
    return [out[s] for s in seq_ids]


@pytest.mark.paged
@pytest.mark.parametrize("attn_name", ["paged", "sdpa"])
def test_driver_returns_every_page_and_state_slot(h_nano, attn_name):
    prompts = _prompts([7, 33, 1, 18], vocab=h_nano.config.vocab_size, seed=11)
    budgets = [8, 3, 6, 1]
    expected = generate(h_nano, prompts, max(budgets), attn_name="sdpa")
    op = get_attention_op(attn_name)
    cache = op.create_cache(h_nano.cache_spec(), max_batch_size=len(prompts),
                            max_seq_len=max(map(len, prompts)) + max(budgets), **_cache_options(attn_name))
    pool = cache.state_pool
    assert pool is not None and pool.num_slots == len(prompts)

    got = _drive_greedy(h_nano, cache, op, prompts, budgets, seq_ids=list(range(len(prompts))))
    assert got == [e[:n] for e, n in zip(expected, budgets)]

    assert cache.manager.num_seqs == 0
    cache.manager.check_invariants()
    stats = cache.memory_stats().as_dict()
    assert stats["state_bytes"] == 0
    if attn_name == "paged":
        assert cache.manager.allocator.num_free == cache.num_pages
        assert stats["pages_in_use"] == 0 and stats["kv_bytes_in_use"] == 0

    # a second round reuses the slots, which held the first round's (nonzero) state: it must start from zero
    assert sum(s.abs().sum() for s in pool.ssm) > 0
    again = _drive_greedy(h_nano, cache, op, prompts[::-1], budgets[::-1], seq_ids=["a", "b", "c", "d"])
    assert again == [e[:n] for e, n in zip(expected[::-1], budgets[::-1])]
    assert cache.manager.num_seqs == 0 and cache.memory_stats().state_bytes == 0
    if attn_name == "paged":
        assert cache.manager.allocator.num_free == cache.num_pages


def test_generate_reports_state_bytes(h_nano):
    """generate's own cache: the peak stats count the Mamba state of every running sequence."""
    prompts = _prompts([4, 9], vocab=h_nano.config.vocab_size, seed=2)
    _, stats = generate(h_nano, prompts, 3, attn_name="paged", page_size=PAGE_SIZE, return_stats=True)
    assert stats["state_bytes"] == len(prompts) * h_nano.cache_spec().state_spec.bytes_per_sequence


@pytest.mark.paged
@pytest.mark.parametrize("attn_name", ["paged", "flex"])
def test_all_mamba_hybrid_generates_with_every_cache(attn_name):
    """No attention layer at all: no KV pages are stored, the paged cache still tracks lengths, and
    a memory budget does not size the pool by 0 bytes per token."""
    model = get_model("granite_hybrid", "h-nano", seed=5, embedding_multiplier=1.0, init_std=0.3,
                      layer_types=("mamba",) * 4)
    spec = model.cache_spec()
    assert spec.attention_layers == () and spec.kv_bytes_per_token == 0
    prompts = _prompts([1, 15, 17, 40], vocab=model.config.vocab_size, seed=3)
    expected = generate(model, prompts, 8, attn_name="sdpa")
    assert len({t for seq in expected for t in seq}) >= 5
    options = _cache_options(attn_name)
    assert generate(model, prompts, 8, attn_name=attn_name, **options) == expected
    assert generate(model, prompts, 8, attn_name=attn_name, prefill_chunk_size=5, **options) == expected
    if attn_name == "paged":
        cache = get_attention_op("paged").create_cache(spec, max_batch_size=4, max_seq_len=48, memory_gb=0.001)
        assert cache.num_pages == 4 * 3 and cache.keys == []


# ---------------------------------------------------------------------------------------------
# registered variants and config parsing
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["h-nano", "h-micro-test"])
def test_random_variants_build_and_generate(variant):
    model = get_model("granite_hybrid", variant, seed=0)
    c = model.config
    assert {"mamba", "attention"} <= set(c.layer_types)
    assert model.cache_spec().attention_layers == tuple(i for i, t in enumerate(c.layer_types) if t == "attention")
    assert model.cache_spec().state_spec.layers == tuple(i for i, t in enumerate(c.layer_types) if t == "mamba")
    prompts = _prompts([3, 10], vocab=c.vocab_size, seed=4)
    out = generate(model, prompts, 5)
    assert [len(o) for o in out] == [5, 5]
    assert all(0 <= t < c.vocab_size for o in out for t in o)
    # the variants' own random weights greedily repeat one token, which no cache bug could change:
    # compare paged with the default op on weights whose continuations vary
    varied = get_model("granite_hybrid", variant, seed=5, embedding_multiplier=1.0, init_std=0.3)
    expected = generate(varied, prompts, 8)
    assert all(len(set(o)) >= 4 for o in expected), expected
    assert generate(varied, prompts, 8, attn_name="paged", page_size=PAGE_SIZE) == expected


def test_h_tiny_config_has_moe_fields():
    c = get_config("granite_hybrid", "4.0-h-tiny")
    assert (c.num_experts, c.num_experts_per_token, c.expert_intermediate_size) == (64, 6, 512)
    assert c.intermediate_size == 1024  # shared MLP
    assert [i for i, t in enumerate(c.layer_types) if t == "attention"] == [5, 15, 25, 35]
    assert c.position_embedding_type == "nope" and c.num_layers == 40
    with torch.device("meta"):  # shapes only; no 7B-parameter allocation
        model = GraniteHybrid(c)
    assert model.rotary is None
    ff = model.layers[0].ff
    assert tuple(ff.moe.w13.shape) == (64, 2 * 512, 1536) and tuple(ff.moe.w2.shape) == (64, 1536, 512)
    assert tuple(ff.moe.router.weight.shape) == (64, 1536)
    assert tuple(ff.shared.wg1_fused.weight.shape) == (2 * 1024, 1536)


@pytest.mark.parametrize("mamba_name,attention_name", [("mamba", "attention"),
                                                      ("linear_attention", "full_attention")])
@pytest.mark.parametrize("key", ["layer_types", "layers_block_type"])
def test_hf_layer_type_spellings(mamba_name, attention_name, key):
    hf = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              shared_intermediate_size=96, intermediate_size=32, num_local_experts=0, mamba_n_heads=4,
              mamba_d_head="auto", mamba_expand=1, position_embedding_type="nope",
              time_step_limit=[0.0, {"__float__": "Infinity"}],
              **{key: [mamba_name, attention_name, mamba_name]})
    c = granite_hybrid_config_from_hf(hf)
    assert c.layer_types == ("mamba", "attention", "mamba")
    assert c.mamba_head_dim == 16 and c.num_experts == 0


# ---------------------------------------------------------------------------- mixture of experts
def _moe_model(seed=4):
    return get_model("granite_hybrid", "h-nano", seed=seed, num_experts=4, num_experts_per_token=2,
                     expert_intermediate_size=32, init_std=0.3, embedding_multiplier=1.0)


def test_moe_dense_small_batch_path_equals_routed_path(monkeypatch):
    """Up to DENSE_MAX_TOKENS the MoE runs every expert and zeroes the unchosen (no host sync); above,
    it gathers each expert's tokens. Both give the same output."""
    from fms.models.granite_hybrid import MoE

    moe = MoE(dim=16, hidden_dim=8, num_experts=5, top_k=2)
    moe.reset_parameters_seeded(torch.Generator().manual_seed(0))
    with torch.no_grad():
        moe.router.weight.normal_(0, 1.0)
    x = torch.randn(3, 13, 16)
    with torch.no_grad():
        dense = moe(x)
        monkeypatch.setattr(MoE, "DENSE_MAX_TOKENS", 0)
        routed = moe(x)
    torch.testing.assert_close(dense, routed, atol=1e-5, rtol=1e-5)
    assert dense.abs().max() > 0


def test_moe_hybrid_decode_step_has_no_graph_break():
    """The routed MoE's .tolist() broke the compiled decode step (and CUDA-graph capture); the dense
    small-batch path keeps the whole MoE hybrid step one graph."""
    torch._dynamo.reset()
    model = _moe_model()
    assert any(hasattr(layer.ff, "moe") for layer in model.layers)
    cache = get_attention_op("paged").create_cache(model.cache_spec(), max_batch_size=2, max_seq_len=32)
    for seq_id, n in ((0, 4), (1, 9)):
        cache.add(seq_id)
    with torch.no_grad():
        model(torch.randint(1, 100, (2, 9)), attn_name="paged", cache=cache, meta=cache.prepare([0, 1], [4, 9]))
        meta = cache.prepare([0, 1], [1, 1])
        explained = torch._dynamo.explain(model)(torch.tensor([[3], [7]]), attn_name="paged", cache=cache, meta=meta)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]


def test_moe_hybrid_windows_equal_per_token_decode():
    model = _moe_model()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 500, (n,), generator=g).tolist() for n in (3, 17, 8)]
    reference = generate(model, prompts, 9, attn_name="paged", page_size=16)
    assert len({t for row in reference for t in row}) > 4
    assert generate(model, prompts, 9, attn_name="paged", page_size=16, decode_window=4) == reference
