"""get_model's config overrides and the config dataclasses refuse invalid values with a message naming the
field, the value and what is allowed; every registered variant stays valid."""

import math

import pytest
import torch

from fms.models import InsufficientMemoryError, get_config, get_model, list_architectures, list_variants


@pytest.mark.parametrize("architecture", list_architectures())
def test_every_registered_variant_is_valid(architecture):
    for variant in list_variants(architecture):
        config = get_config(architecture, variant)
        assert all(0 <= t < config.vocab_size for t in config.eos_token_ids), (architecture, variant)


# (override, what the message must contain besides the field name and the value)
BAD_LLAMA = [
    (dict(rope_theta=-1.0), "> 0"),
    (dict(rope_theta=0.0), "> 0"),
    (dict(rope_theta=math.inf), "finite"),
    (dict(rms_norm_eps=-1.0), "> 0"),
    (dict(rms_norm_eps=math.nan), "finite"),
    (dict(vocab_size=512.5), "int >= 1"),
    (dict(vocab_size="512"), "int >= 1"),
    (dict(vocab_size=True), "int >= 1"),
    (dict(vocab_size=0), "int >= 1"),
    (dict(num_layers=-2), "int >= 1"),
    (dict(num_heads=2.0), "int >= 1"),
    (dict(head_dim=0), "int >= 1"),
    (dict(intermediate_size=None), "int >= 1"),
    (dict(max_position_embeddings=0), "int >= 1"),
    (dict(sliding_window=0), "int >= 1"),
    (dict(attn_logit_softcapping=-5.0), "> 0"),
    (dict(attention_multiplier=0.0), "> 0"),
    (dict(logits_scaling=0.0), "!= 0"),
    (dict(embedding_multiplier="12"), "finite number"),
    (dict(init_std=-0.1), "> 0"),
    (dict(tie_word_embeddings="yes"), "True or False"),
    (dict(eos_token_id=512), "vocab_size (512)"),
    (dict(eos_token_id=-1), "int >= 0"),
    (dict(eos_token_id=(2, 700)), "vocab_size (512)"),
    (dict(eos_token_id="x"), "int >= 0"),
    (dict(bos_token_id=1000), "vocab_size (512)"),
    (dict(pad_token_id=1.5), "int >= -1"),
]


@pytest.mark.parametrize("override, allowed", BAD_LLAMA, ids=lambda v: repr(v) if isinstance(v, dict) else "")
def test_invalid_override_is_refused_with_field_value_and_allowed(override, allowed):
    (field, value), = override.items()
    with pytest.raises(ValueError) as err:
        get_model("llama", "nano", **override)
    msg = str(err.value)
    assert field in msg and allowed in msg
    shown = value[1] if isinstance(value, tuple) else value
    assert repr(shown) in msg or str(shown) in msg


@pytest.mark.parametrize("override, message", [
    (dict(hidden_size=66, head_dim=None), "hidden_size 66 is not divisible by num_heads 4"),
    (dict(num_kv_heads=3), "num_heads 4 is not a multiple of num_kv_heads 3"),
])
def test_head_counts_that_do_not_divide(override, message):
    with pytest.raises(ValueError, match=message):
        get_model("llama", "nano", **override)


def test_token_ids_at_the_edges_are_accepted():
    config = get_model("llama", "nano", eos_token_id=(0, 511), bos_token_id=0, pad_token_id=-1).config
    assert config.eos_token_ids == (0, 511)


def test_eos_list_becomes_tuple_and_is_checked():
    assert get_model("granite", "nano", eos_token_id=[3, 4]).config.eos_token_id == (3, 4)
    with pytest.raises(ValueError, match="eos_token_id 9999"):
        get_model("granite", "nano", eos_token_id=[3, 9999])


@pytest.mark.parametrize("architecture, variant, override, message", [
    ("gpt2", "nano", dict(layer_norm_eps=0.0), "GPT2Config.layer_norm_eps must be a finite number > 0, got 0.0"),
    ("gpt2", "nano", dict(num_kv_heads=2), "num_kv_heads 2 must equal num_heads 4"),
    ("granite", "nano", dict(rope_theta=-1e7), "LlamaConfig.rope_theta must be a finite number > 0, got -10000000.0"),
    ("granite_hybrid", "h-nano", dict(num_experts=-1), "GraniteHybridConfig.num_experts must be an int >= 0, got -1"),
    ("granite_hybrid", "h-nano", dict(mamba_head_dim=1.5), "mamba_head_dim must be an int >= 0, got 1.5"),
    ("granite_hybrid", "nano", dict(num_experts=4, num_experts_per_token=2, expert_intermediate_size=0),
     "expert_intermediate_size must be an int >= 1, got 0"),
])
def test_invalid_override_of_other_families(architecture, variant, override, message):
    with pytest.raises(ValueError) as err:
        get_model(architecture, variant, **override)
    assert message in str(err.value)


