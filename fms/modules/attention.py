"""Multi-head attention and the attention-op registry (built-in ops: sdpa, flex, paged).

A model picks an op by name (`attn_name`) and passes the op's keyword arguments (`cache`, `meta`)
down untouched; the op owns its cache layout. Ops:

    sdpa   contiguous cache (one row per sequence), torch SDPA
    flex   contiguous cache, FlexAttention (every mask/score variant, e.g. soft-capping)
    paged  shared page pool + page tables; FlexAttention over the pool, with fast paths by step type:
           Triton decode, flash varlen prefill over gathered pages, or one padded SDPA call per
           layer where flash varlen cannot run (see PagedOp)
"""

import functools
import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import sdpa_kernel

from fms.distributed.group import TensorParallel
from fms.distributed.sharding import head_ranges
from fms.modules.linear import Linear
from fms.modules.parallel import RowParallelLinear, column_parallel
from fms.cache.base import SequenceCache
from fms.cache.contiguous import ContiguousKVCache
from fms.cache.spec import KVCacheSpec
from fms.modules.masks import AttentionVariant, dense_attention_bias, variant_predicate, variant_score_fn
from fms.cache.paged import PagedKVCache
from fms.modules.positions import RotaryEmbedding
from fms.triton.kv_write import kv_write, kv_write_reference
from fms.triton import paged_decode as paged_decode_kernel
from fms.triton.paged_decode import FUSE_KV_WRITE
from fms.triton.varlen import (CUDA_SDPA_BACKENDS, FLASH_DTYPES, padded_causal_attention, uses_flash,
                               varlen_causal_attention)


class AttentionOp:
    """An attention backend: how K/V are cached and how attention is computed over them.

    Drivers never compare op names; they ask the op what it can do:
        cache_options        keyword options create_cache takes (e.g. page_size for a page pool)
        uses_pages           its cache is a pool of fixed-size pages (page_size, page counts apply)
        why_no_graph_decode  why a one-token step cannot be replayed from a CUDA graph, or None
        can_pack             whether it computes packed steps (every row's tokens back to back)
        prefill_uses_flex    whether multi-token steps run compiled FlexAttention (few shapes wanted)
        layer_kv_state       what write_kv needs of a layer's cache, for a driver that writes the step's K/V
                             inside a compiled graph and attends outside it (None: attend writes them)
        writes_kv_in_attend  whether attend stores this step's K/V as part of its own kernel, so that a driver
                             should leave the write to it
    """

    name: str = ""
    cache_options: frozenset[str] = frozenset()
    uses_pages: bool = False

    def cache_kwargs(self, **options) -> dict:
        """The subset of `options` this op's create_cache takes (others, e.g. page_size for a contiguous
        cache, are dropped), so a caller can pass one set of options to any op."""
        return {k: v for k, v in options.items() if k in self.cache_options and v is not None}

    def why_no_graph_decode(self, variant: AttentionVariant, device: torch.device) -> str | None:
        """Why a one-token decode step cannot be captured in a CUDA graph, or None if it can."""
        if device.type != "cuda":
            return f"the model is on {device.type}, not CUDA"
        return None

    def create_cache(self, spec: KVCacheSpec, max_batch_size: int, max_seq_len: int, **options) -> SequenceCache:
        raise NotImplementedError

    def attend(self, q, k, v, *, layer_idx: int, scale: float, variant: AttentionVariant,
               cache: SequenceCache | None = None, meta=None) -> torch.Tensor:
        """q: (B, Hq, T, D), k/v: (B, Hkv, T, D) for the step's new tokens -> (B, Hq, T, D)."""
        raise NotImplementedError

    def can_pack(self, variant: AttentionVariant, cache: SequenceCache) -> bool:
        """Whether this op computes steps prepared with cache.prepare(..., packed=True)."""
        return False

    def layer_kv_state(self, cache: SequenceCache, layer_idx: int):
        """The tensors of layer_idx's cache that write_kv updates, or None when this op writes K/V only in
        attend. A driver that gets tensors calls write_kv (traceable, e.g. in a compiled graph that serves every
        layer, the tensors being its inputs) and then attend(..., kv_written=True)."""
        return None

    def write_kv(self, k, v, state, meta) -> None:
        """Store the step's k/v (B, Hkv, T, D) into the layer's cache tensors `state` (from layer_kv_state)."""
        raise NotImplementedError(f"attention op {self.name!r} writes K/V in attend (layer_kv_state is None)")

    def writes_kv_in_attend(self, cache: SequenceCache, meta, variant: AttentionVariant) -> bool:
        """Whether attend(..., kv_written=False) stores this step's K/V inside its own attention kernel (no launch
        of its own): a driver that could write them first (layer_kv_state) should then leave them to attend."""
        return False

    def prefill_uses_flex(self, variant: AttentionVariant, cache: SequenceCache) -> bool:
        """Whether multi-token steps with cached context run compiled FlexAttention, which specializes
        on (batch, query length): a driver then keeps those shapes to a few buckets."""
        return False


