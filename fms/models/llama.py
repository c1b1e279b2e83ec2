"""Llama-style decoder (Llama 2/3.x, and Granite 3.x through four scalars in the same config)."""

import math
import numbers
from dataclasses import dataclass, field, fields, replace
from typing import Callable, Sequence

import torch
from torch import nn

from fms.distributed.group import TensorParallel
from fms.distributed.sharding import TensorShard, head_ranges
from fms.modules.attention import MultiHeadAttention
from fms.modules.embedding import Embedding
from fms.modules.feedforward import SwiGLU
from fms.modules.kernel_config import KernelConfig, apply_kernels
from fms.modules.linear import Linear
from fms.modules.parallel import VocabParallelEmbedding, VocabParallelHead
from fms.cache.spec import KVCacheSpec
from fms.modules.layernorm import RMSNorm
from fms.modules.masks import AttentionVariant
from fms.modules.positions import RopeScaling, RotaryEmbedding


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def require_int(owner: str, name: str, value, minimum: int) -> None:
    if not _is_int(value) or value < minimum:
        raise ValueError(f"{owner}.{name} must be an int >= {minimum}, got {value!r}")


def require_float(owner: str, name: str, value, positive: bool = False, nonzero: bool = False) -> None:
    allowed = "a finite number" + (" > 0" if positive else " != 0" if nonzero else "")
    if not _is_number(value) or (positive and value <= 0) or (nonzero and value == 0):
        raise ValueError(f"{owner}.{name} must be {allowed}, got {value!r}")


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int | None = None  # None -> hidden_size // num_heads
    intermediate_size: int = 11008
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    position_embedding_type: str = "rope"  # "rope" or "nope"
    tie_word_embeddings: bool = False
    # Granite's scalars; Llama leaves them at identity (attention_multiplier None = 1/sqrt(head_dim)).
    embedding_multiplier: float = 1.0
    attention_multiplier: float | None = None
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0
    # attention variants (FlexAttention mods); off for every released Llama/Granite
    sliding_window: int | None = None
    alibi: bool = False
    attn_logit_softcapping: float | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    pad_token_id: int | None = None
    init_std: float = 0.02
    extra: dict = field(default_factory=dict)

    # Values position_embedding_type may take; LLaMA builds rotary only for "rope" (GPT-2 adds "learned").
    position_embedding_types = ("rope", "nope")

    def __post_init__(self):
        name = type(self).__name__
        for field_name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                           "intermediate_size", "max_position_embeddings"):
            require_int(name, field_name, getattr(self, field_name), minimum=1)
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}; give head_dim"
                )
            self.head_dim = self.hidden_size // self.num_heads
        require_int(name, "head_dim", self.head_dim, minimum=1)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.position_embedding_type not in self.position_embedding_types:
            raise ValueError(
                f"position_embedding_type must be one of {list(self.position_embedding_types)}, "
                f"got {self.position_embedding_type!r}"
            )
        for field_name in ("rms_norm_eps", "rope_theta", "init_std"):
            require_float(name, field_name, getattr(self, field_name), positive=True)
        for field_name in ("embedding_multiplier", "residual_multiplier"):
            require_float(name, field_name, getattr(self, field_name))
        require_float(name, "logits_scaling", self.logits_scaling, nonzero=True)  # logits are divided by it
        for field_name in ("attention_multiplier", "attn_logit_softcapping"):
            if getattr(self, field_name) is not None:
                require_float(name, field_name, getattr(self, field_name), positive=True)
        if self.sliding_window is not None:
            require_int(name, "sliding_window", self.sliding_window, minimum=1)
        for field_name in ("tie_word_embeddings", "alibi"):
            if not isinstance(getattr(self, field_name), bool):
                raise ValueError(f"{name}.{field_name} must be True or False, got {getattr(self, field_name)!r}")
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        if isinstance(self.eos_token_id, list):
            self.eos_token_id = tuple(self.eos_token_id)
        self._check_token_ids()

    def _check_token_ids(self):
        # bos/eos must be embeddable (and eos producible by the head); pad is only compared with, and some
        # HF configs carry a pad id outside the vocabulary (-1, or vocab_size), so only its type is checked.
        name = type(self).__name__
        for field_name, ids in (("bos_token_id", (self.bos_token_id,)), ("eos_token_id", self.eos_token_ids)):
            for token_id in ids:
                if token_id is None and field_name == "bos_token_id":
                    continue
                require_int(name, field_name, token_id, minimum=0)
                if token_id >= self.vocab_size:
                    raise ValueError(f"{name}.{field_name} {token_id} is outside the vocabulary: allowed "
                                     f"0 <= id < vocab_size ({self.vocab_size})")
        if self.pad_token_id is not None:
            require_int(name, "pad_token_id", self.pad_token_id, minimum=-1)

    def updated(self, **overrides) -> "LlamaConfig":
        unknown = set(overrides) - {f.name for f in fields(self)}
        if unknown:
            raise ValueError(f"unknown config fields {sorted(unknown)} for {type(self).__name__}")
        return replace(self, **overrides)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        return self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)

    @property
    def attention_variant(self) -> AttentionVariant:
        return AttentionVariant(
            sliding_window=self.sliding_window, alibi=self.alibi, softcap=self.attn_logit_softcapping
        )


