"""GPT-2 (HF `gpt2`): the Llama decoder with LayerNorm, biased MHA, GELU-tanh MLP and learned positions.

Variants swap the learned position table for ALiBi or nothing (NoPE), add a sliding window or
soft-capping; all of them are attention variants the ops (sdpa / flex / paged) compute unchanged.
"""

from dataclasses import dataclass

import torch
from torch import nn

from fms.models.registry import register_architecture, register_hf_model_type, register_variants
from fms.models.llama import LLaMA, LlamaConfig, hf_float, hf_int, require_float
from fms.modules.attention import MultiHeadAttention
from fms.modules.embedding import Embedding
from fms.modules.feedforward import GeluMLP
from fms.utils.serialization import Rule, register_checkpoint_rules

# Context limit of configs without a learned position table (ALiBi / NoPE): only memory bounds them,
# but drivers size caches from max_position_embeddings, so it stays finite.
NO_TABLE_MAX_POSITIONS = 32768


@dataclass
class GPT2Config(LlamaConfig):
    """GPT-2 shapes in LlamaConfig's names: n_embd = hidden_size, n_layer = num_layers, n_head = num_heads,
    n_inner = intermediate_size, n_positions = max_position_embeddings (the learned table's rows).

    position_embedding_type "learned" (GPT-2) or "nope" (no table). alibi=True implies "nope" (ALiBi
    replaces the table). Without a table the context limit is lifted to NO_TABLE_MAX_POSITIONS.
    rms_norm_eps and the rope fields are unused: GPT-2 norms are LayerNorms with layer_norm_eps.
    """

    position_embedding_types = ("learned", "nope")

    vocab_size: int = 50257
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    num_kv_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 1024
    position_embedding_type: str = "learned"
    layer_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 50256
    eos_token_id: int | tuple[int, ...] | None = 50256

    def __post_init__(self):
        if self.alibi:
            self.position_embedding_type = "nope"
        super().__post_init__()
        require_float(type(self).__name__, "layer_norm_eps", self.layer_norm_eps, positive=True)
        if self.num_kv_heads != self.num_heads:
            raise ValueError(f"GPT-2 attention is multi-head: num_kv_heads {self.num_kv_heads} must equal "
                             f"num_heads {self.num_heads}")
        if not self.has_learned_positions:
            self.max_position_embeddings = max(self.max_position_embeddings, NO_TABLE_MAX_POSITIONS)

    @property
    def has_learned_positions(self) -> bool:
        return self.position_embedding_type == "learned"


class GPT2(LLaMA):
    """h = wte[ids] (+ wpe[pos]); pre-LN blocks x + attn(ln_1(x)), x + mlp(ln_2(x)); ln_f; logits = h @ wte^T."""

    config_class = GPT2Config
    supports_tensor_parallel = False  # its GELU MLP and learned positions have no sharded form here

    def __init__(self, config: GPT2Config, attn_name: str = "sdpa"):
        super().__init__(config, attn_name)
        self.pos_embedding = None
        if config.has_learned_positions:
            self.pos_embedding = Embedding(config.max_position_embeddings, config.hidden_size)

    def build_mixer(self, layer_idx: int) -> nn.Module:
        c = self.config
        return MultiHeadAttention(
            c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, layer_idx,
            scale=c.attention_multiplier, bias=True, rotary=None, variant=c.attention_variant,
        )

    def build_ffn(self, layer_idx: int) -> nn.Module:
        return GeluMLP(self.config.hidden_size, self.config.intermediate_size)

    def build_norm(self) -> nn.Module:
        return nn.LayerNorm(self.config.hidden_size, eps=self.config.layer_norm_eps)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None):
        super().reset_parameters(generator)
        for module in self.modules():
            if isinstance(module, nn.LayerNorm):
                module.reset_parameters()

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        x = super().embed(input_ids, position_ids)
        if self.pos_embedding is None:
            return x
        limit = self.config.max_position_embeddings
        if input_ids.shape[1] > limit:
            raise ValueError(f"{input_ids.shape[1]} tokens exceed GPT-2's {limit} learned positions; "
                             "use an ALiBi or NoPE variant (alibi=True / position_embedding_type='nope') for more")
        # Only padded query slots (whose outputs are never read) can sit past the table.
        return x + self.pos_embedding(position_ids.clamp_max(limit - 1))


