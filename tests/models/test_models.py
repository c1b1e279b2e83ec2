"""Registered variants: configs build, real-size shapes have the parameter counts of specs/models.md [calc]
(built on the meta device, so nothing is allocated), and llama3 RoPE scaling matches transformers."""

import pytest
import torch

import fms.models as registry
from fms.models import get_config, list_architectures, list_variants
from fms.models.granite_hybrid import granite_hybrid_config_from_hf
from fms.modules.positions import RopeScaling, rope_inv_freq

ALL_VARIANTS = [(arch, variant) for arch in list_architectures() for variant in list_variants(arch)]

# specs/models.md, "params [calc]"; unique parameters (a tied head counts once)
PARAM_COUNTS = {
    ("llama", "2-7b"): 6_738_415_616,
    ("llama", "3-8b"): 8_030_261_248,
    ("llama", "3.1-8b"): 8_030_261_248,
    ("llama", "3.2-1b"): 1_235_814_400,
    ("llama", "3.2-3b"): 3_212_749_824,
    ("granite", "3.3-2b"): 2_533_539_840,
    ("granite", "3.3-8b"): 8_170_864_640,
    ("granite_hybrid", "4.0-350m"): 352_379_904,
    ("granite_hybrid", "4.0-1b"): 1_631_750_144,
    ("granite_hybrid", "4.0-micro"): 3_402_836_480,
    ("granite_hybrid", "4.0-h-350m"): 340_332_224,
    ("granite_hybrid", "4.0-h-1b"): 1_461_538_368,
    ("granite_hybrid", "4.0-h-micro"): 3_191_396_096,
    ("granite_hybrid", "4.0-h-tiny"): 6_939_037_248,
}


def build_on_meta(arch: str, variant: str) -> torch.nn.Module:
    config = get_config(arch, variant)
    try:
        with torch.device("meta"):
            return registry._architecture(arch).model_class(config)
    except ImportError as e:  # the Mamba layer of the -H hybrids may not be written yet
        if "mamba" not in (getattr(config, "layer_types", None) or ()):
            raise
        pytest.skip(f"hybrid variant needs the Mamba layer, not importable yet: {e}")


def test_every_architecture_has_variants():
    assert {"llama", "granite", "granite_hybrid"} <= set(list_architectures())
    assert len(ALL_VARIANTS) >= 20


@pytest.mark.parametrize("arch, variant", ALL_VARIANTS)
def test_variant_config_builds(arch, variant):
    config = get_config(arch, variant)
    assert config.head_dim * config.num_heads > 0
    assert config.num_heads % config.num_kv_heads == 0
    assert get_config(arch, variant) is not config  # a fresh config per call: callers may update it


@pytest.mark.parametrize("arch, variant", ALL_VARIANTS)
def test_variant_builds_on_meta(arch, variant):
    model = build_on_meta(arch, variant)
    config = model.config
    assert model.embedding.weight.shape == (config.vocab_size, config.hidden_size)
    assert model.embedding.weight.is_meta
    assert len(model.layers) == config.num_layers
    assert (model.head.weight is model.embedding.weight) == config.tie_word_embeddings


@pytest.mark.parametrize("arch, variant", list(PARAM_COUNTS))
def test_parameter_count_matches_spec(arch, variant):
    model = build_on_meta(arch, variant)
    count = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    assert count == PARAM_COUNTS[arch, variant]


def test_hf_v5_layer_type_names_are_read():
    """transformers 5 writes layer_types as "full_attention" / "linear_attention" (the Mamba layers)."""
    hf = dict(model_type="granitemoehybrid", vocab_size=64, hidden_size=32, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, shared_intermediate_size=64, mamba_n_heads=4,
              mamba_d_head=16, layer_types=["linear_attention", "full_attention", "linear_attention"])
    assert granite_hybrid_config_from_hf(hf).layer_types == ("mamba", "attention", "mamba")
    legacy = dict(hf, layer_types=None, layers_block_type=["mamba", "attention", "mamba"])
    assert granite_hybrid_config_from_hf(legacy).layer_types == ("mamba", "attention", "mamba")


