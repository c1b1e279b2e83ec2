"""MambaLayer: a Mamba2 mixer with the attention layer's call signature, run against the cache's state pool.

The pool (fms.cache.state.MambaStatePool) holds each running sequence's conv and SSM state in the
KV manager's slot for it. A decode step updates its rows' SSM states in place, one fused kernel
reading and writing each row once (fms.triton.mamba_decode), and gathers and scatters back the
small conv states; a multi-token step gathers both (index_select), runs, and scatters them back (index_copy_).
"""

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from fms.cache.state import MambaStateSpec
from fms.distributed.group import TensorParallel
from fms.distributed.sharding import TensorShard, set_shards, split_range
from fms.modules.parallel import RowParallelLinear, column_parallel
from fms.modules.ssm import GatedRMSNorm, Mamba2Config, Mamba2Mixer, Mamba2State


class MambaLayer(nn.Module):
    """A Mamba2 mixer with the attention layer's call signature; its state lives in the cache's pool."""

    def __init__(self, config: Mamba2Config, layer_idx: int, tp: TensorParallel | None = None):
        """tp: under tensor parallel, this rank's heads (see sharded_mixer)."""
        super().__init__()
        self.layer_idx = layer_idx
        self.mamba = Mamba2Mixer(config) if tp is None else sharded_mixer(config, tp)

    def decode_cache(self, cache, meta):
        """For a decode step (one token per row, no prefix-cache checkpoint): a stand-in for `cache` holding only
        this layer's state pools, so that a compiled function taking it serves every Mamba layer
        (fms.runtime.compiled); None for any other step, which runs uncompiled."""
        if cache is None or meta is None or meta.packed or getattr(meta, "checkpoints", None) is not None:
            return None
        return _LayerStateCache(cache.state_pool.layer_view(self.layer_idx))

    def forward(self, x, position_ids=None, attn_name=None, cache=None, meta=None, **_):
        if cache is None:
            # no cache: the whole (right-padded) sequence from the zero state; padding sits after
            # the real tokens, so it cannot reach them
            return self.mamba(x)
        pool, slots = cache.state_pool, meta.state_slots
        # states the prefix cache checkpoints in this step (a hybrid's prefill), emitted by the same scan
        targets = getattr(meta, "checkpoints", None)
        if x.shape[1] == 1 and not meta.packed:
            # decode: one recurrent step on the rows of the slots, updated in place in the pools
            conv, ssm = pool.layer_pools(self.layer_idx)
            out = self.mamba.step_in_pools(x, conv, ssm, slots, meta.num_new_tokens > 0)
            if targets is not None:  # one token per row: the state after it, just written to the slot
                rows = slots.index_select(0, targets.rows.to(slots.device))
                cache.checkpoint_store.write(self.layer_idx, targets.pages, *pool.layer_state(self.layer_idx, rows))
            return out
        state = Mamba2State(*pool.layer_state(self.layer_idx, slots))
        emit = None if targets is None else (targets.rows, targets.num_tokens)
        if meta.packed:  # one row of every sequence's new tokens back to back
            out = self.mamba(x, state=state, cu_seqlens=meta.varlen.cu_q, emit=emit)
        else:
            out = self.mamba(x, state=state, valid_lens=meta.num_new_tokens, emit=emit)
        if emit is not None:
            out, emitted = out
            cache.checkpoint_store.write(self.layer_idx, targets.pages, emitted.conv_state, emitted.ssm_state)
        pool.store(self.layer_idx, slots, state.conv_state, state.ssm_state)
        return out

    @staticmethod
    def state_spec(config: Mamba2Config, layers: tuple[int, ...], dtype: torch.dtype) -> MambaStateSpec:
        """The cache's per-slot state spec for Mamba layers `layers` of this config."""
        return MambaStateSpec(layers, dtype, config.conv_dim, config.conv_kernel, config.num_heads, config.head_dim,
                              config.state_size)

    @torch.no_grad()
    def reset_parameters_seeded(self, generator):
        """Mamba-style init for random weights: A in [1, 16], dt in [1e-3, 0.1], D = 1."""
        m = self.mamba
        # a tensor-parallel shard draws the full tensors (the same generator use) and keeps its slice
        head_shard, conv_shard = (getattr(x, "shards", {}).get(n) for x, n in ((m, "A_log"), (m.conv1d, "weight")))
        heads = head_shard.full_shape[0] if head_shard else m.A_log.shape[0]
        local_heads = head_shard.take if head_shard else (lambda t: t)
        # drawn on the generator's device (a CUDA one under get_model(init_on_device=True)), as llama's _normal_ does
        device = generator.device if generator is not None else m.A_log.device
        a = torch.empty(heads, device=device).uniform_(1.0, 16.0, generator=generator)
        m.A_log.copy_(local_heads(a.log()))
        dt = torch.exp(torch.empty(heads, device=device).uniform_(0, 1, generator=generator)
                       * (torch.log(torch.tensor(0.1)) - torch.log(torch.tensor(1e-3))) + torch.log(torch.tensor(1e-3)))
        m.dt_bias.copy_(local_heads(dt + torch.log(-torch.expm1(-dt))))  # inverse softplus
        m.D.fill_(1.0)
        m.norm.weight.fill_(1.0)
        kernel = m.conv1d.weight.shape[-1]
        bound = kernel**-0.5  # nn.Conv1d's default range for a depthwise kernel
        conv = torch.empty(conv_shard.full_shape if conv_shard else m.conv1d.weight.shape, device=device)
        conv.uniform_(-bound, bound, generator=generator)
        m.conv1d.weight.copy_(conv_shard.take(conv) if conv_shard else conv)
        if m.conv1d.bias is not None:
            m.conv1d.bias.zero_()


