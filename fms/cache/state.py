"""Per-sequence Mamba2 state slots beside the KV cache (the device pool; slot ids are the KV manager's).

State pool (one per cache, all Mamba layers):

    conv[mamba layer i] : (num_slots + 1, conv_dim, K-1)          model dtype
    ssm [mamba layer i] : (num_slots + 1, heads, head_dim, N)     fp32 (the recurrence accumulates over
                                                                   the whole sequence; bf16 would drift)
    slot -> row in both: the KV manager's slot of a sequence (zeroed when the sequence starts)
    row num_slots is a scratch slot: padded rows of a CUDA-graph batch read and write it, no sequence holds it

Each layer's tensors are separate allocations, not views of one block: under torch.compile a write
through a view of a graph input is replayed onto its whole base (a copy of every slot of every layer),
and a step touches only its rows. A decode step updates its rows' SSM states in place, one fused kernel
reading and writing each row once (fms.triton.mamba_decode), and gathers and scatters back the
small conv states; a multi-token step gathers both (index_select), runs, and scatters them back (index_copy_).
"""

from dataclasses import dataclass

import torch



@dataclass(frozen=True)
class MambaStateSpec:
    """One sequence's recurrent state in every Mamba layer: its shapes, and so its bytes per slot."""

    layers: tuple[int, ...]  # model layer indices that are Mamba layers
    dtype: torch.dtype  # of the conv state; the SSM state is fp32
    conv_dim: int
    conv_kernel: int
    num_heads: int
    head_dim: int
    state_size: int

    @property
    def bytes_per_layer(self) -> int:
        conv = self.conv_dim * (self.conv_kernel - 1) * torch.empty((), dtype=self.dtype).element_size()
        return conv + self.num_heads * self.head_dim * self.state_size * 4

    @property
    def bytes_per_sequence(self) -> int:
        return len(self.layers) * self.bytes_per_layer


class MambaStatePool:
    def __init__(self, spec: MambaStateSpec, num_slots: int, device):
        c = spec
        self.spec = spec
        n = len(spec.layers)
        self.conv = [torch.zeros(num_slots + 1, c.conv_dim, c.conv_kernel - 1, dtype=spec.dtype, device=device)
                     for _ in range(n)]
        self.ssm = [torch.zeros(num_slots + 1, c.num_heads, c.head_dim, c.state_size, dtype=torch.float32,
                                device=device) for _ in range(n)]
        self.scratch_slot = num_slots
        self._layer = {layer: i for i, layer in enumerate(spec.layers)}

    @property
    def tensors(self) -> list[torch.Tensor]:
        return [*self.conv, *self.ssm]

    @property
    def num_slots(self) -> int:
        return self.scratch_slot

    def zero(self, slots: list[int]) -> None:
        """A new sequence starts from the zero state in each of its (KV manager's) slots."""
        if not slots:
            return
        idx = torch.tensor(slots, dtype=torch.int64).to(self.conv[0].device if self.conv else "cpu")
        for conv, ssm in zip(self.conv, self.ssm):
            conv.index_fill_(0, idx, 0)
            ssm.index_fill_(0, idx, 0)

    def layer_pools(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(conv, ssm) of one Mamba layer, every slot."""
        i = self._layer[layer_idx]
        return self.conv[i], self.ssm[i]

    def layer_state(self, layer_idx: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A gathered copy (conv, ssm) of the rows (only those rows are read); write it back with store()."""
        conv, ssm = self.layer_pools(layer_idx)
        return conv.index_select(0, slots), ssm.index_select(0, slots)

    def store(self, layer_idx: int, slots: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor) -> None:
        """Write the rows back (only those rows are written)."""
        conv, ssm = self.layer_pools(layer_idx)
        conv.index_copy_(0, slots, conv_state)
        ssm.index_copy_(0, slots, ssm_state)
