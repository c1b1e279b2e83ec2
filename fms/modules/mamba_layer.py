"""MambaLayer: a Mamba2 mixer with the attention layer's call signature, run against the cache's state pool.

The pool (fms.cache.state.MambaStatePool) holds each running sequence's conv and SSM state in the
KV manager's slot for it. A decode step updates its rows' SSM states in place, one fused kernel
reading and writing each row once (fms.triton.mamba_decode), and gathers and scatters back the
small conv states; a multi-token step gathers both (index_select), runs, and scatters them back (index_copy_).
"""

import torch
from torch import nn

from fms.cache.state import MambaStateSpec
from fms.modules.ssm import Mamba2Config, Mamba2Mixer, Mamba2State


class MambaLayer(nn.Module):
    """A Mamba2 mixer with the attention layer's call signature; its state lives in the cache's pool."""

    def __init__(self, config: Mamba2Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.mamba = Mamba2Mixer(config)

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
        heads = m.A_log.shape[0]
        a = torch.empty(heads).uniform_(1.0, 16.0, generator=generator)
        m.A_log.copy_(a.log())
        dt = torch.exp(torch.empty(heads).uniform_(0, 1, generator=generator) * (torch.log(torch.tensor(0.1))
                                                                                   - torch.log(torch.tensor(1e-3)))
                       + torch.log(torch.tensor(1e-3)))
        m.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        m.D.fill_(1.0)
        m.norm.weight.fill_(1.0)
        kernel = m.conv1d.weight.shape[-1]
        bound = kernel**-0.5  # nn.Conv1d's default range for a depthwise kernel
        m.conv1d.weight.copy_(torch.empty(m.conv1d.weight.shape).uniform_(-bound, bound, generator=generator))
        if m.conv1d.bias is not None:
            m.conv1d.bias.zero_()