class DecoderBlock(nn.Module):
    """Pre-norm block: h = x + r*Mixer(norm(x)); out = h + r*FFN(norm(h))."""

    def __init__(self, mixer: nn.Module, ffn: nn.Module, hidden_size: int, eps: float, residual_multiplier: float,
                 norm: Callable[[], nn.Module] | None = None):
        super().__init__()
        make_norm = norm or (lambda: RMSNorm(hidden_size, eps))  # norm: factory for another norm (GPT-2 LayerNorm)
        self.ln = make_norm()
        self.mixer = mixer
        self.ff_ln = make_norm()
        self.ff = ffn
        self.residual_multiplier = residual_multiplier
        self.set_kernels(KernelConfig())

    def set_kernels(self, kernels: KernelConfig) -> None:
        """With kernels.fuse_norm, each half of the block whose sublayer takes them (a fuses_norm attribute) hands
        it the norm before and the residual add after, for the GEMV kernel to fuse (fms.triton.gemv)."""
        self.fuse_mixer = kernels.fuse_norm and getattr(self.mixer, "fuses_norm", False)
        self.fuse_ff = kernels.fuse_norm and getattr(self.ff, "fuses_norm", False)

    def forward(self, x, position_ids, **kwargs):
        r = self.residual_multiplier
        if self.fuse_mixer:
            x = self.mixer(x, position_ids, norm=self.ln, residual=x, residual_scale=r, **kwargs)
        else:
            x = x + r * self.mixer(self.ln(x), position_ids, **kwargs)
        return self._feedforward(x)

    def _feedforward(self, x):
        if self.fuse_ff:
            return self.ff(x, norm=self.ff_ln, residual=x, residual_scale=self.residual_multiplier)
        return x + self.residual_multiplier * self.ff(self.ff_ln(x))

    # forward in two halves around the attention op (attention mixers only; fms.runtime.compiled compiles
    # each half once for every layer and runs the op between them)
    def attention_inputs(self, x, position_ids, rope=None):
        """q, k, v of this block's attention for x (MultiHeadAttention.project of the normed x)."""
        if self.fuse_mixer:
            return self.mixer.project(x, position_ids, rope, norm=self.ln)
        return self.mixer.project(self.ln(x), position_ids, rope)

    def attention_output(self, x, out):
        """The block's output from its input x and the attention op's result out (B, Hq, T, D)."""
        if self.fuse_mixer:
            x = self.mixer.output(out, residual=x, residual_scale=self.residual_multiplier)
        else:
            x = x + self.residual_multiplier * self.mixer.output(out)
        return self._feedforward(x)


