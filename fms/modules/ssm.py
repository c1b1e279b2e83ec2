"""Mamba2 mixer (Granite-4.0-H): config, per-sequence recurrent state, chunked SSD prefill and recurrent decode."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fms.triton import ssd_scan
from fms.triton.mamba_decode import mamba_decode_update
from fms.triton.ssd_reference import SsdScan, check_emit, ssd_scan_recurrent, ssd_scan_reference, ssd_step
from fms.modules.kernel_config import SSD_SCAN_NAMES, KernelConfig, apply_kernels, check_kernel_config
from fms.modules.linear import Linear

__all__ = [
    "Mamba2Config",
    "Mamba2State",
    "Mamba2Mixer",
    "GatedRMSNorm",
    "mamba_state_bytes",
    "packed_causal_conv",
    "ssd_scan_reference",
    "ssd_scan_recurrent",
    "ssd_step",
    "select_ssd_scan",
    "check_ssd_scan_available",
    "SSD_SCAN_NAMES",
]


@dataclass(frozen=True)
class Mamba2Config:
    """Shape of one Mamba2 mixer. Field names follow fms; HF names in comments."""

    hidden_size: int
    num_heads: int  # mamba_n_heads
    head_dim: int  # mamba_d_head
    state_size: int  # mamba_d_state
    num_groups: int = 1  # mamba_n_groups
    conv_kernel: int = 4  # mamba_d_conv
    chunk_size: int = 256  # mamba_chunk_size
    use_conv_bias: bool = True  # mamba_conv_bias
    use_bias: bool = False  # mamba_proj_bias
    norm_eps: float = 1e-5  # rms_norm_eps
    time_step_min_max: tuple[float, float] = (0.0, float("inf"))  # time_step_limit

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_heads", "head_dim", "state_size", "num_groups", "conv_kernel", "chunk_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Mamba2Config.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_groups != 0:
            raise ValueError(
                f"Mamba2Config.num_heads ({self.num_heads}) must be divisible by "
                f"num_groups ({self.num_groups}): each group of B/C is shared by num_heads/num_groups heads"
            )
        if not self.norm_eps > 0:
            raise ValueError(f"Mamba2Config.norm_eps must be > 0, got {self.norm_eps!r}")
        limits = tuple(self.time_step_min_max)
        if len(limits) != 2 or not 0.0 <= limits[0] <= limits[1]:
            raise ValueError(
                "Mamba2Config.time_step_min_max must be (min, max) with 0 <= min <= max, "
                f"got {self.time_step_min_max!r}"
            )
        # Accept a list (as HF config.json serialises it) but store a hashable tuple.
        object.__setattr__(self, "time_step_min_max", (float(limits[0]), float(limits[1])))

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def conv_dim(self) -> int:
        # The conv runs over x, B and C together.
        return self.inner_dim + 2 * self.num_groups * self.state_size


@dataclass(frozen=True)
class Mamba2State:
    """Recurrent state of one mixer for a batch of sequences.

    conv_state [B, conv_dim, K-1]: the last K-1 conv inputs (xBC before the conv), oldest first, model dtype.
    ssm_state  [B, num_heads, head_dim, state_size]: the SSM state S, fp32.

    `Mamba2Mixer.forward(x, state)` reads both as the state before x and overwrites them in place with the
    state after the last real token. A serving engine that keeps one slot per sequence in a pool gathers the
    rows of the running sequences into a Mamba2State, calls forward, and scatters the rows back: the mixer
    never sees the pool.
    """

    conv_state: Tensor
    ssm_state: Tensor

    @classmethod
    def zeros(
        cls, batch: int, config: Mamba2Config, dtype: torch.dtype, device: torch.device | str | None = None
    ) -> Mamba2State:
        conv = torch.zeros(batch, config.conv_dim, config.conv_kernel - 1, dtype=dtype, device=device)
        ssm = torch.zeros(
            batch, config.num_heads, config.head_dim, config.state_size, dtype=torch.float32, device=device
        )
        return cls(conv_state=conv, ssm_state=ssm)


def mamba_state_bytes(config: Mamba2Config, dtype: torch.dtype) -> int:
    """Bytes of one sequence's state for one mixer: conv state in `dtype`, ssm state in fp32."""
    conv = config.conv_dim * (config.conv_kernel - 1) * torch.empty((), dtype=dtype).element_size()
    ssm = config.num_heads * config.head_dim * config.state_size * 4
    return conv + ssm


