"""Granite 4.0 (HF `granitemoehybrid`): dense all-attention models and the -H Mamba2/attention hybrids.

Extends the Llama/Granite decoder: which layers are attention vs Mamba comes from the config, the
FFN is the fused shared MLP plus, for MoE variants, a top-k routed expert mixture.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fms.models.registry import register_architecture, register_hf_model_type, register_variants
from fms.models.granite import granite_scalars_from_hf
from fms.models.llama import LLaMA, LlamaConfig, hf_int, llama_config_from_hf, require_int
from fms.modules.feedforward import SwiGLU

LAYER_TYPES = ("attention", "mamba")


@dataclass
class GraniteHybridConfig(LlamaConfig):
    layer_types: tuple[str, ...] | None = None  # None -> all attention
    num_experts: int = 0
    num_experts_per_token: int = 0
    expert_intermediate_size: int = 0
    mamba_num_heads: int = 0
    mamba_head_dim: int = 0
    mamba_state_size: int = 128
    mamba_num_groups: int = 1
    mamba_conv_kernel: int = 4
    mamba_chunk_size: int = 256
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.layer_types is None:
            self.layer_types = ("attention",) * self.num_layers
        self.layer_types = tuple(self.layer_types)
        if len(self.layer_types) != self.num_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
        bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if bad:
            raise ValueError(f"unknown layer types {bad}; allowed: {list(LAYER_TYPES)}")
        for name in ("num_experts", "num_experts_per_token", "expert_intermediate_size", "mamba_num_heads",
                     "mamba_head_dim"):
            require_int(type(self).__name__, name, getattr(self, name), minimum=0)
        if self.num_experts:
            require_int(type(self).__name__, "expert_intermediate_size", self.expert_intermediate_size, minimum=1)
        if self.num_experts and not 0 < self.num_experts_per_token <= self.num_experts:
            raise ValueError(
                f"num_experts_per_token must be in 1..{self.num_experts}, got {self.num_experts_per_token}"
            )
        if "mamba" in self.layer_types and (self.mamba_num_heads < 1 or self.mamba_head_dim < 1):
            raise ValueError("mamba layers need mamba_num_heads >= 1 and mamba_head_dim >= 1")

    def mamba_config(self):
        from fms.modules.ssm import Mamba2Config

        return Mamba2Config(
            hidden_size=self.hidden_size, num_heads=self.mamba_num_heads, head_dim=self.mamba_head_dim,
            state_size=self.mamba_state_size, num_groups=self.mamba_num_groups, conv_kernel=self.mamba_conv_kernel,
            chunk_size=self.mamba_chunk_size, use_conv_bias=self.mamba_conv_bias, use_bias=self.mamba_proj_bias,
            norm_eps=self.rms_norm_eps,
        )


class MoE(nn.Module):
    """Top-k routed SwiGLU experts; gates are a softmax over the k chosen router logits."""

    def __init__(self, dim: int, hidden_dim: int, num_experts: int, top_k: int):
        super().__init__()
        self.top_k, self.hidden_dim = top_k, hidden_dim
        self.router = nn.Linear(dim, num_experts, bias=False)
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * hidden_dim, dim))  # per expert [gate; up]
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))

    def reset_parameters_seeded(self, generator):
        from fms.models.llama import _normal_

        for w in (self.w13, self.w2):
            _normal_(w.data, 0.02, generator)

    # Up to this many tokens a step runs every expert on every token and zeroes the unchosen ones:
    # no host synchronization (torch.compile traces it whole, a CUDA graph can capture it), and a
    # decode batch picks most experts anyway, so the weights read are about the same. Not tuned on
    # a GPU: the value only bounds the wasted FLOPs (num_experts / top_k times the routed ones).
    DENSE_MAX_TOKENS = 64

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, H)
        logits = self.router(x).float()
        top_logits, experts = logits.topk(self.top_k, dim=-1)  # (N, k)
        gates = top_logits.softmax(dim=-1).to(x.dtype)
        if x.shape[0] <= self.DENSE_MAX_TOKENS:
            weights = torch.zeros_like(logits, dtype=x.dtype).scatter_(1, experts, gates)  # (N, E), 0 if unchosen
            gate, up = torch.einsum("nh,eoh->eno", x, self.w13).split(self.hidden_dim, dim=-1)  # (E, N, I) each
            y = torch.einsum("eni,ehi->enh", F.silu(gate) * up, self.w2)  # (E, N, H)
            return torch.einsum("enh,ne->nh", y, weights).reshape(shape)
        out = torch.zeros_like(x)
        for e in experts.unique().tolist():
            token, slot = (experts == e).nonzero(as_tuple=True)
            gate, up = (x[token] @ self.w13[e].t()).split(self.hidden_dim, dim=-1)
            out.index_add_(0, token, (F.silu(gate) * up) @ self.w2[e].t() * gates[token, slot, None])
        return out.reshape(shape)


class SharedPlusMoE(nn.Module):
    def __init__(self, shared: nn.Module, moe: MoE):
        super().__init__()
        self.shared, self.moe = shared, moe

    def forward(self, x):
        return self.moe(x) + self.shared(x)


class GraniteHybrid(LLaMA):
    config_class = GraniteHybridConfig

    def layer_type(self, layer_idx: int) -> str:
        return self.config.layer_types[layer_idx]

    def build_mixer(self, layer_idx: int) -> nn.Module:
        if self.layer_type(layer_idx) == "mamba":
            from fms.modules.mamba_layer import MambaLayer

            return MambaLayer(self.config.mamba_config(), layer_idx, tp=self.tp)
        return super().build_mixer(layer_idx)

    def build_ffn(self, layer_idx: int) -> nn.Module:
        c = self.config
        shared = SwiGLU(c.hidden_size, c.intermediate_size, tp=self.tp)
        if not c.num_experts:
            return shared
        if self.tp is not None:
            raise ValueError(f"tensor parallel does not split mixture-of-experts layers (num_experts="
                             f"{c.num_experts}); run this model with tensor parallel size 1")
        return SharedPlusMoE(shared, MoE(c.hidden_size, c.expert_intermediate_size, c.num_experts,
                                         c.num_experts_per_token))

    def state_spec(self):
        mamba_layers = tuple(i for i, t in enumerate(self.config.layer_types) if t == "mamba")
        if not mamba_layers:
            return None
        from fms.modules.mamba_layer import MambaLayer

        config = self.layers[mamba_layers[0]].mixer.mamba.config  # this rank's heads under tensor parallel
        return MambaLayer.state_spec(config, mamba_layers, self.embedding.weight.dtype)


def granite_hybrid_config_from_hf(hf: dict) -> GraniteHybridConfig:
    layer_types = hf.get("layer_types") or hf.get("layers_block_type")
    if layer_types is None:
        layer_types = ["mamba"] * hf_int(hf, "num_hidden_layers")
    if not isinstance(layer_types, (list, tuple)):
        raise ValueError(f"key 'layer_types' must be a list of layer kinds, got {layer_types!r}")
    # transformers 5 may spell the layer kinds differently
    aliases = {"linear_attention": "mamba", "full_attention": "attention"}
    layer_types = [aliases.get(t, t) for t in layer_types]
    num_heads = hf_int(hf, "mamba_n_heads", 0, minimum=0)
    head_dim = hf.get("mamba_d_head", 0)
    if head_dim == "auto":
        if not num_heads:
            raise ValueError("key 'mamba_n_heads' must be an int >= 1 when 'mamba_d_head' is 'auto'")
        head_dim = hf_int(hf, "mamba_expand", 2) * hf_int(hf, "hidden_size") // num_heads
    else:
        head_dim = hf_int(hf, "mamba_d_head", 0, minimum=0)
    limit = hf.get("time_step_limit")
    if limit not in (None, [0.0, float("inf")], (0.0, float("inf"))) and not _is_default_limit(limit):
        raise ValueError(f"time_step_limit {limit} is not supported (only the default (0, inf))")
    return llama_config_from_hf(
        {**hf, "intermediate_size": hf.get("shared_intermediate_size", hf.get("intermediate_size"))},
        config_class=GraniteHybridConfig,
        position_embedding_type=hf.get("position_embedding_type") or "rope",
        **granite_scalars_from_hf(hf),
        layer_types=tuple(layer_types),
        num_experts=hf_int(hf, "num_local_experts", 0, minimum=0),
        num_experts_per_token=hf_int(hf, "num_experts_per_tok", 0, minimum=0),
        expert_intermediate_size=hf_int(hf, "intermediate_size", 0, minimum=0),
        mamba_num_heads=num_heads,
        mamba_head_dim=head_dim,
        mamba_state_size=hf_int(hf, "mamba_d_state", 128),
        mamba_num_groups=hf_int(hf, "mamba_n_groups", 1),
        mamba_conv_kernel=hf_int(hf, "mamba_d_conv", 4),
        mamba_chunk_size=hf_int(hf, "mamba_chunk_size", 256),
        mamba_conv_bias=hf.get("mamba_conv_bias", True),
        mamba_proj_bias=hf.get("mamba_proj_bias", False),
    )


def _is_default_limit(limit) -> bool:
    try:
        low, high = limit
        high = float("inf") if isinstance(high, dict) else float(high)
        return float(low) == 0.0 and high == float("inf")
    except (TypeError, ValueError):
        return False


def _hybrid_layers(num_layers, attention_at):
    return tuple("attention" if i in attention_at else "mamba" for i in range(num_layers))


_G4 = dict(vocab_size=100352, rope_theta=1e7, tie_word_embeddings=True, embedding_multiplier=12.0,
           bos_token_id=100257, eos_token_id=100257, pad_token_id=100256, max_position_embeddings=131072)
_G4H = dict(_G4, rope_theta=10000.0, position_embedding_type="nope", mamba_state_size=128, mamba_num_groups=1,
            mamba_conv_kernel=4, mamba_chunk_size=256, residual_multiplier=0.22)

_VARIANTS = {
    "4.0-350m": dict(_G4, hidden_size=1024, num_layers=28, num_heads=16, num_kv_heads=4, head_dim=64,
                     intermediate_size=2048, attention_multiplier=0.015625, residual_multiplier=0.263,
                     logits_scaling=4.0, max_position_embeddings=32768),
    "4.0-1b": dict(_G4, hidden_size=2048, num_layers=40, num_heads=16, num_kv_heads=4, head_dim=128,
                   intermediate_size=4096, attention_multiplier=0.0078125, residual_multiplier=0.22,
                   logits_scaling=8.0),
    "4.0-micro": dict(_G4, hidden_size=2560, num_layers=40, num_heads=40, num_kv_heads=8, head_dim=64,
                      intermediate_size=8192, attention_multiplier=0.015625, residual_multiplier=0.22,
                      logits_scaling=10.0),
    "4.0-h-350m": dict(_G4H, hidden_size=768, num_layers=32, num_heads=12, num_kv_heads=4, head_dim=64,
                       intermediate_size=2048, layer_types=_hybrid_layers(32, (10, 13, 17, 27)),
                       mamba_num_heads=48, mamba_head_dim=32, attention_multiplier=0.015625,
                       residual_multiplier=0.246, logits_scaling=3.0, max_position_embeddings=32768),
    "4.0-h-1b": dict(_G4H, hidden_size=1536, num_layers=40, num_heads=12, num_kv_heads=4, head_dim=128,
                     intermediate_size=4096, layer_types=_hybrid_layers(40, (5, 15, 25, 35)),
                     mamba_num_heads=48, mamba_head_dim=64, attention_multiplier=0.0078125, logits_scaling=6.0),
    "4.0-h-micro": dict(_G4H, hidden_size=2048, num_layers=40, num_heads=32, num_kv_heads=8, head_dim=64,
                        intermediate_size=8192, layer_types=_hybrid_layers(40, (5, 15, 25, 35)),
                        mamba_num_heads=64, mamba_head_dim=64, attention_multiplier=0.015625, logits_scaling=8.0),
    "4.0-h-tiny": dict(_G4H, hidden_size=1536, num_layers=40, num_heads=12, num_kv_heads=4, head_dim=128,
                       intermediate_size=1024, layer_types=_hybrid_layers(40, (5, 15, 25, 35)),
                       num_experts=64, num_experts_per_token=6, expert_intermediate_size=512,
                       mamba_num_heads=48, mamba_head_dim=64, attention_multiplier=0.0078125, logits_scaling=6.0),
    # small random-weight shapes for tests and CPU demos
    "nano": dict(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
                 max_position_embeddings=1024, embedding_multiplier=12.0, attention_multiplier=1 / 16,
                 residual_multiplier=0.22, logits_scaling=4.0, init_std=0.1, tie_word_embeddings=True),
    "h-nano": dict(vocab_size=512, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=128,
                   max_position_embeddings=1024, embedding_multiplier=12.0, attention_multiplier=1 / 16,
                   residual_multiplier=0.22, logits_scaling=4.0, init_std=0.1, tie_word_embeddings=True,
                   position_embedding_type="nope", layer_types=("mamba", "attention", "mamba", "attention"),
                   mamba_num_heads=4, mamba_head_dim=16, mamba_state_size=16, mamba_chunk_size=16),
    "h-micro-test": dict(vocab_size=2048, hidden_size=256, num_layers=6, num_heads=8, num_kv_heads=2,
                         intermediate_size=512, max_position_embeddings=4096, embedding_multiplier=12.0,
                         attention_multiplier=1 / 32, residual_multiplier=0.22, logits_scaling=4.0, init_std=0.05,
                         tie_word_embeddings=True, position_embedding_type="nope",
                         layer_types=_hybrid_layers(6, (2, 5)), mamba_num_heads=8, mamba_head_dim=32,
                         mamba_state_size=32, mamba_chunk_size=64),
}


def _register():
    register_architecture("granite_hybrid", GraniteHybrid)
    register_variants("granite_hybrid", GraniteHybridConfig, _VARIANTS)
    register_hf_model_type("granitemoehybrid", "granite_hybrid", granite_hybrid_config_from_hf)


_register()