_OPS: dict[str, AttentionOp] = {}


def register_attention_op(name: str, op: AttentionOp) -> None:
    if not name or not isinstance(name, str):
        raise ValueError(f"an attention op needs a non-empty name, got {name!r}")
    if name in _OPS:
        raise ValueError(f"attention op {name!r} is already registered")
    op.name = name
    _OPS[name] = op


def get_attention_op(name: str) -> AttentionOp:
    try:
        return _OPS[name]
    except KeyError:
        raise ValueError(f"unknown attn_name {name!r}; registered attention ops: {sorted(_OPS)}") from None


def attention_op_names() -> list[str]:
    return sorted(_OPS)


def _no_options(name, options):
    if options:
        raise ValueError(f"attention op {name!r} takes no cache options, got {sorted(options)}")


# ---------------------------------------------------------------------------------------------
# sdpa
# ---------------------------------------------------------------------------------------------
def _sdpa(q, k, v, scale, mask=None, is_causal=False):
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    if hq != hkv and mask is not None and t == 1 and mask.shape[1] == 1:
        # One query per row and a mask shared by all heads: fold each KV head's query heads into the
        # query axis, (B, Hkv, group, D), and attend without copying K/V per query head.
        group = hq // hkv
        out = _sdpa(q.reshape(b, hkv, group, d), k, v, scale, mask=mask.expand(b, 1, group, mask.shape[-1]))
        return out.reshape(b, hq, 1, d)
    if hq != hkv and mask is not None and q.is_cuda:
        # The fused CUDA kernels that take an explicit mask do not take enable_gqa; repeat KV heads.
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    kwargs = dict(attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    if not q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, **kwargs)
    with sdpa_kernel(CUDA_SDPA_BACKENDS):  # prefer flash: not cuDNN (fms.triton.varlen says why)
        return F.scaled_dot_product_attention(q, k, v, **kwargs)


def _contiguous_read(cache: ContiguousKVCache, layer_idx, meta):
    kc, vc = cache.layer_kv(layer_idx)  # (Bmax, Hkv, S+1, D)
    length = meta.max_context_len
    if meta.rows_are_prefix:
        b = meta.batch_size
        return kc[:b, :, :length], vc[:b, :, :length]
    return kc[meta.rows, :, :length], vc[meta.rows, :, :length]


def _contiguous_write(cache: ContiguousKVCache, layer_idx, meta, k, v):
    kc, vc = cache.layer_kv(layer_idx)
    # (B, T) row/position indices around the head slice select (B, T, Hkv, D)
    kc[meta.write_rows, :, meta.write_positions] = k.transpose(1, 2)
    vc[meta.write_rows, :, meta.write_positions] = v.transpose(1, 2)


class SDPAOp(AttentionOp):
    def create_cache(self, spec, max_batch_size, max_seq_len, **options):
        _no_options(self.name, options)
        return ContiguousKVCache(spec, max_batch_size, max_seq_len)

    def attend(self, q, k, v, *, layer_idx, scale, variant, cache=None, meta=None):
        if variant.softcap is not None:
            raise ValueError("soft-capping has no SDPA form; use attn_name='flex' or 'paged'")
        if cache is None:
            if variant.is_causal_only:
                return _sdpa(q, k, v, scale, is_causal=True)
            positions = torch.arange(q.shape[2], device=q.device)
            bias = dense_attention_bias(variant, positions[None], positions, q.shape[1], dtype=q.dtype)
            return _sdpa(q, k, v, scale, mask=bias)
        _contiguous_write(cache, layer_idx, meta, k, v)
        keys, values = _contiguous_read(cache, layer_idx, meta)
        if variant.is_causal_only and meta.is_uniform:
            if meta.query_len == 1:
                return _sdpa(q, keys, values, scale)  # every row sees all of its keys
            if not meta.has_context:
                return _sdpa(q, keys, values, scale, is_causal=True)
        kv_pos = torch.arange(meta.max_context_len, device=q.device)
        if variant.is_causal_only:
            mask = (kv_pos[None, None, :] <= meta.position_ids[:, :, None])[:, None]  # (B, 1, T, L)
        else:
            mask = dense_attention_bias(variant, meta.position_ids, kv_pos, q.shape[1], dtype=q.dtype)
        return _sdpa(q, keys, values, scale, mask=mask)