class LLaMA(nn.Module):
    """Embeddings, a stack of DecoderBlocks, final norm, LM head. Subclasses swap mixers or FFNs per layer."""

    config_class = LlamaConfig
    supports_tensor_parallel = True

    def __init__(self, config: LlamaConfig, attn_name: str = "sdpa", tp: TensorParallel | None = None):
        """tp: build this rank's shard for tensor parallel (fms.distributed): attention by heads, the MLP by
        hidden units, embedding and LM head by vocabulary rows; None: the whole model."""
        super().__init__()
        self.config = config
        self.attn_name = attn_name
        self.tp = tp
        if tp is not None and config.alibi:
            raise ValueError("tensor parallel does not support alibi=True: the attention op computes ALiBi slopes "
                             "from the local head count, and a rank's heads are not heads 0..n of the model")
        if tp is None:
            self.embedding = Embedding(config.vocab_size, config.hidden_size)
        else:
            self.embedding = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        self.rotary = None
        if config.position_embedding_type == "rope":
            self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)
        self.layers = nn.ModuleList(
            DecoderBlock(self.build_mixer(i), self.build_ffn(i), config.hidden_size, config.rms_norm_eps,
                         config.residual_multiplier, norm=self.build_norm)
            for i in range(config.num_layers)
        )
        self.dec_norm = self.build_norm()
        if tp is None:
            self.head = Linear(config.hidden_size, config.vocab_size, bias=False)
        else:
            self.head = VocabParallelHead(config.hidden_size, config.vocab_size, tp)
        if config.tie_word_embeddings:
            self.head.weight = self.embedding.weight
        self.kernels = KernelConfig()

    def set_kernels(self, kernels: KernelConfig) -> None:
        """Kernel choices (GEMV, SSD scan) for every layer of this model; other models keep theirs."""
        apply_kernels(self, kernels)
        self.kernels = kernels

    # -- per-layer construction (overridden by hybrid models) ---------------------------------
    def layer_type(self, layer_idx: int) -> str:
        return "attention"

    def build_mixer(self, layer_idx: int) -> nn.Module:
        c = self.config
        return MultiHeadAttention(
            c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, layer_idx,
            scale=c.attention_multiplier, rotary=self.rotary, variant=c.attention_variant, tp=self.tp,
        )

    def build_ffn(self, layer_idx: int) -> nn.Module:
        return SwiGLU(self.config.hidden_size, self.config.intermediate_size, tp=self.tp)

    def build_norm(self) -> nn.Module:
        return RMSNorm(self.config.hidden_size, self.config.rms_norm_eps)

    def state_spec(self):
        """Recurrent-state spec for the cache; None for attention-only models."""
        return None

    @property
    def num_local_kv_heads(self) -> int:
        """KV heads this process computes and caches: all of them, or this rank's under tensor parallel."""
        if self.tp is None:
            return self.config.num_kv_heads
        _, (kv0, kv1) = head_ranges(self.config.num_heads, self.config.num_kv_heads, self.tp.rank,
                                    self.tp.world_size)
        return kv1 - kv0

    # -- weights / cache ------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None):
        """Random weights: normal(0, init_std) matrices, unit norms, zero biases. A tensor-parallel shard draws
        each full matrix and keeps its slice, so its weights are the whole model's for the same seed."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                shard = getattr(module, "shards", {}).get("weight")
                _normal_(module.weight, self.config.init_std, generator, shard)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
            elif hasattr(module, "reset_parameters_seeded"):
                module.reset_parameters_seeded(generator)

    def cache_spec(self, device=None, dtype=None) -> KVCacheSpec:
        param = self.embedding.weight
        attention_layers = tuple(i for i in range(self.config.num_layers) if self.layer_type(i) == "attention")
        return KVCacheSpec(
            num_layers=self.config.num_layers,
            attention_layers=attention_layers,
            num_kv_heads=self.num_local_kv_heads,  # under tensor parallel, this rank's pool holds its heads
            head_dim=self.config.head_dim,
            dtype=dtype or param.dtype,
            device=torch.device(device) if device is not None else param.device,
            max_position_embeddings=self.config.max_position_embeddings,
            sliding_window=self.config.sliding_window,
            state_spec=self.state_spec(),
        )

    # -- forward --------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attn_name: str | None = None,
        logits_positions: torch.Tensor | None = None,
        layers: Sequence[Callable] | None = None,
        **attn_kwargs,
    ) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, V); only some tokens with logits_positions: (B,) one per
        row -> (B, 1, V), or (B, K) K per row -> (B, K, V) (a packed step's last tokens: (1, num_seqs)).

        attn_kwargs (e.g. cache=, meta=) go untouched to the attention op named by attn_name.
        layers: callables to run in place of self.layers, one per layer (each layer compiled on its own:
        fms.runtime.compiled.compile_forward).
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        meta = attn_kwargs.get("meta")
        if position_ids is None:
            if meta is not None:
                position_ids = meta.position_ids
            else:
                position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None].expand_as(input_ids)
        attn_name = attn_name or self.attn_name
        if self.rotary is not None:
            self.rotary.begin_forward()
        x = self.embed(input_ids, position_ids)
        if layers is not None and len(layers) != len(self.layers):
            raise ValueError(f"layers must hold one callable per layer ({len(self.layers)}), got {len(layers)}")
        for layer in layers if layers is not None else self.layers:
            x = layer(x, position_ids, attn_name=attn_name, **attn_kwargs)
        if logits_positions is not None:
            index = logits_positions if logits_positions.dim() == 2 else logits_positions[:, None]  # (B, K)
            x = x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))  # (B, K, H)
        logits = self.head(self.dec_norm(x))
        if self.config.logits_scaling != 1.0:
            logits = logits / self.config.logits_scaling
        return logits

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings (B, T, H); models with learned absolute positions (GPT-2) add theirs here."""
        x = self.embedding(input_ids)
        if self.config.embedding_multiplier != 1.0:
            x = x * self.config.embedding_multiplier
        return x