def _ssd_scan_fla(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    initial_state: Tensor | None = None,
    output_final_state: bool = True,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """SSD scan through flash-linear-attention's scalar-decay gated linear attention (Triton, CUDA only).

    cu_seqlens (N+1,): x holds N sequences back to back in one row (b = 1); initial_state and the final
    state then have one row per sequence.

    chunk_simple_gla computes S_t = exp(g_t) S_{t-1} + k_t^T v_t, o_t = scale * q_t S_t with S in [K, V]
    layout, which is the SSD recurrence with q=C, k=B, v=x*dt, g=dt*A, scale=1, S = our state transposed.
    fla uses its own chunk length; `chunk_size` only matters for the reference.
    """
    from fla.ops.simple_gla import chunk_simple_gla

    nh, G = x.shape[2], B.shape[2]
    # fla wants one k/q per head: expand each group to the heads that share it (head h -> group h // (nh/G)).
    q = C.repeat_interleave(nh // G, dim=2)  # (b, T, nh, n)
    k = B.repeat_interleave(nh // G, dim=2)
    # The kernel's dots need one dtype; x*dt is rounded to the model dtype as mamba_ssm's kernels do.
    v = (x.float() * dt[..., None]).to(k.dtype)  # (b, T, nh, p)
    h0 = None if initial_state is None else initial_state.float().transpose(-1, -2)  # (b, nh, n, p): fla's K x V
    y, final = chunk_simple_gla(
        q, k, v, g=dt * A, scale=1.0, initial_state=h0, output_final_state=output_final_state,
        cu_seqlens=None if cu_seqlens is None else cu_seqlens.long(),
    )
    return y.float(), (None if final is None else final.float().transpose(-1, -2))


@functools.cache
def _fla_available() -> bool:
    try:
        from fla.ops.simple_gla import chunk_simple_gla  # noqa: F401
    except Exception:  # fla missing, or present but unusable (no Triton / driver)
        return False
    return True


def check_ssd_scan_available(name: str) -> None:
    """Raise RuntimeError if the scan `name` (one of SSD_SCAN_NAMES) needs a kernel that cannot be imported here."""
    if name == "fla" and not _fla_available():
        raise RuntimeError(
            "SSD scan 'fla' needs flash-linear-attention (pip install flash-linear-attention) with a working "
            "Triton; it is not importable here. Use 'triton', 'reference' or 'auto'."
        )
    if name == "triton" and not ssd_scan.HAS_TRITON:
        raise RuntimeError("SSD scan 'triton' needs Triton, which is not importable here. Use 'reference' or 'auto'.")


def select_ssd_scan(device: torch.device, name: str = "auto") -> SsdScan:
    """The one place that picks the prefill scan for a KernelConfig.ssd_scan name: "auto" is our Triton kernel
    (ssd_scan.ssd_scan_triton) on CUDA, else the reference; any other name is that scan (SSD_SCAN_NAMES)."""
    if name not in SSD_SCAN_NAMES:
        raise ValueError(f"unknown SSD scan {name!r}; allowed: {', '.join(SSD_SCAN_NAMES)}")
    if name == "reference":
        return ssd_scan_reference
    if name == "recurrent":
        return ssd_scan_recurrent
    if name in ("fla", "triton"):
        check_ssd_scan_available(name)
        if not (device.type == "cuda" or (name == "triton" and ssd_scan.can_run_triton(device))):
            raise RuntimeError(f"SSD scan {name!r} runs on CUDA only, got a tensor on {device}")
        return _ssd_scan_fla if name == "fla" else ssd_scan.ssd_scan_triton
    if device.type == "cuda" and ssd_scan.HAS_TRITON:
        return ssd_scan.ssd_scan_triton
    return ssd_scan_reference


def _takes_packed_sequences(scan: SsdScan) -> bool:
    """The scan runs over packed sequences in one row (cu_seqlens): the Triton kernels (ours, fla's)."""
    return scan is _ssd_scan_fla or scan is ssd_scan.ssd_scan_triton


def _uses_fla_conv_and_norm(scan: SsdScan, device: torch.device) -> bool:
    """The CUDA fast path: with a Triton scan come fla's Triton causal conv and gated norm when fla is installed
    (same math; the mixer's elementwise work otherwise costs more than the scan, final_project section 6)."""
    return _takes_packed_sequences(scan) and device.type == "cuda" and _fla_available()


# ---------------------------------------------------------------------------------------------------------------


def conv_state_after(xBC: Tensor, conv_state: Tensor, valid_lens: Tensor | None) -> Tensor:
    """The conv state [b, D, K-1] after the real inputs of xBC [b, T, D], without building the
    (b, D, K-1+T) window (valid_lens None: every row has T real inputs)."""
    batch, T, dim = xBC.shape
    lens = torch.full((batch,), T, device=xBC.device) if valid_lens is None else valid_lens.to(xBC.device).long()
    starts = torch.arange(batch, device=xBC.device) * T
    return packed_conv_state_after(xBC.reshape(batch * T, dim), conv_state, starts, starts + lens)


def packed_conv_state_after(x: Tensor, conv_state: Tensor, starts: Tensor, ends: Tensor) -> Tensor:
    """Conv state [n, D, K-1] of n sequences whose inputs are x[starts[i]:ends[i]] (x [total, D]),
    continuing from conv_state: column j is input ends[i] - (K-1) + j, or the carried state's column
    where that input lies before starts[i]."""
    n, dim, keep = conv_state.shape
    pos = ends.long()[:, None] - keep + torch.arange(keep, device=x.device)  # (n, K-1) inputs, flat
    from_x = x.index_select(0, pos.clamp(0, x.shape[0] - 1).flatten()).view(n, keep, dim).transpose(1, 2)
    back = (pos - starts.long()[:, None] + keep).clamp(0, keep - 1)  # carried-state column
    from_state = conv_state.gather(2, back[:, None, :].expand(n, dim, keep))
    return torch.where((pos >= starts.long()[:, None])[:, None, :], from_x.to(conv_state.dtype), from_state)


def packed_causal_conv(x: Tensor, conv_state: Tensor, cu_seqlens: Tensor, weight: Tensor,
                       bias: Tensor | None) -> Tensor:
    """Depthwise causal conv (no activation) of n sequences packed in x [N, D], sequence i at
    x[cu_seqlens[i]:cu_seqlens[i+1]] (each >= 1 input), continuing from conv_state [n, D, K-1];
    weight [D, 1, K] as nn.Conv1d's. Returns [N, D]. One conv over all sequences, no host sync.

    Each sequence's carried state is laid right before its inputs in one extended row, so no window
    of K reaches into the previous sequence (K-1 = 2, lengths 2 and 3):

        extended:  s0 s0 | x0 x1 | s1 s1 | x2 x3 x4       sequence i's input t at t + (i+1)(K-1)
        conv out:        o0 o1         o2 o3 o4           output t is the window ending there
    """
    num_tokens, dim = x.shape
    n, _, keep = conv_state.shape
    cu = cu_seqlens.to(x.device, torch.long)
    seq_of_token = torch.repeat_interleave(torch.arange(n, device=x.device), cu[1:] - cu[:-1],
                                           output_size=num_tokens)  # (N,)
    token_pos = torch.arange(num_tokens, device=x.device) + (seq_of_token + 1) * keep  # (N,) in the extended row
    state_pos = (cu[:-1] + torch.arange(n, device=x.device) * keep)[:, None] + torch.arange(keep, device=x.device)
    extended = x.new_empty(num_tokens + n * keep, dim)  # (N + n(K-1), D), time-major
    extended.index_copy_(0, token_pos, x)
    extended.index_copy_(0, state_pos.flatten(), conv_state.to(x.dtype).transpose(1, 2).reshape(n * keep, dim))
    out = F.conv1d(extended.t()[None], weight, bias, groups=dim)  # (1, D, N + (n-1)(K-1)): window ending at p+K-1
    return out[0].t().index_select(0, token_pos - keep)  # (N, D)


class GatedRMSNorm(nn.Module):
    """RMSNorm applied after gating (norm_before_gate=False): weight * rmsnorm(y * silu(z)), per group of channels.

    The statistics run in fp32 and the result is cast to z's dtype once, as HF and mamba_ssm do.
    """

    def __init__(self, size: int, group_size: int, eps: float) -> None:
        super().__init__()
        if size % group_size != 0:
            raise ValueError(f"GatedRMSNorm size ({size}) must be a multiple of group_size ({group_size})")
        self.weight = nn.Parameter(torch.ones(size))
        self.group_size = group_size
        self.eps = eps

    def forward(self, y: Tensor, z: Tensor, fused: bool = False) -> Tensor:
        """fused: flash-linear-attention's Triton gated RMSNorm (CUDA, fla installed), same math in one pass."""
        if fused:
            from fla.modules.norm.layernorm_gated import rmsnorm_fn

            shape = z.shape
            out = rmsnorm_fn(y.reshape(-1, shape[-1]), self.weight, None, z=z.reshape(-1, shape[-1]), eps=self.eps,
                             group_size=self.group_size, norm_before_gate=False)
            return out.view(shape).to(z.dtype)
        u = y.float() * F.silu(z.float())
        groups = u.unflatten(-1, (-1, self.group_size))  # (..., num_groups, group_size)
        groups = groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * groups.flatten(-2)).to(z.dtype)


class Mamba2Mixer(nn.Module):
    """Mamba2 mixer with HF granitemoehybrid parameter names (`model.layers.{i}.mamba.X` -> `mixer.X`).

    forward(x [B, T, H], state=None, valid_lens=None) -> [B, T, H]
      T > 1: chunked SSD scan (prefill); T == 1: one recurrent step (decode). Same weights, picked by T.
      state: Mamba2State read as the initial state and updated in place; None = start from zeros, keep nothing.
      valid_lens [B] int: rows are right-padded; only the first valid_lens[b] tokens of row b are real. Padding
        never reaches the state (dt = 0 there, and the conv state is cut at the last real input); rows with
        valid_lens 0 keep their state bit for bit. Outputs at padded positions are finite but meaningless.
      cu_seqlens [n+1] int: instead of padded rows, x [1, N, H] packs n sequences back to back (no padding);
        state then has n rows (see _forward_packed).
      emit (seq [K], num_tokens [K]) int: also return the states on the way (prefix-cache checkpoints), from
        the same scan: forward then returns (out, Mamba2State with K rows), row k being sequence seq[k]'s state
        (conv window and SSM state) after its first num_tokens[k] tokens of x (state given: continuing it).
    """

    def __init__(self, config: Mamba2Config) -> None:
        super().__init__()
        self.config = config
        c = config
        self.in_proj = Linear(c.hidden_size, c.inner_dim + c.conv_dim + c.num_heads, bias=c.use_bias)
        # Depthwise; padding is applied by hand from the carried conv state, so the module's own is 0.
        self.conv1d = nn.Conv1d(c.conv_dim, c.conv_dim, c.conv_kernel, groups=c.conv_dim, bias=c.use_conv_bias)
        self.dt_bias = nn.Parameter(torch.ones(c.num_heads))
        # S4D-real init as HF: A_h = -(h+1). Checkpoints overwrite these.
        # (computed on the CPU and moved: on the meta device the log's Python kernel would import torch._dynamo)
        self.A_log = nn.Parameter(torch.arange(1, c.num_heads + 1, dtype=torch.float32, device="cpu").log().to(
            self.dt_bias.device))
        self.D = nn.Parameter(torch.ones(c.num_heads))
        self.norm = GatedRMSNorm(c.inner_dim, group_size=c.inner_dim // c.num_groups, eps=c.norm_eps)
        self.out_proj = Linear(c.inner_dim, c.hidden_size, bias=c.use_bias)
        self.kernels = KernelConfig()

    def check_kernels(self, kernels: KernelConfig) -> None:
        """RuntimeError for a scan whose kernel cannot be imported here (one that needs CUDA is refused when a
        tensor on another device arrives)."""
        check_ssd_scan_available(check_kernel_config(kernels).ssd_scan)

    def set_kernels(self, kernels: KernelConfig) -> None:
        """Use kernels.ssd_scan for prefill, and kernels in the projections."""
        self.check_kernels(kernels)
        apply_kernels(self, kernels)
        self.kernels = kernels

    def forward(self, x: Tensor, state: Mamba2State | None = None, valid_lens: Tensor | None = None,
                cu_seqlens: Tensor | None = None, emit: tuple[Tensor, Tensor] | None = None):
        c = self.config
        if x.dim() != 3 or x.shape[-1] != c.hidden_size or x.shape[1] == 0:
            raise ValueError(f"x must be [batch, seq_len >= 1, {c.hidden_size}], got {tuple(x.shape)}")
        if cu_seqlens is not None:
            return self._forward_packed(x, state, cu_seqlens, valid_lens, emit)
        batch, T, _ = x.shape
        self._check_state(state, batch)
        self._check_valid_lens(valid_lens, batch, T)
        if emit is not None and (valid_lens is None or valid_lens.device.type == "cpu"):  # no device sync
            check_emit(emit, batch, T if valid_lens is None else valid_lens)

        if T == 1:
            is_active = None if valid_lens is None else valid_lens.to(x.device) > 0
            if state is None:
                state = Mamba2State.zeros(batch, c, x.dtype, x.device)
            out, conv_state, ssm_state = self.step(x, state.conv_state, state.ssm_state, is_active)
            state.conv_state.copy_(conv_state)
            state.ssm_state.copy_(ssm_state)
            if emit is None:
                return out
            rows = emit[0].to(x.device).long()  # after one token: the state after the step
            return out, Mamba2State(conv_state.index_select(0, rows), ssm_state.index_select(0, rows))
        return self._prefill(x, state, select_ssd_scan(x.device, self.kernels.ssd_scan), valid_lens=valid_lens,
                             emit=emit)

    def _prefill(self, x: Tensor, state: Mamba2State | None, scan: SsdScan, valid_lens: Tensor | None = None,
                 cu_seqlens: Tensor | None = None, emit: tuple[Tensor, Tensor] | None = None):
        """The chunked-scan path over right-padded rows (valid_lens), or over packed sequences
        (cu_seqlens, x [1, N, H]; only with a scan that takes them, _takes_packed_sequences). emit: see forward."""
        c = self.config
        batch, T, _ = x.shape
        is_real = None  # (b, T) bool
        if valid_lens is not None:
            is_real = torch.arange(T, device=x.device) < valid_lens.to(x.device)[:, None]

        z, xBC, dt_raw = self.in_proj(x).split([c.inner_dim, c.conv_dim, c.num_heads], dim=-1)

        fused = _uses_fla_conv_and_norm(scan, x.device)
        if emit is not None and scan is _ssd_scan_fla:
            scan = ssd_scan.ssd_scan_triton  # same math; fla's kernel cannot emit states on the way
        conv_inputs, initial_conv = xBC, None if state is None else state.conv_state
        xBC, conv_state = self._causal_conv(xBC, initial_conv, valid_lens, fused, cu_seqlens)
        xs, B, C = xBC.split([c.inner_dim, c.num_groups * c.state_size, c.num_groups * c.state_size], dim=-1)

        dt = self._dt(dt_raw)  # (b, T, nh)
        if is_real is not None:
            # exp(0 * A) = 1 and 0 * x ⊗ B = 0: a padded step is an exact identity on the SSM state.
            dt = dt.masked_fill(~is_real[..., None], 0.0)
        A = -torch.exp(self.A_log.float())
        initial = None if state is None else state.ssm_state

        y, ssm_state, *emitted = scan(
            xs.view(batch, T, c.num_heads, c.head_dim),
            dt,
            A,
            B.view(batch, T, c.num_groups, c.state_size),
            C.view(batch, T, c.num_groups, c.state_size),
            c.chunk_size,
            initial,
            state is not None,
            **({} if cu_seqlens is None else {"cu_seqlens": cu_seqlens}),
            **({} if emit is None else {"emit": emit}),
        )

        y = y + self.D.float()[:, None] * xs.view(batch, T, c.num_heads, c.head_dim).float()
        out = self.out_proj(self.norm(y.reshape(batch, T, c.inner_dim), z, fused=fused))

        if emit is not None:
            # the conv windows at the emitted points: the last K-1 inputs before each, from the carried state
            # where they precede this call (read before the state is overwritten below)
            seq, num_tokens = emit[0].to(x.device).long(), emit[1].to(x.device).long()
            starts = seq * T if cu_seqlens is None else cu_seqlens.to(x.device).long().index_select(0, seq)
            carried = conv_state.new_zeros(conv_state.shape) if initial_conv is None else initial_conv
            emitted_conv = packed_conv_state_after(conv_inputs.reshape(batch * T, c.conv_dim),
                                                   carried.index_select(0, seq), starts, starts + num_tokens)
        if state is not None:
            state.conv_state.copy_(conv_state)
            state.ssm_state.copy_(ssm_state)
        return out if emit is None else (out, Mamba2State(emitted_conv, emitted[0]))

    def _forward_packed(self, x: Tensor, state: Mamba2State, cu_seqlens: Tensor, valid_lens, emit=None):
        """x [1, N, H]: n sequences back to back, sequence i at tokens cu_seqlens[i] .. cu_seqlens[i+1]-1
        (every one >= 1 token); state has their n rows and is updated in place, as forward does.

        A scan that takes packed sequences (a Triton scan: ours, or fla's) runs over the packed row with
        per-sequence boundaries, as do the conv (fla's with fla installed on CUDA, else packed_causal_conv)
        and the per-token norm; with any other scan (the torch reference, the recurrence) each sequence runs
        alone through the padded path (the ground truth the packed path is tested against).
        """
        if valid_lens is not None:
            raise ValueError("give valid_lens (padded rows) or cu_seqlens (packed sequences), not both")
        if state is None:
            raise ValueError("packed sequences (cu_seqlens) need a state with one row per sequence")
        if x.shape[0] != 1:
            raise ValueError(f"packed sequences come as one row, x [1, N, H]; got {tuple(x.shape)}")
        if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2 or cu_seqlens.is_floating_point() or \
                cu_seqlens.is_complex():
            raise ValueError(f"cu_seqlens must be an integer tensor [num_sequences + 1], got {cu_seqlens.dtype} "
                             f"{tuple(cu_seqlens.shape)}")
        n = cu_seqlens.shape[0] - 1
        self._check_state(state, n)
        scan = select_ssd_scan(x.device, self.kernels.ssd_scan)
        if emit is not None and cu_seqlens.device.type == "cpu":
            check_emit(emit, n, cu_seqlens[1:] - cu_seqlens[:-1])
        is_packed = _takes_packed_sequences(scan)
        # values are checked on the host only: on CUDA that would sync the packed path
        if not is_packed or (cu_seqlens.device.type == "cpu" and not torch.compiler.is_compiling()):
            bounds = cu_seqlens.tolist()
            if bounds[0] != 0 or bounds[-1] != x.shape[1] or any(b >= e for b, e in zip(bounds, bounds[1:])):
                raise ValueError(f"cu_seqlens must rise strictly from 0 to {x.shape[1]}, got {bounds}")
        if is_packed:
            return self._prefill(x, state, scan, cu_seqlens=cu_seqlens, emit=emit)
        outs = []
        if emit is not None:
            emitted = Mamba2State(state.conv_state.new_empty(emit[0].shape[0], *state.conv_state.shape[1:]),
                                  state.ssm_state.new_empty(emit[0].shape[0], *state.ssm_state.shape[1:]))
            seq_of = emit[0].tolist()
        for i in range(n):  # row i's state is a view into `state`: forward updates it in place
            row = Mamba2State(state.conv_state[i: i + 1], state.ssm_state[i: i + 1])
            xi = x[:, bounds[i]: bounds[i + 1]]
            ks = [] if emit is None else [k for k, s in enumerate(seq_of) if s == i]
            if not ks:
                outs.append(self.forward(xi, row))
                continue
            ks_t = torch.tensor(ks, device=emit[1].device)
            out, states = self.forward(xi, row, emit=(torch.zeros_like(ks_t), emit[1].index_select(0, ks_t)))
            outs.append(out)
            ks_t = ks_t.to(x.device)
            emitted.conv_state.index_copy_(0, ks_t, states.conv_state)
            emitted.ssm_state.index_copy_(0, ks_t, states.ssm_state)
        out = torch.cat(outs, dim=1)
        return out if emit is None else (out, emitted)

    def step(
        self, x: Tensor, conv_state: Tensor, ssm_state: Tensor, is_active: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One token per row (decode): the recurrence written out, nothing of the chunked scan.

        x [b, 1, H]; conv_state [b, conv_dim, K-1] (model dtype); ssm_state [b, nh, P, N] fp32; is_active [b]
        bool or None (all). Returns (out [b, 1, H], new conv state, new ssm state); the inputs are not
        modified. A row with is_active False keeps both states bit for bit (dt = 0 makes the SSM update an exact
        identity; the conv window is not shifted); its output is finite but meaningless.

            conv:  window = [s0 s1 s2 | x]  ->  out = silu(sum_k w_k window_k + bias),  state <- [s1 s2 x]
            ssm:   h' = exp(dt A) h + dt x ⊗ B          y = h' · C + D x
        """
        z, xs, B, C, dt, new_conv_state = self._step_inputs(x, conv_state, is_active)
        xs = xs.float()
        y, h = ssd_step(xs, dt, -torch.exp(self.A_log.float()), B, C, ssm_state)
        y = y + self.D.float()[:, None] * xs  # (b, nh, P)
        return self._step_output(y, z), new_conv_state, h

    def step_in_pools(self, x: Tensor, conv_pool: Tensor, ssm_pool: Tensor, slots: Tensor,
                      is_active: Tensor | None = None) -> Tensor:
        """step() for a caller holding the states in pools: conv_pool [S, conv_dim, K-1], ssm_pool [S, nh, P, N];
        row i's states sit at slots[i] [b] and are updated in place. Returns out [b, 1, H].

        The SSM state is updated by one fused kernel that reads and writes each row once
        (fms.triton.mamba_decode; its torch reference off CUDA); the small conv state is gathered and
        scattered back. Rows may share a slot (padded rows on a scratch slot), which then holds garbage.
        """

        z, xs, B, C, dt, new_conv_state = self._step_inputs(x, conv_pool.index_select(0, slots), is_active)
        conv_pool.index_copy_(0, slots, new_conv_state)
        y = mamba_decode_update(ssm_pool, slots, xs, dt, -torch.exp(self.A_log.float()), B, C, self.D)  # D x in
        return self._step_output(y, z)

    def _step_inputs(self, x: Tensor, conv_state: Tensor, is_active: Tensor | None):
        """in_proj and the conv of one decode token: (z, x [b, nh, P], B and C [b, G, N], dt [b, nh] fp32 (0 on
        idle rows), new conv state [b, conv_dim, K-1])."""
        c = self.config
        b = x.shape[0]
        G, P, N = c.num_groups, c.head_dim, c.state_size
        z, xBC, dt_raw = self.in_proj(x[:, 0]).split([c.inner_dim, c.conv_dim, c.num_heads], dim=-1)

        window = torch.cat([conv_state, xBC.to(conv_state.dtype)[:, :, None]], dim=-1)  # (b, conv_dim, K)
        weight = self.conv1d.weight[:, 0]  # (conv_dim, K)
        conv = (window.float() * weight.float()).sum(-1)  # fp32 accumulation, as a conv kernel does
        if self.conv1d.bias is not None:
            conv = conv + self.conv1d.bias.float()
        xBC = F.silu(conv.to(x.dtype))
        new_conv_state = window[:, :, 1:]
        if is_active is not None:
            new_conv_state = torch.where(is_active[:, None, None], new_conv_state, conv_state)
        xs, B, C = xBC.split([c.inner_dim, G * N, G * N], dim=-1)

        dt = self._dt(dt_raw)  # (b, nh) fp32
        if is_active is not None:
            dt = dt.masked_fill(~is_active[:, None], 0.0)
        return z, xs.view(b, c.num_heads, P), B.view(b, G, N), C.view(b, G, N), dt, new_conv_state

    def _step_output(self, y: Tensor, z: Tensor) -> Tensor:
        """y [b, nh, P] fp32 (D skip included) -> out [b, 1, H]."""
        return self.out_proj(self.norm(y.reshape(y.shape[0], 1, self.config.inner_dim), z[:, None]))

    def _dt(self, dt_raw: Tensor) -> Tensor:
        dt = F.softplus(dt_raw.float() + self.dt_bias.float())
        if self.config.time_step_min_max != (0.0, float("inf")):  # softplus is already >= 0
            dt = dt.clamp(*self.config.time_step_min_max)
        return dt

    def _causal_conv(self, xBC: Tensor, conv_state: Tensor | None, valid_lens: Tensor | None,
                     fused: bool = False, cu_seqlens: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Depthwise causal conv + SiLU over xBC [b, T, conv_dim], continuing from conv_state [b, conv_dim, K-1].

        Returns (conv output [b, T, conv_dim], conv state after the last real input [b, conv_dim, K-1]).
        The new state is a window of the carried-state-plus-input sequence ending at the last real input:

            window:  s0 s1 s2 | x0 x1 x2 x3 x4      (K-1 = 3, T = 5)
            valid_lens 5 ->                x2 x3 x4
            valid_lens 2 ->          s2 x0 x1       (columns valid_lens .. valid_lens+K-2)
            valid_lens 0 ->   s0 s1 s2              (unchanged)

        fused: the conv by fla's Triton causal_conv1d (CUDA); the state is copied from the same window
        either way, so both paths give the same state bit for bit. cu_seqlens: xBC [1, N, D] packs
        sequences back to back, conv_state has one row per sequence (unfused: packed_causal_conv).
        """
        batch, T, conv_dim = xBC.shape
        keep = self.config.conv_kernel - 1
        if conv_state is None:
            conv_state = xBC.new_zeros(batch if cu_seqlens is None else cu_seqlens.shape[0] - 1, conv_dim, keep)
        conv_state = conv_state.to(xBC.dtype)
        if not fused and cu_seqlens is not None:
            cu = cu_seqlens.to(xBC.device, torch.long)
            out = F.silu(packed_causal_conv(xBC[0], conv_state, cu, self.conv1d.weight, self.conv1d.bias))
            return out[None], packed_conv_state_after(xBC[0], conv_state, cu[:-1], cu[1:])  # (1, N, D)
        if not fused:
            window = torch.cat([conv_state, xBC.transpose(1, 2)], dim=-1)  # (b, conv_dim, K-1+T)
            out = F.silu(F.conv1d(window, self.conv1d.weight, self.conv1d.bias, groups=conv_dim))  # (b, conv_dim, T)
            # channels last in memory: the Triton scan takes x, B, C only with a unit stride there (an exact copy)
            out = out.transpose(1, 2).contiguous()  # (b, T, conv_dim)
            if valid_lens is None:
                return out, window[:, :, T:]
            cols = valid_lens.to(window.device, torch.long)[:, None] + torch.arange(keep, device=window.device)
            return out, window.gather(2, cols[:, None, :].expand(batch, conv_dim, keep))

        from fla.modules.causal_conv1d import causal_conv1d

        xBC = xBC.contiguous()
        cu = None if cu_seqlens is None else cu_seqlens.long()
        # fla's state holds the last K inputs, oldest first; a width-K conv never reads the oldest
        out, _ = causal_conv1d(xBC, self.conv1d.weight[:, 0], self.conv1d.bias, initial_state=F.pad(conv_state, (1, 0)),
                               activation="silu", cu_seqlens=cu)
        if cu is None:
            return out, conv_state_after(xBC, conv_state, valid_lens)
        return out, packed_conv_state_after(xBC[0], conv_state, cu[:-1], cu[1:])

    def _check_state(self, state: Mamba2State | None, batch: int) -> None:
        if state is None:
            return
        c = self.config
        want_conv = (batch, c.conv_dim, c.conv_kernel - 1)
        want_ssm = (batch, c.num_heads, c.head_dim, c.state_size)
        if tuple(state.conv_state.shape) != want_conv:
            raise ValueError(f"state.conv_state must be {want_conv}, got {tuple(state.conv_state.shape)}")
        if tuple(state.ssm_state.shape) != want_ssm:
            raise ValueError(f"state.ssm_state must be {want_ssm}, got {tuple(state.ssm_state.shape)}")

    @staticmethod
    def _check_valid_lens(valid_lens: Tensor | None, batch: int, T: int) -> None:
        if valid_lens is None:
            return
        if valid_lens.shape != (batch,) or valid_lens.is_floating_point() or valid_lens.is_complex():
            raise ValueError(
                f"valid_lens must be an integer tensor of shape ({batch},), "
                f"got {valid_lens.dtype} {tuple(valid_lens.shape)}"
            )
        # Checking values would force a host sync on CUDA (and break graph capture) and a graph break under
        # torch.compile, so only eager CPU tensors are checked.
        if not torch.compiler.is_compiling() and valid_lens.device.type == "cpu" and bool(
            ((valid_lens < 0) | (valid_lens > T)).any()
        ):
            raise ValueError(f"valid_lens must lie in [0, {T}] (the padded length), got {valid_lens.tolist()}")