# ---------------------------------------------------------------------------------------------
# FlexAttention helpers (flex and paged)
# ---------------------------------------------------------------------------------------------
@functools.cache
def _flex_fn(is_cuda: bool) -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    if is_cuda:
        # dynamic=None: the first shape compiles static; a second shape recompiles once with dynamic
        # sizes, after which new prefill/chunk lengths and batch sizes reuse that kernel.
        return torch.compile(flex_attention)

    def eager(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
            return flex_attention(*args, **kwargs)

    return eager


def flex_attention(q, k, v, *, scale, block_mask=None, score_mod=None, kernel_options=None):
    fn = _flex_fn(q.is_cuda)
    return fn(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
              enable_gqa=q.shape[1] != k.shape[1], kernel_options=kernel_options)


def _positional_score_mod(variant, num_heads, device, q_position, kv_position):
    """Wraps a logical-position score function for FlexAttention's (b, h, q_idx, kv_idx) indices."""
    score_fn = variant_score_fn(variant, num_heads, device)
    if score_fn is None:
        return None

    def score_mod(score, b, h, q_idx, kv_idx):
        return score_fn(score, h, q_position(b, q_idx), kv_position(kv_idx))

    return score_mod


def _contiguous_flex(q, k, v, scale, variant, q_start=None):
    """FlexAttention over contiguous K/V of shape (B, Hkv, L, D); queries start at q_start[b]."""
    from torch.nn.attention.flex_attention import create_block_mask

    b, _, t, _ = q.shape
    kv_len = k.shape[2]
    if q_start is None:
        q_start = torch.zeros(b, dtype=torch.int64, device=q.device)
    predicate = variant_predicate(variant)

    def mask_mod(b_idx, h_idx, q_idx, kv_idx):
        return predicate(q_start[b_idx] + q_idx, kv_idx)

    block_mask = create_block_mask(mask_mod, b, None, t, kv_len, device=q.device)
    score_mod = _positional_score_mod(
        variant, q.shape[1], q.device, lambda b_idx, q_idx: q_start[b_idx] + q_idx, lambda kv_idx: kv_idx
    )
    return flex_attention(q, k, v, scale=scale, block_mask=block_mask, score_mod=score_mod)


class FlexOp(AttentionOp):
    """Contiguous cache like sdpa, attention by FlexAttention: covers every variant (soft-capping too)."""

    def why_no_graph_decode(self, variant, device):
        return super().why_no_graph_decode(variant, device) or (
            "the decode step would use FlexAttention, whose BlockMask is rebuilt every step")

    def create_cache(self, spec, max_batch_size, max_seq_len, **options):
        _no_options(self.name, options)
        return ContiguousKVCache(spec, max_batch_size, max_seq_len)

    def attend(self, q, k, v, *, layer_idx, scale, variant, cache=None, meta=None):
        if cache is None:
            return _contiguous_flex(q, k, v, scale, variant)
        _contiguous_write(cache, layer_idx, meta, k, v)
        keys, values = _contiguous_read(cache, layer_idx, meta)
        return _contiguous_flex(q, keys, values, scale, variant, q_start=meta.context_lens)


# ---------------------------------------------------------------------------------------------
# paged
# ---------------------------------------------------------------------------------------------
PREFILL_KERNELS = ("auto", "varlen", "padded", "flex")


def _paged_decode(q, k_pool, v_pool, *args, new_kv=None, **kwargs):
    """One-token paged attention: the Triton kernel on CUDA, its torch reference elsewhere (chosen
    here by device, not by TRITON_INTERPRET, so a test process that sets it does not slow others).
    new_kv: the step's (k, v, slots), stored into the pools by the kernel (eager only), or here before the reference."""
    kernel = paged_decode_kernel
    if q.is_cuda:
        if torch.compiler.is_compiling():  # one opaque op in the traced graph
            if new_kv is not None:
                raise ValueError("the traced paged decode op does not write K/V; write them before it")
            return kernel.paged_decode_op(q, k_pool, v_pool, *args, window=kwargs.get("window") or 0)
        # eager: skip the custom op's dispatch
        return kernel.paged_decode_attention(q, k_pool, v_pool, *args, new_kv=new_kv, **kwargs)
    if new_kv is not None:
        kernel.write_new_kv(k_pool, v_pool, new_kv)
    return kernel.paged_decode_reference(q, k_pool, v_pool, *args, **kwargs)


def _paged_varlen(q, k, v, kp, vp, varlen, scale):
    """Causal attention of a multi-token step with no padding: real queries packed, each row's keys
    either the step's own (no cached context anywhere) or gathered from the pool (context + new)."""
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    qf = q.transpose(1, 2).reshape(b * t, hq, d)  # (B*T, Hq, D); packed steps have B == 1, all real
    if varlen.q_index is not None:
        qf = qf.index_select(0, varlen.q_index)  # (total_q, Hq, D)
    if varlen.kv_slots is None:
        kf, vf = (x.transpose(1, 2).reshape(b * t, hkv, d) for x in (k, v))
        if varlen.q_index is not None:
            kf, vf = kf.index_select(0, varlen.q_index), vf.index_select(0, varlen.q_index)
    else:
        kf = kp.transpose(0, 1).index_select(0, varlen.kv_slots)  # (total_k, Hkv, D)
        vf = vp.transpose(0, 1).index_select(0, varlen.kv_slots)
    out = varlen_causal_attention(qf, kf, vf, varlen.cu_q, varlen.cu_k, varlen.max_lens, scale)
    if varlen.q_index is not None:  # back to the padded layout; padded queries get zeros
        out = out.new_zeros(b * t, hq, d).index_copy_(0, varlen.q_index, out)
    return out.view(b, t, hq, d).transpose(1, 2)


def _paged_padded(q, k, v, kp, vp, padded, scale):
    """Causal attention of a padded multi-token step in one SDPA call: each row's keys (context, then
    the step's tokens) gathered from the pool into (B, Hkv, L, D) through the step's slot grid, or,
    when no row has context, the step's own keys. Padded queries get finite values nothing reads."""
    if padded.kv_slots is None:
        return padded_causal_attention(q, k, v, scale)
    b, length = padded.kv_slots.shape
    hkv, _, d = kp.shape
    slots = padded.kv_slots.flatten()
    keys = kp.index_select(1, slots).view(hkv, b, length, d).transpose(0, 1)  # (B, Hkv, L, D)
    values = vp.index_select(1, slots).view(hkv, b, length, d).transpose(0, 1)
    return padded_causal_attention(q, keys, values, scale, mask=padded.mask)


_DECODE_HEAD_DIMS = (16, 32, 64, 128, 256)  # head dims the paged decode kernel tiles


class PagedOp(AttentionOp):
    """K/V in a shared pool of pages; the kernel is chosen per step type:

        decode (one token per row)   Triton split-KV kernel over the page table on CUDA (its torch
                                     reference on CPU); FlexAttention with `decode_kernel="flex"`
        multi-token (prefill, chunk  causal, no window: flash-attention varlen over the real tokens,
        of a prompt, continuation)   keys gathered from the pool when a row has cached context
                                     (fms.triton.varlen); packed steps take only this path. Padded
                                     steps where flash varlen cannot run (fp32, CPU): one SDPA call
                                     over keys gathered into padded rows
        any step, other variants     FlexAttention over the pool with a BlockMask built from the page
        (ALiBi, window, soft-cap)    tables; `prefill_kernel="flex"` sends every multi-token step here

    prefill_kernel: "auto" (above), "varlen" (padded steps by varlen too: its per-row reference off
    flash), "padded" (padded steps by one SDPA call even on flash; the op then takes no packed steps),
    "flex".
    """

    cache_options = frozenset({"page_size", "num_pages", "memory_gb", "memory_fraction"})
    uses_pages = True

    def __init__(self, decode_kernel: str = "auto", prefill_kernel: str = "auto"):
        if decode_kernel not in ("auto", "flex", "triton"):
            raise ValueError(f"decode_kernel must be 'auto', 'flex' or 'triton', got {decode_kernel!r}")
        if prefill_kernel not in PREFILL_KERNELS:
            raise ValueError(f"prefill_kernel must be one of {PREFILL_KERNELS}, got {prefill_kernel!r}")
        self.decode_kernel = decode_kernel
        self.prefill_kernel = prefill_kernel

    def create_cache(self, spec, max_batch_size, max_seq_len, **options):
        return PagedKVCache(spec, max_batch_size, max_seq_len, **options)

    def can_pack(self, variant, cache) -> bool:
        # On CUDA a packed step needs flash varlen (16-bit): in fp32 it would loop over rows, where a
        # padded step takes one SDPA call per layer.
        spec = cache.spec
        flash = spec.device.type != "cuda" or spec.dtype in FLASH_DTYPES
        return self._can_varlen(variant, cache) and cache.can_pack and self.prefill_kernel != "padded" and flash

    def why_no_graph_decode(self, variant, device):
        why = super().why_no_graph_decode(variant, device)
        if why is None and (self.decode_kernel == "flex" or variant.alibi or variant.softcap is not None):
            why = "the decode step would use FlexAttention, whose BlockMask is rebuilt every step"
        if why is None:
            from fms.triton.support import HAS_TRITON

            if not HAS_TRITON:
                why = "Triton is not installed (the graphed paged decode path is the Triton paged kernel)"
        return why

    def prefill_uses_flex(self, variant, cache) -> bool:
        return not self._can_varlen(variant, cache)

    def _can_varlen(self, variant, cache) -> bool:
        """Plain causal attention, which the varlen and padded SDPA paths compute (FlexAttention the rest)."""
        return self.prefill_kernel != "flex" and variant.is_causal_only and cache.window is None

    def _pads_prefill(self, q) -> bool:
        """Whether a padded multi-token step runs as one SDPA call over padded rows, not varlen."""
        if self.prefill_kernel == "auto":
            return not uses_flash(q)
        return self.prefill_kernel == "padded"

    def layer_kv_state(self, cache, layer_idx):
        return cache.layer_kv(layer_idx)

    def writes_kv_in_attend(self, cache, meta, variant):
        return (not meta.packed and meta.query_len == 1
                and self._fuses_kv_write(cache.spec.device, variant, cache.spec.head_dim))

    def _fuses_kv_write(self, device: torch.device, variant, head_dim: int) -> bool:
        """A one-token step's K/V go to the decode kernel (FMS_FUSE_KV_WRITE): eager CUDA steps of the Triton
        kernel; a traced step (compile scope "model") writes them in its graph."""
        return (FUSE_KV_WRITE and device.type == "cuda" and not torch.compiler.is_compiling()
                and self._triton_decode_for(variant, head_dim))

    def write_kv(self, k, v, state, meta):
        kp, vp = state  # (Hkv, slots, D)
        if torch.compiler.is_compiling():  # the layers compile scope: opaque to inductor, see _paged_kv_write_op
            _paged_kv_write_op(kp, vp, k, v, meta.slot_mapping)
        else:
            kv_write_reference(kp, vp, k, v, meta.slot_mapping)

    def attend(self, q, k, v, *, layer_idx, scale, variant, cache=None, meta=None, kv_written: bool = False):
        """kv_written: the caller stored this step's k/v with write_kv already."""
        if cache is None:
            return _contiguous_flex(q, k, v, scale, variant)
        if variant.sliding_window != cache.window:
            raise ValueError(
                f"layer {layer_idx} uses sliding window {variant.sliding_window} but the cache was built for "
                f"{cache.window}"
            )
        kp, vp = cache.layer_kv(layer_idx)  # (Hkv, slots, D)
        t = q.shape[2]
        new_kv = None
        if not kv_written:
            if t == 1 and not meta.packed and self._fuses_kv_write(q.device, variant, q.shape[-1]):
                new_kv = (k[:, :, 0], v[:, :, 0], meta.slot_mapping)  # stored by the decode kernel below
            else:  # traced inline under compile, where inductor may fuse it (see _paged_kv_write_op)
                kv_write_reference(kp, vp, k, v, meta.slot_mapping)
        if (meta.packed or t > 1) and self._can_varlen(variant, cache):
            if not meta.packed and self._pads_prefill(q):
                return _paged_padded(q, k, v, kp, vp, meta.get_padded_kv(), scale)
            return _paged_varlen(q, k, v, kp, vp, meta.get_varlen(), scale)
        if meta.packed:
            raise ValueError(f"a packed step needs causal attention without a window and a prefill_kernel other "
                             f"than 'flex'; got {variant} with prefill_kernel={self.prefill_kernel!r}")
        if t == 1 and self._use_triton_decode(q, variant):
            out = _paged_decode(
                q[:, :, 0], kp, vp, meta.page_table, meta.seq_lens, meta.page_size, scale,
                window=variant.sliding_window, new_kv=new_kv,
            )
            return out[:, :, None]
        ps, page_logical = meta.page_size, meta.page_logical
        score_mod = _positional_score_mod(
            variant, q.shape[1], q.device,
            lambda b_idx, q_idx: meta.q_start[b_idx] + q_idx,
            lambda kv_idx: page_logical[kv_idx // ps] * ps + kv_idx % ps,
        )
        # A KV mask block is one page; the fused kernel's key tile must divide it, and its default
        # (up to 128) does not for pages under 128 tokens (measured: scripts/probe_flex_page_sizes.py).
        options = {"BLOCK_N": min(ps, 64)} if q.is_cuda and t > 1 else None
        return flex_attention(q, kp[None], vp[None], scale=scale, block_mask=meta.get_block_mask(), score_mod=score_mod,
                              kernel_options=options)

    def _use_triton_decode(self, q, variant) -> bool:
        """Decode through fms.triton.paged_decode: the Triton kernel on CUDA, its torch
        reference (gather this row's pages, dense math) on CPU, where eager FlexAttention would
        score every slot of the pool."""
        if not self._triton_decode_for(variant, q.shape[-1]):
            if self.decode_kernel == "triton" and q.shape[-1] not in _DECODE_HEAD_DIMS:
                raise ValueError(f"decode_kernel='triton' needs head_dim in 16..256 (power of two), got {q.shape[-1]}")
            return False
        if self.decode_kernel == "triton" and not q.is_cuda:
            raise RuntimeError("decode_kernel='triton' needs CUDA")
        return True

    def _triton_decode_for(self, variant, head_dim: int) -> bool:
        """Whether one-token steps of this variant and head_dim take fms.triton.paged_decode (others take flex)."""
        return (self.decode_kernel != "flex" and not variant.alibi and variant.softcap is None
                and head_dim in _DECODE_HEAD_DIMS)


# The K/V write as an opaque operator, for write_kv under torch.compile (the layers compile scope). Traced, the write
# becomes an inductor kernel that mutates the layer's whole pool, and inductor benchmarks each candidate config of
# a mutating kernel on a backup of its mutated inputs: with the pool filling the GPU, a pinned host copy of the pool,
# taken and restored around each benchmark (torch._inductor.runtime.triton_heuristics, copy_args_to_cpu_if_needed).
# Granite-4.0-H-1B on the H200 (four attention layers, about 32 GB of pool each), cold LLMEngine start-up with
# compile_scope "layers": 96 and 89 s with the traced write, peak host memory 36 GB; 31 s and 1.6 GB with this op.
# On CUDA the op writes K and V in one Triton launch (fms.triton.kv_write): as two index_copy_ it cost 11% of batch-1
# decode against one launch (835 against 929 tok/s, final_project/results/session16/b). attend writes inline (the
# model scope keeps inductor's fusion of the write, and the backups at a cold start).
@torch.library.custom_op("fms::paged_kv_write", mutates_args=("k_pool", "v_pool"))
def _paged_kv_write_op(k_pool: torch.Tensor, v_pool: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       slot_mapping: torch.Tensor) -> None:
    kv_write(k_pool, v_pool, k, v, slot_mapping)  # K and V in one launch on CUDA


@_paged_kv_write_op.register_fake
def _(k_pool, v_pool, k, v, slot_mapping) -> None:
    return None


register_attention_op("sdpa", SDPAOp())
register_attention_op("flex", FlexOp())
register_attention_op("paged", PagedOp())


# ---------------------------------------------------------------------------------------------
# the layer
# ---------------------------------------------------------------------------------------------
class MultiHeadAttention(nn.Module):
    """GQA attention; the op chosen by name computes it and owns the KV cache."""

    def __init__(
        self,
        emb_dim: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        layer_idx: int,
        scale: float | None = None,
        bias: bool = False,
        rotary: RotaryEmbedding | None = None,
        variant: AttentionVariant | None = None,
        tp: TensorParallel | None = None,
    ):
        """tp: this rank's share under tensor parallel (fms.distributed): its query heads and KV heads
        (fms.distributed.sharding.head_ranges); the output projection is row-parallel (one all-reduce)."""
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
        self.layer_idx = layer_idx
        self.scale = scale if scale is not None else head_dim**-0.5
        self.head_dim = head_dim
        # q, k and v in one matrix (rows: q heads, k heads, v heads): one GEMM instead of three, which
        # at batch 1 is three weight reads of which two are too small to reach full bandwidth
        if tp is None:
            self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
            self.qkv_splits = (num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim)
            self.qkv_fused = Linear(emb_dim, sum(self.qkv_splits), bias=bias)
            self.dense = Linear(num_heads * head_dim, emb_dim, bias=bias)
        else:
            (q0, q1), (kv0, kv1) = head_ranges(num_heads, num_kv_heads, tp.rank, tp.world_size)
            self.num_heads, self.num_kv_heads = q1 - q0, kv1 - kv0
            self.qkv_splits = (self.num_heads * head_dim, self.num_kv_heads * head_dim, self.num_kv_heads * head_dim)
            d, k_at, v_at = head_dim, num_heads * head_dim, (num_heads + num_kv_heads) * head_dim  # full rows
            pieces = ((q0 * d, q1 * d), (k_at + kv0 * d, k_at + kv1 * d), (v_at + kv0 * d, v_at + kv1 * d))
            self.qkv_fused = column_parallel(emb_dim, pieces, (num_heads + 2 * num_kv_heads) * head_dim, bias=bias)
            self.dense = RowParallelLinear(num_heads * head_dim, emb_dim, tp, (q0 * d, q1 * d), bias=bias)
        self.rotary = rotary
        self.variant = variant or AttentionVariant()

    fuses_norm = True  # forward, project and output take the block's norm and residual (KernelConfig.fuse_norm)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, attn_name: str = "sdpa",
                norm: nn.Module | None = None, residual: torch.Tensor | None = None, residual_scale: float = 1.0,
                **attn_kwargs):
        """Attention of norm(x) (norm optional), added to residual times residual_scale where residual is given."""
        q, k, v = self.project(x, position_ids, norm=norm)
        return self.output(self.attend(q, k, v, attn_name, **attn_kwargs), residual, residual_scale)

    # The three parts of forward, for a driver that compiles the projections and runs the op between them
    # (fms.runtime.compiled, scope "layers"): the op, which picks its KV pool by layer index, stays out of
    # the compiled graphs, so that one compile serves every layer.
    def project(self, x: torch.Tensor, position_ids: torch.Tensor, rope: tuple | None = None,
                norm: nn.Module | None = None):
        """x (B, T, E) -> q (B, Hq, T, D), k and v (B, Hkv, T, D), rotated; rope: (cos, sin) from
        self.rotary.cos_sin(position_ids), else computed here; norm: the block's, applied to x first (fused into
        the qkv projection where it can be)."""
        b, t, _ = x.shape
        q, k, v = self.qkv_fused.forward_fused(x, norm).split(self.qkv_splits, dim=-1)
        q = q.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (B, Hq, T, D)
        k = k.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.rotary is not None:
            q, k = self.rotary(q, k, position_ids) if rope is None else self.rotary.apply(q, k, *rope)
        return q, k, v

    def attend(self, q, k, v, attn_name: str = "sdpa", **attn_kwargs) -> torch.Tensor:
        """The attention op named attn_name over this layer's q, k, v (and its cache): (B, Hq, T, D)."""
        return get_attention_op(attn_name).attend(q, k, v, layer_idx=self.layer_idx, scale=self.scale,
                                                  variant=self.variant, **attn_kwargs)

    def output(self, out: torch.Tensor, residual: torch.Tensor | None = None,
               residual_scale: float = 1.0) -> torch.Tensor:
        """The output projection of the op's (B, Hq, T, D) result: (B, T, E), added to residual times
        residual_scale where residual is given (fused into the projection where it can be)."""
        b, _, t, _ = out.shape
        return self.dense.forward_fused(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim),
                                        residual=residual, residual_scale=residual_scale)