def _normal_(weight, std, generator, shard: TensorShard | None = None):
    """weight ~ normal(0, std); with a shard, weight is shard's slice of a full tensor drawn the same way."""
    same_device = generator is None or generator.device == weight.device
    if shard is None and same_device:
        weight.normal_(0.0, std, generator=generator)
        return
    # draw on the generator's device so a seed gives the same weights everywhere
    full = torch.empty(weight.shape if shard is None else shard.full_shape,
                       dtype=weight.dtype if same_device else torch.float32,
                       device=weight.device if same_device else generator.device)
    full.normal_(0.0, std, generator=generator)
    weight.copy_(full if shard is None else shard.take(full))


# ---------------------------------------------------------------------------------------------
# HF config.json -> LlamaConfig, and the registered variants
# ---------------------------------------------------------------------------------------------
_REQUIRED = object()


def _hf_value(hf: dict, key: str, default):
    """hf[key], or None when missing or null (an error naming the key when it is required)."""
    value = hf.get(key)
    if value is None and default is _REQUIRED:
        raise ValueError(f"required key {key!r} is " + ("null" if key in hf else "missing"))
    return value


def hf_int(hf: dict, key: str, default=_REQUIRED, minimum: int = 1):
    """config.json's hf[key] as an int >= minimum, or default when missing or null.

    Errors name the HF key; read_hf_config adds the file.
    """
    value = _hf_value(hf, key, default)
    if value is None:
        return default
    if not _is_int(value) or value < minimum:
        raise ValueError(f"key {key!r} must be an int >= {minimum}, got {value!r}")
    return int(value)


def hf_float(hf: dict, key: str, default=_REQUIRED):
    """config.json's hf[key] as a float (range checks are the config's), or default when missing or null."""
    value = _hf_value(hf, key, default)
    if value is None:
        return default
    if not _is_number(value):
        raise ValueError(f"key {key!r} must be a finite number, got {value!r}")
    return float(value)