class _LayerStateCache:
    """What MambaLayer.forward reads of a cache in a decode step, for one layer: its state pools."""

    def __init__(self, state_pool):
        self.state_pool = state_pool


class CrossRankGatedRMSNorm(GatedRMSNorm):
    """GatedRMSNorm over one group whose channels lie on every rank (Mamba2 with one B/C group, heads split):
    each token's sum of squares is all-reduced, then each rank scales its own channels."""

    def __init__(self, size: int, full_size: int, eps: float, tp: TensorParallel):
        super().__init__(size, size, eps)
        self.full_size, self.tp = full_size, tp

    def forward(self, y: torch.Tensor, z: torch.Tensor, fused: bool = False) -> torch.Tensor:
        # fused (fla's kernel) would normalize this rank's channels alone: always the two-pass form here
        u = y.float() * F.silu(z.float())
        sum_sq = self.tp.all_reduce(u.pow(2).sum(-1, keepdim=True))  # (..., 1) over all ranks' channels
        return (self.weight.float() * u * torch.rsqrt(sum_sq / self.full_size + self.eps)).to(z.dtype)


def sharded_mixer(c: Mamba2Config, tp: TensorParallel) -> Mamba2Mixer:
    """A Mamba2 mixer computing heads [h0, h1) of the full one: a mixer of the local shape whose projections
    and per-head parameters hold those heads' rows, recorded as shards of the full tensors.

        in_proj rows   [ z: nh*P | x: nh*P | B: G*N | C: G*N | dt: nh ]   -> its heads' z, x, dt; its groups' B, C
        conv channels  [ x: nh*P | B: G*N | C: G*N ]                       -> the same x, B, C channels
        A_log, D, dt_bias (nh), norm weight (nh*P)                          -> its heads
        out_proj       row-parallel over its heads' channels (one all-reduce)

    Groups: with G divisible by the ranks each rank holds whole groups (G/ranks of them) and its norm is
    local; with one group (every released Granite-4.0-H) B and C are replicated and the gated norm, which
    spans all heads, all-reduces each token's sum of squares (a second, small all-reduce per layer).
    """
    n, r = tp.world_size, tp.rank
    nh, G, N, P = c.num_heads, c.num_groups, c.state_size, c.head_dim
    if nh % n:
        raise ValueError(f"tensor parallel size {n} must divide the Mamba2 heads (mamba_num_heads={nh})")
    if G != 1 and G % n:
        raise ValueError(f"tensor parallel needs mamba_num_groups ({G}) to be 1 or a multiple of the size {n}")
    h0, h1 = split_range(nh, r, n)
    g0, g1 = (0, 1) if G == 1 else split_range(G, r, n)
    mixer = Mamba2Mixer(replace(c, num_heads=h1 - h0, num_groups=g1 - g0))
    inner, gn = c.inner_dim, G * N
    x_at, b_at, c_at, dt_at = inner, 2 * inner, 2 * inner + gn, 2 * inner + 2 * gn
    mixer.in_proj = column_parallel(
        c.hidden_size,
        ((h0 * P, h1 * P), (x_at + h0 * P, x_at + h1 * P), (b_at + g0 * N, b_at + g1 * N),
         (c_at + g0 * N, c_at + g1 * N), (dt_at + h0, dt_at + h1)),
        2 * inner + 2 * gn + nh, bias=c.use_bias)
    channels = ((h0 * P, h1 * P), (inner + g0 * N, inner + g1 * N), (inner + gn + g0 * N, inner + gn + g1 * N))
    conv = mixer.conv1d
    set_shards(conv, weight=TensorShard((c.conv_dim, *conv.weight.shape[1:]), 0, channels))
    if conv.bias is not None:
        set_shards(conv, bias=TensorShard((c.conv_dim,), 0, channels))
    heads = TensorShard((nh,), 0, ((h0, h1),))
    set_shards(mixer, A_log=heads, D=heads, dt_bias=heads)
    if G == 1 and n > 1:
        mixer.norm = CrossRankGatedRMSNorm((h1 - h0) * P, inner, c.norm_eps, tp)
    set_shards(mixer.norm, weight=TensorShard((inner,), 0, ((h0 * P, h1 * P),)))
    mixer.out_proj = RowParallelLinear(inner, c.hidden_size, tp, (h0 * P, h1 * P), bias=c.use_bias)
    return mixer