@pytest.mark.parametrize("variant", ["3.1-8b", "3.2-1b"])
def test_llama3_rope_scaling_matches_transformers(variant):
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = get_config("llama", variant)
    scaling = config.rope_scaling
    hf_config = transformers.LlamaConfig(
        hidden_size=config.hidden_size, num_attention_heads=config.num_heads, head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings,
        rope_parameters=dict(rope_type="llama3", rope_theta=config.rope_theta, factor=scaling.factor,
                             low_freq_factor=scaling.low_freq_factor, high_freq_factor=scaling.high_freq_factor,
                             original_max_position_embeddings=scaling.original_max_position_embeddings),
    )
    theirs, attention_factor = ROPE_INIT_FUNCTIONS["llama3"](hf_config, torch.device("cpu"))
    ours = rope_inv_freq(config.head_dim, config.rope_theta, scaling)
    assert attention_factor == 1.0
    assert ours.dtype == torch.float32 and ours.shape == (config.head_dim // 2,)
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-6, atol=0)
    # the scaling actually moved the low frequencies
    assert not torch.allclose(ours, rope_inv_freq(config.head_dim, config.rope_theta))


def test_llama3_rope_scaling_bands():
    """High frequencies kept, low frequencies divided by factor, the band between blended (spec §0)."""
    scaling = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)
    plain = rope_inv_freq(32, 10000.0)
    scaled = rope_inv_freq(32, 10000.0, scaling)
    wavelen = 2 * torch.pi / plain
    high, low = wavelen < 64 / 4.0, wavelen > 64 / 1.0
    assert high.any() and low.any() and (~high & ~low).any()
    torch.testing.assert_close(scaled[high], plain[high])
    torch.testing.assert_close(scaled[low], plain[low] / 8.0)
    mid = ~high & ~low
    assert ((scaled[mid] < plain[mid]) & (scaled[mid] > plain[mid] / 8.0)).all()


def test_building_on_the_meta_device_imports_neither_compiler_nor_sympy():
    # get_model builds on the meta device; an op there whose meta kernel is a Python reference imports torch._dynamo
    # (nn.Embedding's normal_, the RoPE frequencies, the SSM's A_log: 1-2 s of every get_model) or sympy
    # (to_empty's empty_like: 0.3-0.7 s). In a fresh process: every variant builds on meta and is allocated, and
    # micro models reach the CPU, without either import.
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "import fms.models as registry\n"
        "for arch in registry.list_architectures():\n"
        "    for variant in registry.list_variants(arch):\n"  # get_model's steps before the weights
        "        with torch.device('meta'):\n"
        "            model = registry._architecture(arch).model_class(registry.get_config(arch, variant))\n"
        "        registry.materialize(registry.allocate(model.to(torch.bfloat16), torch.device('meta')))\n"
        "registry.get_model('llama', 'micro'); registry.get_model('granite_hybrid', 'h-nano')\n"
        "print(sorted(m for m in sys.modules if m.startswith(('torch._dynamo', 'sympy'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_buffers_and_ssm_parameters_built_off_meta_hold_their_values():
    # off the meta device the constructors compute what get_model's materialize computes after to_empty
    from fms.modules.positions import RotaryEmbedding
    from fms.modules.ssm import Mamba2Mixer

    scaling = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
    rotary = RotaryEmbedding(64, 500000.0, scaling)
    assert rotary.inv_freq.dtype == torch.float32
    assert torch.equal(rotary.inv_freq, rope_inv_freq(64, 500000.0, scaling))
    config = get_config("granite_hybrid", "h-nano")
    mixer = Mamba2Mixer(config.mamba_config())
    assert mixer.A_log.numel() == config.mamba_num_heads
    assert torch.equal(mixer.A_log, torch.arange(1, config.mamba_num_heads + 1, dtype=torch.float32).log())