def test_unknown_override_is_named():
    with pytest.raises(ValueError, match=r"unknown config fields \['rope_thetta'\]"):
        get_model("llama", "nano", rope_thetta=1.0)


def test_seed_must_be_an_int():
    with pytest.raises(ValueError, match="seed must be an int, got 'abc'"):
        get_model("llama", "nano", seed="abc")


# ---------------------------------------------------------------------------------------------
# model size against available memory
# ---------------------------------------------------------------------------------------------
def _nano_bytes(bytes_per_value: int) -> int:
    """llama nano by hand: V=512, H=64, 2 layers, 4 heads of 16, 2 KV heads, I=128, untied head."""
    v, h, hd, layers, inter = 512, 64, 16, 2, 128
    per_layer = (4 * hd + 2 * 2 * hd) * h + h * 4 * hd + 3 * inter * h + 2 * h
    values = layers * per_layer + 2 * v * h + h + hd // 2  # + final norm + rotary inv_freq (fp32 buffer)
    return values * bytes_per_value


def test_model_larger_than_available_memory_names_both_sizes(monkeypatch):
    import fms.models as models

    needed = _nano_bytes(4)
    monkeypatch.setattr(models, "available_memory", lambda device: (needed - 1, "a test's limit"))
    with pytest.raises(InsufficientMemoryError) as err:
        get_model("llama", "nano")
    msg = str(err.value)
    assert f"({needed} bytes)" in msg and f"({needed - 1} bytes)" in msg and "a test's limit" in msg
    monkeypatch.setattr(models, "available_memory", lambda device: (needed, "a test's limit"))
    get_model("llama", "nano")  # exactly enough


def test_terabyte_variant_fails_fast_before_allocating(monkeypatch):
    monkeypatch.setattr(torch.nn.Module, "to_empty",
                        lambda self, **kw: pytest.fail("weights were allocated before the memory check"))
    with pytest.raises(InsufficientMemoryError, match=r"needs [\d.]+ TiB .* is available"):
        get_model("llama", "nano", vocab_size=2**20, hidden_size=2**16, num_heads=512, num_kv_heads=512,
                  head_dim=None, intermediate_size=2**18, num_layers=64)


def test_init_on_device_draws_with_the_models_device_generator():
    """On the CPU the device generator is the CPU one: the same weights as the default; a different seed
    differs; a non-bool is refused by name. (On CUDA it draws there: checked by the GPU benchmarks.)"""
    import torch

    from fms.models import get_model

    plain = get_model("llama", "nano", seed=3)
    on_device = get_model("llama", "nano", seed=3, init_on_device=True)
    other = get_model("llama", "nano", seed=4, init_on_device=True)
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), on_device.parameters()))
    assert not torch.equal(on_device.embedding.weight, other.embedding.weight)
    with pytest.raises(ValueError, match="init_on_device must be a bool, got 'yes'"):
        get_model("llama", "nano", init_on_device="yes")


def test_init_on_device_builds_mamba_layers_with_a_cuda_generator():
    """The Mamba layers' seeded init drew its temporaries on the CPU while get_model(init_on_device=True) hands it a
    CUDA generator (the H200 run of `benchmark_serving.py --architecture granite_hybrid` failed on it in session 11)."""
    import torch

    from fms.models import get_model

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA: on the CPU the device generator is the CPU one (the test above)")
    a = get_model("granite_hybrid", "h-nano", device_type="cuda", seed=0, init_on_device=True)
    b = get_model("granite_hybrid", "h-nano", device_type="cuda", seed=1, init_on_device=True)
    mamba = [m for m in a.modules() if hasattr(m, "reset_parameters_seeded") and hasattr(m, "mamba")]
    assert mamba and all(torch.isfinite(m.mamba.A_log).all() and m.mamba.A_log.is_cuda for m in mamba)
    assert not all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