def rope_from_hf(hf: dict) -> tuple[float, RopeScaling | None]:
    """(theta, llama3 scaling) from either the v4 keys (rope_theta/rope_scaling) or v5 rope_parameters."""
    params = hf.get("rope_parameters") or {}
    theta = hf_float(params, "rope_theta", hf_float(hf, "rope_theta", 10000.0))
    scaling = hf.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    if not scaling:
        return theta, None
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise ValueError(f"unsupported rope scaling type {rope_type!r}; supported: 'llama3' (or none)")
    return theta, RopeScaling(
        factor=hf_float(scaling, "factor"),
        low_freq_factor=hf_float(scaling, "low_freq_factor"),
        high_freq_factor=hf_float(scaling, "high_freq_factor"),
        original_max_position_embeddings=hf_int(scaling, "original_max_position_embeddings"),
    )


def llama_config_from_hf(hf: dict, config_class=LlamaConfig, **extra) -> LlamaConfig:
    theta, scaling = rope_from_hf(hf)
    hidden_size = hf_int(hf, "hidden_size")
    num_heads = hf_int(hf, "num_attention_heads")
    return config_class(
        vocab_size=hf_int(hf, "vocab_size"),
        hidden_size=hidden_size,
        num_layers=hf_int(hf, "num_hidden_layers"),
        num_heads=num_heads,
        num_kv_heads=hf_int(hf, "num_key_value_heads", num_heads),
        head_dim=hf_int(hf, "head_dim", hidden_size // num_heads),  # HF floors it too
        intermediate_size=hf_int(hf, "intermediate_size", 4 * hidden_size),
        rms_norm_eps=hf_float(hf, "rms_norm_eps", 1e-5),
        max_position_embeddings=hf_int(hf, "max_position_embeddings", 4096),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        sliding_window=hf_int(hf, "sliding_window", None) if hf.get("use_sliding_window", True) else None,
        attn_logit_softcapping=hf_float(hf, "attn_logit_softcapping", None),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id"),
        **extra,
    )


_LLAMA3_SCALING_8K = dict(original_max_position_embeddings=8192, low_freq_factor=1.0, high_freq_factor=4.0)

_LLAMA_VARIANTS = {
    "2-7b": dict(),
    "3-8b": dict(vocab_size=128256, num_kv_heads=8, intermediate_size=14336, max_position_embeddings=8192,
                 rope_theta=500000.0, bos_token_id=128000, eos_token_id=128001),
    "3.1-8b": dict(vocab_size=128256, num_kv_heads=8, intermediate_size=14336, max_position_embeddings=131072,
                   rope_theta=500000.0, rope_scaling=RopeScaling(factor=8.0, **_LLAMA3_SCALING_8K),
                   bos_token_id=128000, eos_token_id=128001),
    "3.2-1b": dict(vocab_size=128256, hidden_size=2048, num_layers=16, num_kv_heads=8, head_dim=64,
                   intermediate_size=8192, max_position_embeddings=131072, rope_theta=500000.0,
                   rope_scaling=RopeScaling(factor=32.0, **_LLAMA3_SCALING_8K), tie_word_embeddings=True,
                   bos_token_id=128000, eos_token_id=128001),
    "3.2-3b": dict(vocab_size=128256, hidden_size=3072, num_layers=28, num_heads=24, num_kv_heads=8, head_dim=128,
                   intermediate_size=8192, max_position_embeddings=131072, rope_theta=500000.0,
                   rope_scaling=RopeScaling(factor=32.0, **_LLAMA3_SCALING_8K), tie_word_embeddings=True,
                   bos_token_id=128000, eos_token_id=128001),
    # Small shapes with random weights: CPU demos ("micro", sized for the shipped tokenizer) and tests.
    "micro": dict(vocab_size=2048, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=2,
                  intermediate_size=688, max_position_embeddings=4096, rope_theta=10000.0, init_std=0.05),
    "nano": dict(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                 intermediate_size=128, max_position_embeddings=1024, init_std=0.1),
}


def _register():
    from fms.models.registry import register_architecture, register_hf_model_type, register_variants

    register_architecture("llama", LLaMA)
    register_variants("llama", LlamaConfig, _LLAMA_VARIANTS)
    register_hf_model_type("llama", "llama", llama_config_from_hf)
    # Mistral is the Llama computation with a sliding window (same tensor names).
    register_hf_model_type("mistral", "llama", llama_config_from_hf)


_register()