# ---------------------------------------------------------------------------------------------
# HF config.json -> GPT2Config, checkpoint names, registered variants
# ---------------------------------------------------------------------------------------------
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def gpt2_config_from_hf(hf: dict) -> GPT2Config:
    activation = hf.get("activation_function", "gelu_new")
    if activation not in _TANH_GELUS:
        raise ValueError(f"GPT-2 activation_function {activation!r} is not supported; allowed: {list(_TANH_GELUS)}")
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
        raise ValueError("GPT-2 configs with scale_attn_by_inverse_layer_idx or reorder_and_upcast_attn "
                         "are not supported")
    hidden_size = hf_int(hf, "n_embd")
    num_heads = hf_int(hf, "n_head")
    return GPT2Config(
        vocab_size=hf_int(hf, "vocab_size"),
        hidden_size=hidden_size,
        num_layers=hf_int(hf, "n_layer"),
        num_heads=num_heads,
        num_kv_heads=num_heads,
        intermediate_size=hf_int(hf, "n_inner", 4 * hidden_size),
        max_position_embeddings=hf_int(hf, "n_positions", hf_int(hf, "n_ctx", 1024)),
        layer_norm_eps=hf_float(hf, "layer_norm_epsilon", 1e-5),
        attention_multiplier=None if hf.get("scale_attn_weights", True) else 1.0,
        tie_word_embeddings=hf.get("tie_word_embeddings", True),
        # GPT-2 configs carry neither; read like llama_config_from_hf for derived checkpoints that do
        sliding_window=hf_int(hf, "sliding_window", None),
        attn_logit_softcapping=hf_float(hf, "attn_logit_softcapping", None),
        bos_token_id=hf.get("bos_token_id", 50256),
        eos_token_id=hf.get("eos_token_id", 50256),
        pad_token_id=hf.get("pad_token_id"),
    )


def _conv1d(tensor: torch.Tensor) -> torch.Tensor:
    """HF Conv1D stores [in, out] and computes x @ W; nn.Linear wants [out, in]."""
    return tensor.t()


def _checkpoint_rules() -> list[Rule]:
    layer, hf = r"layers\.(\d+)\.", "h.{0}."
    rules = [
        Rule(r"embedding\.weight", ("wte.weight",)),
        Rule(r"pos_embedding\.weight", ("wpe.weight",)),
        Rule(r"dec_norm\.(weight|bias)", ("ln_f.{0}",)),
        Rule(r"head\.weight", ("lm_head.weight",)),  # fine-tunes with an untied head
        Rule(layer + r"ln\.(weight|bias)", (hf + "ln_1.{1}",)),
        Rule(layer + r"ff_ln\.(weight|bias)", (hf + "ln_2.{1}",)),
        Rule(layer + r"mixer\.dense\.weight", (hf + "attn.c_proj.weight",), _conv1d),
        Rule(layer + r"mixer\.dense\.bias", (hf + "attn.c_proj.bias",)),
        Rule(layer + r"ff\.w1\.weight", (hf + "mlp.c_fc.weight",), _conv1d),
        Rule(layer + r"ff\.w1\.bias", (hf + "mlp.c_fc.bias",)),
        Rule(layer + r"ff\.w2\.weight", (hf + "mlp.c_proj.weight",), _conv1d),
        Rule(layer + r"ff\.w2\.bias", (hf + "mlp.c_proj.bias",)),
        # c_attn is already q|k|v fused along its output columns: transposed, it is our qkv_fused
        Rule(layer + r"mixer\.qkv_fused\.weight", (hf + "attn.c_attn.weight",), _conv1d),
        Rule(layer + r"mixer\.qkv_fused\.bias", (hf + "attn.c_attn.bias",)),
    ]
    return rules


_NANO = dict(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4, intermediate_size=256,
             max_position_embeddings=1024, init_std=0.1, bos_token_id=1, eos_token_id=2)

_GPT2_VARIANTS = {
    "gpt2": dict(),  # 124M
    "gpt2-medium": dict(hidden_size=1024, num_layers=24, num_heads=16, num_kv_heads=16, intermediate_size=4096),
    # Small shapes with random weights: CPU demos ("micro", sized for the shipped tokenizer) and tests.
    "micro": dict(vocab_size=2048, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=8, intermediate_size=1024,
                  max_position_embeddings=1024, init_std=0.05, bos_token_id=1, eos_token_id=2),
    "nano": _NANO,
    "nano-alibi": dict(_NANO, alibi=True),
    # A window on top of learned positions would still stop at 1024 tokens; NoPE lifts that limit.
    "nano-window": dict(_NANO, sliding_window=32, position_embedding_type="nope"),
    "nano-softcap": dict(_NANO, attn_logit_softcapping=5.0),
}


def _register():
    register_architecture("gpt2", GPT2)
    register_variants("gpt2", GPT2Config, _GPT2_VARIANTS)
    register_hf_model_type("gpt2", "gpt2", gpt2_config_from_hf)
    register_checkpoint_rules(
        "gpt2", _checkpoint_rules(),
        ignore=[r"h\.\d+\.attn\.bias", r"h\.\d+\.attn\.masked_bias"],
        optional_prefixes=("transformer.",),
    )


_register()
