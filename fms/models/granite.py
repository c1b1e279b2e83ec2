"""Granite 3.x dense: the Llama computation with Granite's four scalars (all in LlamaConfig)."""

from fms.models.registry import register_hf_model_type, register_variants
from fms.models.llama import LLaMA, LlamaConfig, hf_float, llama_config_from_hf


def granite_scalars_from_hf(hf: dict) -> dict:
    """Granite's four scalars (LlamaConfig fields) from config.json; absent ones leave the Llama computation."""
    return dict(
        embedding_multiplier=hf_float(hf, "embedding_multiplier", 1.0),
        attention_multiplier=hf_float(hf, "attention_multiplier", None),
        residual_multiplier=hf_float(hf, "residual_multiplier", 1.0),
        logits_scaling=hf_float(hf, "logits_scaling", 1.0),
    )


def granite_config_from_hf(hf: dict) -> LlamaConfig:
    return llama_config_from_hf(hf, **granite_scalars_from_hf(hf))


_GRANITE_3 = dict(vocab_size=49159, num_layers=40, num_heads=32, num_kv_heads=8, max_position_embeddings=131072,
                  rope_theta=1e7, tie_word_embeddings=True, embedding_multiplier=12.0, residual_multiplier=0.22,
                  bos_token_id=0, eos_token_id=0, pad_token_id=0)

_GRANITE_VARIANTS = {
    "3.3-2b": dict(_GRANITE_3, hidden_size=2048, head_dim=64, intermediate_size=8192, attention_multiplier=0.015625,
                   logits_scaling=8.0),
    "3.3-8b": dict(_GRANITE_3, hidden_size=4096, head_dim=128, intermediate_size=12800,
                   attention_multiplier=0.0078125, logits_scaling=16.0),
    "micro": dict(vocab_size=2048, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=2, intermediate_size=688,
                  max_position_embeddings=4096, embedding_multiplier=12.0, attention_multiplier=1 / 32,
                  residual_multiplier=0.22, logits_scaling=4.0, init_std=0.05, tie_word_embeddings=True),
    "nano": dict(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
                 max_position_embeddings=1024, embedding_multiplier=12.0, attention_multiplier=1 / 16,
                 residual_multiplier=0.22, logits_scaling=4.0, init_std=0.1, tie_word_embeddings=True),
}


def _register():
    from fms.models.registry import register_architecture

    register_architecture("granite", LLaMA)
    register_variants("granite", LlamaConfig, _GRANITE_VARIANTS)
    register_hf_model_type("granite", "granite", granite_config_from_hf)


_register()
