"""GPT-2: shapes and configs, variants across attention ops, and equivalence with HF transformers."""

import json

import pytest
import torch

from fms.models import get_model, list_variants
from fms.models.gpt2 import GPT2, NO_TABLE_MAX_POSITIONS, GPT2Config, gpt2_config_from_hf
from fms.utils.generation import generate

# fp32 logits against HF: same math, different op order (fused c_attn vs split q/k/v, SDPA kernels).
FP32_ATOL = 2e-5
FP32_RTOL = 2e-5


# ---------------------------------------------------------------------------- configs and shapes


@pytest.mark.parametrize("variant,num_params", [("gpt2", 124_439_808), ("gpt2-medium", 354_823_168)])
def test_parameter_counts_match_the_spec(variant, num_params):
    from fms.models import get_config

    with torch.device("meta"):
        model = GPT2(get_config("gpt2", variant))
    assert sum(p.numel() for p in model.parameters()) == num_params  # tied head counted once
    assert model.head.weight is model.embedding.weight


def test_registered_variants():
    assert {"gpt2", "gpt2-medium", "nano", "nano-alibi", "nano-window", "nano-softcap"} <= set(list_variants("gpt2"))


def test_alibi_and_nope_drop_the_position_table_and_lift_the_limit():
    learned = GPT2Config()
    assert learned.has_learned_positions and learned.max_position_embeddings == 1024
    alibi = GPT2Config(alibi=True)
    assert not alibi.has_learned_positions and alibi.position_embedding_type == "nope"
    assert alibi.max_position_embeddings == NO_TABLE_MAX_POSITIONS
    nope = learned.updated(position_embedding_type="nope", sliding_window=256)
    assert nope.max_position_embeddings == NO_TABLE_MAX_POSITIONS
    assert get_model("gpt2", "nano-alibi").pos_embedding is None
    assert get_model("gpt2", "nano-window").config.attention_variant.sliding_window == 32
    with pytest.raises(ValueError, match="position_embedding_type must be one of"):
        GPT2Config(position_embedding_type="rope")
    with pytest.raises(ValueError, match="num_kv_heads"):
        GPT2Config(num_kv_heads=4)


def test_learned_positions_limit_the_context_and_alibi_runs_past_it():
    ids = torch.randint(0, 512, (1, 1030))
    with pytest.raises(ValueError, match="1030 tokens exceed GPT-2's 1024 learned positions"):
        get_model("gpt2", "nano")(ids)
    logits = get_model("gpt2", "nano-alibi")(ids)
    assert logits.shape == (1, 1030, 512) and torch.isfinite(logits).all()


def test_hf_config_conversion():
    hf = {"model_type": "gpt2", "vocab_size": 50257, "n_embd": 1024, "n_layer": 24, "n_head": 16, "n_inner": None,
          "n_positions": 1024, "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new",
          "bos_token_id": 50256, "eos_token_id": 50256}
    config = gpt2_config_from_hf(hf)
    assert (config.hidden_size, config.num_layers, config.num_heads, config.num_kv_heads) == (1024, 24, 16, 16)
    assert config.intermediate_size == 4096 and config.head_dim == 64 and config.max_position_embeddings == 1024
    assert config.tie_word_embeddings and config.eos_token_id == 50256 and config.attention_variant.is_causal_only
    with pytest.raises(ValueError, match="activation_function 'relu'"):
        gpt2_config_from_hf(dict(hf, activation_function="relu"))


# ---------------------------------------------------------------------------- variants across ops


PROMPTS = [list(range(3, 48)), [7, 8, 9, 10, 11]]  # 45 tokens (+6): nano-window (W=32) frees a page


@pytest.mark.paged
@pytest.mark.parametrize("variant", ["nano-alibi", "nano-window"])
def test_greedy_paged_equals_sdpa(variant):
    # Chunked prefill (16-token chunks = one page) then decode; the window variant releases pages.
    # nano's init_std 0.1 greedily repeats one token on these prompts; 0.3 (seed 3) varies them.
    model = get_model("gpt2", variant, seed=3, init_std=0.3)
    expected = generate(model, PROMPTS, 6, attn_name="sdpa")
    assert all(len(set(seq)) >= 4 for seq in expected), expected
    assert generate(model, PROMPTS, 6, attn_name="paged", page_size=16, prefill_chunk_size=16) == expected


@pytest.mark.paged
def test_softcap_runs_on_flex_and_paged_and_sdpa_says_so():
    model = get_model("gpt2", "nano-softcap", seed=1)
    expected = generate(model, PROMPTS, 4, attn_name="flex")
    assert generate(model, PROMPTS, 4, attn_name="paged", page_size=16) == expected
    with pytest.raises(ValueError, match="attn_name='flex' or 'paged'"):
        generate(model, PROMPTS, 4, attn_name="sdpa")


# ---------------------------------------------------------------------------- HF transformers


@pytest.fixture(scope="module")
def hf_gpt2(tmp_path_factory):
    """A tiny random GPT2LMHeadModel (fp32) saved twice: as save_pretrained writes it (names under
    `transformer.`) and with bare names plus the attn.bias / attn.masked_bias buffers, like the
    original openai-community/gpt2 files."""
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file, save_file

    config = transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                                     initializer_range=0.1, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # HF initialises biases to 0 and LayerNorms to 1: randomise so their mapping counts
        for name, param in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                param.add_(0.1 * torch.randn_like(param))
    prefixed = tmp_path_factory.mktemp("gpt2_prefixed")
    model.save_pretrained(prefixed)
    tensors = load_file(prefixed / "model.safetensors")
    assert any(name.startswith("transformer.") for name in tensors)
    bare = tmp_path_factory.mktemp("gpt2_bare")
    renamed = {name.removeprefix("transformer."): t.contiguous() for name, t in tensors.items()}
    renamed.pop("lm_head.weight", None)
    for i in range(config.n_layer):
        renamed[f"h.{i}.attn.bias"] = torch.tril(torch.ones(128, 128))[None, None]
        renamed[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(renamed, bare / "model.safetensors")
    (bare / "config.json").write_text(json.dumps(json.loads((prefixed / "config.json").read_text())))
    return model, {"transformer_prefix": prefixed, "no_prefix": bare}


@pytest.mark.hf
@pytest.mark.parametrize("layout", ["transformer_prefix", "no_prefix"])
def test_logits_match_hf(hf_gpt2, layout):
    hf_model, paths = hf_gpt2
    ours = get_model("hf_pretrained", model_path=str(paths[layout]))
    assert isinstance(ours, GPT2) and ours.config.max_position_embeddings == 128
    ids = torch.randint(0, 96, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf_model(ids).logits
    torch.testing.assert_close(ours(ids), expected, atol=FP32_ATOL, rtol=FP32_RTOL)


@pytest.mark.hf
@pytest.mark.paged
def test_greedy_generation_matches_hf(hf_gpt2):
    hf_model, paths = hf_gpt2
    ours = get_model("hf_pretrained", model_path=str(paths["no_prefix"]))
    prompts = [[5, 17, 33, 2, 90, 41, 8, 8, 63, 12, 7, 1, 50, 29, 3, 77, 11], [40, 3, 9]]
    expected = []
    for prompt in prompts:
        with torch.no_grad():
            out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                                    pad_token_id=0, eos_token_id=None)
        expected.append(out[0, len(prompt):].tolist())
    assert generate(ours, prompts, 8, attn_name="sdpa") == expected
    assert generate(ours, prompts, 8, attn_name="paged", page_size=16) == expected
