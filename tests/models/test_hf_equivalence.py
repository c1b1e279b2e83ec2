"""fms models loaded from HF checkpoints compute what HF transformers computes (tiny random fp32 models).

For each architecture: a seeded tiny HF model is saved as one safetensors file and as a sharded
checkpoint (model.safetensors.index.json), loaded with get_model("hf_pretrained", ...), and compared:
full-sequence logits, cached prefill logits of unequal prompts (sdpa and paged), and greedy generation
against HF `generate` run one prompt at a time (no padding, so HF's padding semantics never enter).

Tolerance, fp32: atol 1e-4, rtol 1e-4 on logits (observed differences are ~1e-6 with logits of O(1)).
"""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fms.models import get_model  # noqa: E402
from fms.modules.attention import get_attention_op  # noqa: E402
from fms.utils.generation import generate  # noqa: E402
from tests.hf_helpers import hf_greedy, hf_logits

pytestmark = pytest.mark.hf

ATOL = RTOL = 1e-4
VOCAB = 300
MAX_NEW_TOKENS = 6
# unequal lengths, crossing a 16-token page boundary, and one single-token prompt
PROMPT_LENGTHS = (5, 17, 1, 33)

_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1,
               eos_token_id=2, pad_token_id=0)
_GRANITE_SCALARS = dict(embedding_multiplier=3.0, attention_multiplier=0.1, residual_multiplier=0.5,
                        logits_scaling=2.5)
# HF's default init (std 0.02) gives near-uniform logits and near-tie greedy choices; these stds give
# varied greedy sequences with clear margins.
CASES = {
    "llama_gqa": ("LlamaConfig", "LlamaForCausalLM",
                  dict(_COMMON, initializer_range=0.3, tie_word_embeddings=False)),
    # original_max_position_embeddings=16 so the llama3 scaling changes positions seen by these tests
    "llama3_rope_tied": ("LlamaConfig", "LlamaForCausalLM",
                         dict(_COMMON, initializer_range=0.3, tie_word_embeddings=True,
                              rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=8.0,
                                                   low_freq_factor=1.0, high_freq_factor=4.0,
                                                   original_max_position_embeddings=16))),
    "granite": ("GraniteConfig", "GraniteForCausalLM",
                dict(_COMMON, **_GRANITE_SCALARS, initializer_range=0.4, tie_word_embeddings=True)),
    "granite4_dense": ("GraniteMoeHybridConfig", "GraniteMoeHybridForCausalLM",
                       dict(_COMMON, **_GRANITE_SCALARS, initializer_range=0.4, tie_word_embeddings=True,
                            shared_intermediate_size=128, layer_types=["attention"] * 2,
                            position_embedding_type="rope", num_local_experts=0, num_experts_per_tok=0)),
}


class HFCase:
    def __init__(self, name, hf_model, single_dir, sharded_dir):
        self.name, self.hf = name, hf_model
        self.dirs = {"single": single_dir, "sharded": sharded_dir}
        self._fms = {}
        self._greedy = None

    def fms(self, layout="single", attn_name="sdpa"):
        key = (layout, attn_name)
        if key not in self._fms:
            self._fms[key] = get_model("hf_pretrained", model_path=str(self.dirs[layout]), attn_name=attn_name)
        return self._fms[key]

    def hf_greedy(self) -> list[list[int]]:
        """HF greedy continuations of _prompts(), one prompt at a time (computed once)."""
        if self._greedy is None:
            self._greedy = [hf_greedy(self.hf, p, MAX_NEW_TOKENS) for p in _prompts()]
        return self._greedy


def _build_hf(name, root) -> HFCase:
    config_name, model_name, kwargs = CASES[name]
    config = getattr(transformers, config_name)(**kwargs)
    torch.manual_seed(0)
    hf = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():  # norm weights away from 1, so a norm loaded into the wrong slot shows
        g = torch.Generator().manual_seed(1)
        for pname, p in hf.named_parameters():
            if pname.endswith("norm.weight") or "layernorm" in pname:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
    hf.generation_config.eos_token_id = None  # never stop early: compare all MAX_NEW_TOKENS
    single, sharded = root / "single", root / "sharded"
    hf.save_pretrained(single, safe_serialization=True)
    hf.save_pretrained(sharded, safe_serialization=True, max_shard_size="50KB")
    return HFCase(name, hf, single, sharded)


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory) -> HFCase:
    return _build_hf(request.param, tmp_path_factory.mktemp(request.param))


def _prompts(lengths=PROMPT_LENGTHS, seed=123):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]




@torch.no_grad()
def _cached_prefill_logits(model, prompts, attn_name, **cache_options) -> list[torch.Tensor]:
    """One prefill step of all prompts (rows right-padded) through the op's cache -> per-prompt (T_i, V)."""
    op = get_attention_op(attn_name)
    cache = op.create_cache(model.cache_spec(), max_batch_size=len(prompts),
                            max_seq_len=max(map(len, prompts)), **cache_options)
    seq_ids = list(range(len(prompts)))
    for s in seq_ids:
        cache.add(s)
    meta = cache.prepare(seq_ids, [len(p) for p in prompts])
    width = meta.query_len
    tokens = torch.tensor([p + [0] * (width - len(p)) for p in prompts])
    logits = model(tokens, attn_name=attn_name, cache=cache, meta=meta)
    return [logits[i, : len(p)] for i, p in enumerate(prompts)]


# ---------------------------------------------------------------------------------------------
def test_checkpoint_layouts(case):
    single, sharded = case.dirs["single"], case.dirs["sharded"]
    assert (single / "model.safetensors").is_file()
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1, "the sharded save should span several files"
    tied = case.hf.config.tie_word_embeddings
    assert ("lm_head.weight" in index["weight_map"]) != tied


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_logits_match_hf(case, layout):
    model = case.fms(layout)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, VOCAB, (3, 40), generator=g)
    with torch.no_grad():
        ours = model(ids)
        theirs = case.hf(ids).logits
    assert ours.shape == theirs.shape == (3, 40, VOCAB)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("attn_name", ["sdpa", "paged"])
def test_cached_prefill_logits_match_hf(case, attn_name):
    prompts = _prompts()
    options = {"page_size": 16} if attn_name == "paged" else {}
    ours = _cached_prefill_logits(case.fms(), prompts, attn_name, **options)
    for p, logits in zip(prompts, ours):
        torch.testing.assert_close(logits, hf_logits(case.hf, p), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("attn_name", ["sdpa", "paged"])
def test_greedy_generate_matches_hf(case, attn_name):
    prompts = _prompts()
    options = {"page_size": 16} if attn_name == "paged" else {}
    ours = generate(case.fms(attn_name=attn_name), prompts, MAX_NEW_TOKENS, attn_name=attn_name, **options)
    theirs = case.hf_greedy()
    assert all(len(t) == MAX_NEW_TOKENS for t in theirs)
    assert ours == theirs


def test_greedy_sequences_are_not_degenerate(case):
    """Guards the test's power: outputs that just repeat one token would hide cache/position bugs."""
    theirs = case.hf_greedy()
    assert len({t for seq in theirs for t in seq}) >= 5


def test_llama3_scaling_is_exercised(tmp_path):
    """Without the llama3 rope scaling the logits differ from HF, so the equivalence above is meaningful."""
    case = _build_hf("llama3_rope_tied", tmp_path)
    assert case.fms().config.rope_scaling is not None
    unscaled = get_model("hf_pretrained", model_path=str(case.dirs["single"]), rope_scaling=None)
    ids = torch.arange(3, 43)[None]
    with torch.no_grad():
        theirs = case.hf(ids).logits
        assert (unscaled(ids) - theirs).abs().max() > 1e-2
        torch.testing.assert_close(case.fms()(ids), theirs, atol=ATOL, rtol=RTOL)
