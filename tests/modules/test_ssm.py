"""Mamba2 mixer: chunked scan, decode step and padding against a step-by-step spec loop and HF transformers."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fms.modules import ssm
from fms.modules.ssm import (
    Mamba2Config,
    Mamba2Mixer,
    Mamba2State,
    _fla_available,
    mamba_state_bytes,
    select_ssd_scan,
    ssd_scan_reference,
    ssd_step,
)
from fms.modules.kernel_config import KernelConfig
from fms.triton.ssd_scan import ssd_scan_triton

# fp32 tolerances for the module vs an fp64 loop; states are compared with the same bounds.
ATOL, RTOL = 1e-4, 1e-4
CHUNK = 8

TINY = Mamba2Config(
    hidden_size=16, num_heads=4, head_dim=4, state_size=8, num_groups=2, conv_kernel=4, chunk_size=CHUNK
)


def make_mixer(config: Mamba2Config = TINY, seed: int = 0) -> Mamba2Mixer:
    """A mixer whose every parameter is random, with decays mild enough that state survives several chunks."""
    torch.manual_seed(seed)
    mixer = Mamba2Mixer(config)
    with torch.no_grad():
        for p in mixer.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
        mixer.A_log.uniform_(-1.0, 1.0)
    return mixer.eval()


def random_state(batch: int, config: Mamba2Config = TINY, seed: int = 1) -> Mamba2State:
    g = torch.Generator().manual_seed(seed)
    state = Mamba2State.zeros(batch, config, torch.float32)
    state.conv_state.copy_(torch.randn(state.conv_state.shape, generator=g))
    state.ssm_state.copy_(torch.randn(state.ssm_state.shape, generator=g))
    return state


def clone_state(state: Mamba2State) -> Mamba2State:
    return Mamba2State(state.conv_state.clone(), state.ssm_state.clone())


def rows(state: Mamba2State, lo: int, hi: int) -> Mamba2State:
    return Mamba2State(state.conv_state[lo:hi].clone(), state.ssm_state[lo:hi].clone())


def assert_close(actual, expected, atol=ATOL, rtol=RTOL):
    torch.testing.assert_close(actual, expected.to(actual.dtype), atol=atol, rtol=rtol)


def assert_state_close(actual: Mamba2State, expected: Mamba2State):
    assert_close(actual.conv_state, expected.conv_state)
    assert_close(actual.ssm_state, expected.ssm_state)


# ------------------------------------------------------------------------------------------------------------
# Step-by-step references written from spec §4.3, in fp64, one token at a time.
# ------------------------------------------------------------------------------------------------------------


def loop_scan(x, dt, A, B, C, state):
    """x [b,T,nh,P], dt [b,T,nh], B/C [b,T,G,N], state [b,nh,P,N] -> (y without D, final state)."""
    b, T, nh, P = x.shape
    G = B.shape[2]
    S = state.double().clone()
    ys = []
    x, dt, A, B, C = (v.double() for v in (x, dt, A, B, C))
    for t in range(T):
        y_t = torch.empty(b, nh, P, dtype=torch.float64)
        for h in range(nh):
            g = h // (nh // G)
            dth = dt[:, t, h, None, None]
            S[:, h] = torch.exp(dth * A[h]) * S[:, h] + dth * x[:, t, h, :, None] * B[:, t, g, None, :]
            y_t[:, h] = (S[:, h] * C[:, t, g, None, :]).sum(-1)
        ys.append(y_t)
    return torch.stack(ys, 1), S


def loop_mixer(mixer: Mamba2Mixer, x: torch.Tensor, state: Mamba2State):
    """The whole mixer for one sequence batch, token by token: returns (out, conv_state, ssm_state) in fp64."""
    c = mixer.config
    p = {k: v.detach().double() for k, v in mixer.state_dict().items()}
    K, nh, P, G, N = c.conv_kernel, c.num_heads, c.head_dim, c.num_groups, c.state_size
    zxbcdt = x.double() @ p["in_proj.weight"].T
    z, xBC, dt_raw = zxbcdt.split([c.inner_dim, c.conv_dim, nh], dim=-1)
    history = [state.conv_state[:, :, k].double() for k in range(K - 1)]  # oldest first
    S = state.ssm_state.double().clone()
    A = -torch.exp(p["A_log"])
    outs = []
    for t in range(x.shape[1]):
        history.append(xBC[:, t])
        conv = p["conv1d.bias"] + sum(p["conv1d.weight"][:, 0, k] * history[-K + k] for k in range(K))
        conv = F.silu(conv)
        xs, Bt, Ct = conv.split([c.inner_dim, G * N, G * N], dim=-1)
        xs, Bt, Ct = xs.view(-1, nh, P), Bt.view(-1, G, N), Ct.view(-1, G, N)
        dt = F.softplus(dt_raw[:, t] + p["dt_bias"]).clamp(*c.time_step_min_max)
        y = torch.empty_like(xs)
        for h in range(nh):
            g = h // (nh // G)
            S[:, h] = torch.exp(dt[:, h, None, None] * A[h]) * S[:, h] + dt[:, h, None, None] * (
                xs[:, h, :, None] * Bt[:, g, None, :]
            )
            y[:, h] = (S[:, h] * Ct[:, g, None, :]).sum(-1) + p["D"][h] * xs[:, h]
        u = y.reshape(-1, c.inner_dim) * F.silu(z[:, t])
        u = u.view(-1, G, c.inner_dim // G)
        u = (u * torch.rsqrt(u.pow(2).mean(-1, keepdim=True) + c.norm_eps)).view(-1, c.inner_dim)
        outs.append((u * p["norm.weight"]) @ p["out_proj.weight"].T)
    conv_state = torch.stack(history[len(history) - (K - 1) :], dim=-1)
    return torch.stack(outs, 1), conv_state, S


# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 3])
def test_chunked_scan_matches_loop(T):
    torch.manual_seed(T)
    b, nh, P, G, N = 2, 4, 3, 2, 5
    x = torch.randn(b, T, nh, P)
    dt = F.softplus(torch.randn(b, T, nh))
    A = -torch.rand(nh) * 2
    B, C = torch.randn(b, T, G, N), torch.randn(b, T, G, N)
    h0 = torch.randn(b, nh, P, N)
    y, final = ssd_scan_reference(x, dt, A, B, C, CHUNK, h0)
    y_ref, final_ref = loop_scan(x, dt, A, B, C, h0)
    assert_close(y, y_ref)
    assert_close(final, final_ref)
    _, no_state = ssd_scan_reference(x, dt, A, B, C, CHUNK, h0, output_final_state=False)
    assert no_state is None
    if T == 1:
        y1, s1 = ssd_step(x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], h0)
        assert_close(y1, y_ref[:, 0])
        assert_close(s1, final_ref)


@pytest.mark.parametrize("T", [1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 3])
def test_mixer_matches_spec_loop(T):
    mixer = make_mixer()
    x = torch.randn(3, T, TINY.hidden_size)
    state = random_state(3)
    out_ref, conv_ref, ssm_ref = loop_mixer(mixer, x, state)
    with torch.no_grad():
        out = mixer(x, state)  # updates `state` in place
    assert_close(out, out_ref)
    assert_close(state.conv_state, conv_ref)
    assert_close(state.ssm_state, ssm_ref)

    # Without a state: start from zeros, nothing kept.
    out_ref0, _, _ = loop_mixer(mixer, x, Mamba2State.zeros(3, TINY, torch.float32))
    with torch.no_grad():
        assert_close(mixer(x), out_ref0)


def test_prefill_then_decode_equals_full_prefill():
    x = torch.randn(2, 2 * CHUNK + 3, TINY.hidden_size)
    full, stepped, full_state, step_state = _prefill_then_decode(make_mixer(), x, CHUNK + 2)
    assert_close(stepped, full)
    assert_state_close(step_state, full_state)


def _prefill_then_decode(mixer, x, prefix):
    """One prefill over x, and a prefill of x[:, :prefix] then one-token steps; -> both outputs and states."""
    full_state = Mamba2State.zeros(x.shape[0], TINY, x.dtype)
    step_state = Mamba2State.zeros(x.shape[0], TINY, x.dtype)
    with torch.no_grad():
        full = mixer(x, full_state)
        outs = [mixer(x[:, :prefix], step_state)]
        for t in range(prefix, x.shape[1]):
            outs.append(mixer(x[:, t : t + 1], step_state))
    return full, torch.cat(outs, 1), full_state, step_state


@pytest.mark.parametrize("split", [1, CHUNK - 1, CHUNK, CHUNK + 3])
def test_prefill_in_two_pieces_equals_one(split):
    mixer = make_mixer()
    x = torch.randn(2, 2 * CHUNK + 1, TINY.hidden_size)
    one, two = random_state(2), random_state(2)
    with torch.no_grad():
        whole = mixer(x, one)
        pieces = torch.cat([mixer(x[:, :split], two), mixer(x[:, split:], two)], 1)
    assert_close(pieces, whole)
    assert_state_close(two, one)


def check_padded_batch(mixer: Mamba2Mixer, x: torch.Tensor, valid_lens: list[int], state: Mamba2State):
    """A right-padded batch must give each row's outputs at real positions and its final state alone."""
    before = clone_state(state)
    with torch.no_grad():
        out = mixer(x, state, valid_lens=torch.tensor(valid_lens))
    assert torch.isfinite(out).all()
    for b, n in enumerate(valid_lens):
        alone = rows(before, b, b + 1)
        if n > 0:
            with torch.no_grad():
                ref = mixer(x[b : b + 1, :n], alone)
            assert_close(out[b : b + 1, :n], ref)
        # n == 0: the state must be untouched, bit for bit.
        atol = 0.0 if n == 0 else ATOL
        torch.testing.assert_close(state.conv_state[b], alone.conv_state[0], atol=atol, rtol=atol)
        torch.testing.assert_close(state.ssm_state[b], alone.ssm_state[0], atol=atol, rtol=atol)


def test_padded_prefill_matches_rows_alone():
    # K-1 = 3, so lengths 2 and 1 take part of the new conv state from the incoming one.
    mixer = make_mixer()
    valid_lens = [2 * CHUNK + 1, CHUNK, 2, 1, 0, CHUNK + 1]
    x = torch.randn(len(valid_lens), 2 * CHUNK + 1, TINY.hidden_size) * 3  # large pads must not leak
    check_padded_batch(mixer, x, valid_lens, random_state(len(valid_lens)))


def test_padded_decode_leaves_idle_rows_untouched():
    mixer = make_mixer()
    x = torch.randn(3, 1, TINY.hidden_size)
    check_padded_batch(mixer, x, [1, 0, 1], random_state(3))


@settings(max_examples=15, deadline=None)
@given(st.lists(st.integers(0, 2 * CHUNK + 2), min_size=1, max_size=4), st.integers(0, 2**16))
def test_padded_batch_property(valid_lens, seed):
    mixer = make_mixer(seed=seed % 7)
    torch.manual_seed(seed)
    T = max(max(valid_lens), 1)
    x = torch.randn(len(valid_lens), T, TINY.hidden_size)
    check_padded_batch(mixer, x, valid_lens, random_state(len(valid_lens), seed=seed))


@given(lens=st.lists(st.integers(0, 7), min_size=1, max_size=4), T=st.integers(1, 7), seed=st.integers(0, 2**16))
@settings(max_examples=40, deadline=None)
def test_conv_state_without_the_window_equals_the_windowed_state(lens, T, seed):
    """conv_state_after (the fused CUDA path's state) against the window the reference conv builds,
    including rows with fewer real inputs than the conv keeps (part of the old state survives) and 0."""
    g = torch.Generator().manual_seed(seed)
    lens = [min(n, T) for n in lens]
    b, dim, keep = len(lens), 5, 3
    xBC = torch.randn(b, T, dim, generator=g)
    state = torch.randn(b, dim, keep, generator=g)
    window = torch.cat([state, xBC.transpose(1, 2)], dim=-1)
    expected = torch.stack([window[i, :, n: n + keep] for i, n in enumerate(lens)])
    assert torch.equal(ssm.conv_state_after(xBC, state, torch.tensor(lens)), expected)
    if all(n == T for n in lens):
        assert torch.equal(ssm.conv_state_after(xBC, state, None), expected)


def test_packed_sequences_equal_padded_rows():
    """x [1, N, H] holding sequences back to back (cu_seqlens) gives each sequence's padded-row output
    and state, lengths 1 (a single token), under and over the conv width and several chunks."""
    mixer = make_mixer()
    lens = [1, 2, 2 * CHUNK + 3, 5]
    T = max(lens)
    x = torch.randn(len(lens), T, TINY.hidden_size)
    init = random_state(len(lens))
    padded_state, packed_state = clone_state(init), clone_state(init)
    with torch.no_grad():
        padded = mixer(x, padded_state, valid_lens=torch.tensor(lens))
        flat = torch.cat([x[i, :n] for i, n in enumerate(lens)])[None]
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
        packed = mixer(flat, packed_state, cu_seqlens=cu)
    assert packed.shape == (1, sum(lens), TINY.hidden_size)
    for i, n in enumerate(lens):
        torch.testing.assert_close(packed[0, cu[i]: cu[i + 1]], padded[i, :n], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed_state.ssm_state, padded_state.ssm_state, atol=1e-5, rtol=1e-5)
    # copies of the conv inputs; the single-token sequence takes the one-token step, whose in_proj is
    # another GEMM shape, so its inputs (and state) agree to rounding only
    torch.testing.assert_close(packed_state.conv_state, padded_state.conv_state, atol=1e-6, rtol=1e-6)


def test_packed_conv_state_takes_the_carried_state_for_short_sequences():
    keep, dim = 3, 2
    x = torch.arange(10, dtype=torch.float32).repeat_interleave(dim).view(10, dim)  # input t holds value t
    state = -torch.arange(1, 1 + 3 * dim * keep, dtype=torch.float32).view(3, dim, keep)
    starts, ends = torch.tensor([0, 1, 3]), torch.tensor([1, 3, 10])
    out = ssm.packed_conv_state_after(x, state, starts, ends)
    # sequence 0 (1 input): two carried columns, then input 0; sequence 1 (2 inputs): one carried, inputs 1, 2
    assert out[0, 0].tolist() == [state[0, 0, 1].item(), state[0, 0, 2].item(), 0.0]
    assert out[1, 1].tolist() == [state[1, 1, 2].item(), 1.0, 2.0]
    assert out[2, 0].tolist() == [7.0, 8.0, 9.0]


def test_packed_input_errors():
    mixer = make_mixer()
    x = torch.randn(1, 6, TINY.hidden_size)
    with pytest.raises(ValueError, match="rise strictly from 0 to 6"):
        mixer(x, random_state(2), cu_seqlens=torch.tensor([0, 4, 4]))
    with pytest.raises(ValueError, match="need a state"):
        mixer(x, None, cu_seqlens=torch.tensor([0, 6]))
    with pytest.raises(ValueError, match="not both"):
        mixer(x, random_state(1), valid_lens=torch.tensor([6]), cu_seqlens=torch.tensor([0, 6]))


def packed(lens: list[int]) -> torch.Tensor:
    """cu_seqlens of sequences of these lengths back to back."""
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])


def skip_without_triton_on_cpu():
    if not ssm.ssd_scan.can_run_triton(torch.device("cpu")):
        pytest.skip("the Triton scan runs on CPU only in Triton's interpreter (TRITON_INTERPRET=1)")


@pytest.mark.parametrize("kernel", [2, 4])
@pytest.mark.parametrize("lens", [[1], [1, 2, 3, 11], [11, 3, 2, 1, 1], [3, 3]])
def test_packed_conv_equals_each_sequence_alone(kernel, lens):
    """The unfused conv over packed sequences (one conv for all) against each sequence through the padded conv
    alone with its own carried state; lengths 1, under, at (K-1 = 3) and over the carried window."""
    config = dataclasses.replace(TINY, conv_kernel=kernel)
    mixer = make_mixer(config)
    g = torch.Generator().manual_seed(3)
    xBC = torch.randn(1, sum(lens), config.conv_dim, generator=g)
    init = torch.randn(len(lens), config.conv_dim, kernel - 1, generator=g)
    cu = packed(lens)
    with torch.no_grad():
        out, state = mixer._causal_conv(xBC, init.clone(), None, fused=False, cu_seqlens=cu)
        assert out.shape == xBC.shape and state.shape == init.shape
        for i in range(len(lens)):
            alone, alone_state = mixer._causal_conv(xBC[:, cu[i]:cu[i + 1]], init[i:i + 1].clone(), None)
            torch.testing.assert_close(out[:, cu[i]:cu[i + 1]], alone, atol=1e-6, rtol=1e-6)
            assert torch.equal(state[i], alone_state[0])


def test_packed_triton_scan_equals_the_per_sequence_loop_with_emitted_states():
    """Packed sequences through the Triton scan (the interpreter on CPU), conv and norm in one pass, against
    the per-sequence loop of the reference scan: outputs, updated states and checkpoint states emitted at
    page-like boundaries (counts 16 apart) and at sequences' last tokens, listed out of order."""
    skip_without_triton_on_cpu()
    mixer = make_mixer()
    lens = [1, 2, 3, 37, 18]
    cu = packed(lens)
    x = torch.randn(1, sum(lens), TINY.hidden_size, generator=torch.Generator().manual_seed(4))
    emit = (torch.tensor([3, 0, 4, 3, 2, 3, 4, 1]), torch.tensor([20, 1, 18, 4, 1, 37, 2, 2]))
    init = random_state(len(lens))
    state, ref_state = clone_state(init), clone_state(init)
    with torch.no_grad():
        mixer.set_kernels(KernelConfig(ssd_scan="reference"))
        ref, ref_emitted = mixer(x, ref_state, cu_seqlens=cu, emit=emit)
        mixer.set_kernels(KernelConfig(ssd_scan="triton"))
        out, emitted = mixer(x, state, cu_seqlens=cu, emit=emit)
    assert_close(out, ref)
    assert_state_close(state, ref_state)
    assert_state_close(emitted, ref_emitted)
    assert not torch.equal(ref_state.conv_state, init.conv_state)  # every sequence moved its state
    with torch.no_grad():  # the packed path checks host boundaries too
        with pytest.raises(ValueError, match="rise strictly from 0 to 61"):
            mixer(x, random_state(2), cu_seqlens=torch.tensor([0, 30, 30]))
        with pytest.raises(ValueError, match="integer tensor"):
            mixer(x, random_state(1), cu_seqlens=torch.tensor([0.0, 61.0]))


@pytest.mark.parametrize("packed_rows", [False, True])
def test_emitted_conv_windows_shorter_than_the_kernel_hold_the_carried_state(packed_rows):
    """A state emitted after fewer than K-1 tokens holds columns of the carried conv state: the state before
    this call, not the one the call leaves behind. Expected: the prefix run alone from the same state."""
    mixer = make_mixer()
    x = torch.randn(2, 6, TINY.hidden_size, generator=torch.Generator().manual_seed(5))
    emit = (torch.tensor([0, 1, 1]), torch.tensor([1, 2, 6]))
    init = random_state(2)
    with torch.no_grad():
        if packed_rows:
            _, emitted = mixer(x.reshape(1, 12, -1), clone_state(init), cu_seqlens=packed([6, 6]), emit=emit)
        else:
            _, emitted = mixer(x, clone_state(init), emit=emit)
        for k, (row, n) in enumerate(zip(*emit)):
            alone = rows(init, row, row + 1)
            mixer(x[row:row + 1, :n], alone)
            assert_close(emitted.conv_state[k], alone.conv_state[0])
            assert_close(emitted.ssm_state[k], alone.ssm_state[0])


@pytest.mark.parametrize(("scan", "num_forward_calls"), [("triton", 1), ("reference", 1 + 3)])
def test_packed_sequences_take_one_pass_when_the_scan_packs(scan, num_forward_calls, monkeypatch):
    """Packed sequences loop over forward (one call per sequence) only with a scan that cannot pack."""
    if scan == "triton":
        skip_without_triton_on_cpu()
    mixer = make_mixer()
    mixer.set_kernels(KernelConfig(ssd_scan=scan))
    calls = []
    forward = Mamba2Mixer.forward
    monkeypatch.setattr(Mamba2Mixer, "forward", lambda self, *a, **k: calls.append(a) or forward(self, *a, **k))
    lens = [1, 2, 5]
    with torch.no_grad():
        mixer(torch.randn(1, sum(lens), TINY.hidden_size), random_state(len(lens)), cu_seqlens=packed(lens))
    assert len(calls) == num_forward_calls


def test_step_returns_new_states_and_leaves_its_inputs():
    mixer = make_mixer()
    x = torch.randn(3, 1, TINY.hidden_size)
    state = random_state(3)
    before = clone_state(state)
    active = torch.tensor([True, False, True])
    with torch.no_grad():
        out, conv, ssm_state = mixer.step(x, state.conv_state, state.ssm_state, active)
        ref = mixer(x, state, valid_lens=active.long())  # forward with T == 1 takes the same step, in place
    assert torch.equal(out, ref)
    assert torch.equal(conv, state.conv_state) and torch.equal(ssm_state, state.ssm_state)
    assert ssm_state.dtype == torch.float32
    # step did not write into the state it was given (forward above copied its results into `state`)
    with torch.no_grad():
        again = mixer.step(x, before.conv_state, before.ssm_state, active)
    assert torch.equal(again[1], conv) and torch.equal(again[2], ssm_state)


def test_bf16_decode_after_prefill_follows_the_full_prefill():
    """bf16 weights and conv state, fp32 SSM state: decoding token by token after a prefill tracks one
    prefill over the whole sequence (the step's conv accumulates in fp32, as the chunked path's conv1d)."""
    x = torch.randn(2, CHUNK + 4, TINY.hidden_size, dtype=torch.bfloat16)
    full, stepped, full_state, step_state = _prefill_then_decode(make_mixer().to(torch.bfloat16), x, CHUNK - 1)
    assert step_state.ssm_state.dtype == torch.float32
    assert max_relative_error(stepped, full) < 2e-2
    assert max_relative_error(step_state.ssm_state, full_state.ssm_state) < 2e-2
    assert torch.equal(step_state.conv_state, full_state.conv_state)  # the last inputs, no arithmetic


class _OpRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    """Records each aten op called, and the largest tensor any op newly allocates."""

    def __init__(self):
        super().__init__()
        self.ops, self.largest_new = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append(func.overloadpacket.__name__)
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:  # not a view, not in place
                self.largest_new = max(self.largest_new, t.numel())
        return out


def _pool_and_layer(num_slots=16):
    from types import SimpleNamespace

    from fms.cache.state import MambaStatePool
    from fms.modules.mamba_layer import MambaLayer

    pool = MambaStatePool(MambaLayer.state_spec(TINY, layers=(0, 2), dtype=torch.float32), num_slots, "cpu")
    g = torch.Generator().manual_seed(4)
    for t in pool.conv + pool.ssm:
        t.copy_(torch.randn(t.shape, generator=g))
    layer = MambaLayer(TINY, layer_idx=2)
    layer.mamba.load_state_dict(make_mixer().state_dict())
    return pool, layer, SimpleNamespace(state_pool=pool)


def test_pooled_decode_updates_only_its_rows_and_copies_no_pool():
    """MambaLayer's decode step reads and writes the rows of its slots in its own layer's pool and nothing
    else; it equals the mixer on a gathered copy; no op allocates anything the size of a pool."""
    from types import SimpleNamespace

    pool, layer, cache = _pool_and_layer()
    slots = torch.tensor([4, 1, 16])  # 16: the scratch slot, as a padded row of a CUDA-graph batch uses
    num_new = torch.tensor([1, 0, 1])  # row 1 idles (a sequence past the end of its decode window)
    meta = SimpleNamespace(state_slots=slots, num_new_tokens=num_new, packed=False)
    x = torch.randn(3, 1, TINY.hidden_size)
    before_conv, before_ssm = [t.clone() for t in pool.conv], [t.clone() for t in pool.ssm]
    expected = Mamba2State(before_conv[1][slots], before_ssm[1][slots])
    with torch.no_grad():
        ref = layer.mamba(x, expected, valid_lens=num_new)
        with _OpRecorder() as rec:
            out = layer(x, cache=cache, meta=meta)
    assert torch.equal(out, ref)
    torch.testing.assert_close(pool.conv[1][slots], expected.conv_state, atol=0, rtol=0)
    torch.testing.assert_close(pool.ssm[1][slots], expected.ssm_state, atol=0, rtol=0)
    assert torch.equal(pool.ssm[1][1], before_ssm[1][1]) and torch.equal(pool.conv[1][1], before_conv[1][1])
    untouched = [i for i in range(pool.num_slots + 1) if i not in slots.tolist()]
    for now, then in zip(pool.conv + pool.ssm, before_conv + before_ssm):
        assert torch.equal(now[untouched], then[untouched])
    assert torch.equal(pool.ssm[0], before_ssm[0]) and torch.equal(pool.conv[0], before_conv[0])  # other layer

    # the largest tensor a step makes is per row: the conv window, the SSM state, in_proj's output
    c = TINY
    per_row = max(c.conv_dim * c.conv_kernel, c.num_heads * c.head_dim * c.state_size,
                  c.inner_dim + c.conv_dim + c.num_heads)
    assert rec.largest_new <= len(slots) * per_row < min(pool.ssm[1].numel(), pool.conv[1].numel())
    assert not {"convolution", "cumsum", "index_put", "index_put_", "repeat_interleave", "masked_fill_"} & set(rec.ops)


def test_state_pool_layers_are_separate_tensors():
    """Each layer's pool is its own allocation: a compiled step writing through a view of one shared block
    would be replayed onto the whole block (a copy of every slot of every layer)."""
    pool, _, _ = _pool_and_layer()
    storages = {t.untyped_storage().data_ptr() for t in pool.conv + pool.ssm}
    assert len(storages) == len(pool.conv) + len(pool.ssm)
    before = [t.clone() for t in pool.conv + pool.ssm]
    pool.zero([3])  # the KV manager gave slot 3 to a new sequence: it starts from zeros
    assert all(not t[3].any() for t in pool.conv + pool.ssm)
    for t, b in zip(pool.conv + pool.ssm, before):  # no other slot is touched
        assert torch.equal(t[:3], b[:3]) and torch.equal(t[4:], b[4:]) and b[3].any()


# ------------------------------------------------------------------------------------------------------------


@pytest.mark.hf
@pytest.mark.parametrize("num_groups", [1, 2])
def test_matches_hf_granitemoehybrid_mamba_layer(num_groups):
    from transformers import GraniteMoeHybridConfig
    from transformers.models.granitemoehybrid.modeling_granitemoehybrid import GraniteMoeHybridMambaLayer

    hf_config = GraniteMoeHybridConfig(
        vocab_size=32,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        layer_types=["mamba"],
        mamba_n_heads=4,
        mamba_d_head=8,
        mamba_expand=2,
        mamba_d_state=8,
        mamba_n_groups=num_groups,
        mamba_d_conv=4,
        mamba_chunk_size=CHUNK,
        mamba_conv_bias=True,
        mamba_proj_bias=False,
        rms_norm_eps=1e-5,
    )
    torch.manual_seed(0)
    hf = GraniteMoeHybridMambaLayer(hf_config, layer_idx=0).eval()
    if num_groups > 1 and getattr(hf.norm, "group_size", None) != hf.intermediate_size // num_groups:
        # Older transformers (e.g. 5.17) normalise over all of inner_dim; later ones, like mamba_ssm and us,
        # per group of inner_dim / num_groups. Granite-4.0-H has one group, where the two agree.
        pytest.skip("this transformers version's gated RMSNorm ignores num_groups")
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
        hf.A_log.uniform_(-1.0, 1.0)

    ours = Mamba2Mixer(
        Mamba2Config(
            hidden_size=16,
            num_heads=4,
            head_dim=8,
            state_size=8,
            num_groups=num_groups,
            conv_kernel=4,
            chunk_size=CHUNK,
            norm_eps=1e-5,
            time_step_min_max=tuple(hf_config.time_step_limit),
        )
    ).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)  # same names, same shapes

    x = torch.randn(2, 2 * CHUNK + 5, 16)
    with torch.no_grad():
        assert_close(ours(x), hf(x))


# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scan", ["auto", "recurrent", "triton"])
def test_each_scan_that_runs_on_cpu_equals_the_reference_with_state_and_padding(scan):
    """The mixer's KernelConfig.ssd_scan choices on CPU ("triton" in Triton's interpreter) against the same mixer
    on the reference scan: outputs at real positions and both states, from a carried state, rows right-padded."""
    if scan == "triton" and not ssm.ssd_scan.can_run_triton(torch.device("cpu")):
        pytest.skip("the Triton scan runs on CPU only in Triton's interpreter (TRITON_INTERPRET=1)")
    mixer = make_mixer()
    T = 2 * CHUNK + 3
    valid_lens = torch.tensor([T, CHUNK + 1, 2, 0])
    x = torch.randn(4, T, TINY.hidden_size, generator=torch.Generator().manual_seed(2))
    state, ref_state = random_state(4), random_state(4)
    with torch.no_grad():
        mixer.set_kernels(KernelConfig(ssd_scan="reference"))
        ref = mixer(x, ref_state, valid_lens=valid_lens)
        mixer.set_kernels(KernelConfig(ssd_scan=scan))
        out = mixer(x, state, valid_lens=valid_lens)
    is_real = torch.arange(T)[None, :] < valid_lens[:, None]
    assert_close(out[is_real], ref[is_real])
    assert_state_close(state, ref_state)
    assert not torch.equal(ref_state.ssm_state[0], random_state(4).ssm_state[0])  # the scan moved the state


def fast_scan_or_skip(name: str) -> None:
    if name == "fla" and not _fla_available():
        pytest.skip("flash-linear-attention (fla) is not installed")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("scan", ["triton", "fla"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_groups", [1, 2])
@pytest.mark.parametrize("T", [2, 63, 64, 65, 300])
def test_fast_path_matches_reference(scan, dtype, num_groups, T):
    # Error relative to the largest reference value, since bf16 rounding scales with magnitude. fp32: the kernels'
    # dots may run in TF32 -> 2e-3. bf16: C/B/x*dt enter the kernel in bf16 and outputs are rounded twice -> 2e-2.
    fast_scan_or_skip(scan)
    tol = 2e-3 if dtype == torch.float32 else 2e-2
    config = Mamba2Config(
        hidden_size=64, num_heads=4, head_dim=32, state_size=64, num_groups=num_groups, chunk_size=64
    )
    assert select_ssd_scan(torch.device("cuda")) is ssd_scan_triton  # the default on CUDA
    mixer = make_mixer(config).to("cuda", dtype)
    x = torch.randn(3, T, config.hidden_size, device="cuda", dtype=dtype)
    valid_lens = torch.tensor([T, max(T - 5, 0), 1], device="cuda")
    init = random_state(3, config)
    fast_state = Mamba2State(init.conv_state.to("cuda", dtype), init.ssm_state.cuda())
    ref_state = clone_state(fast_state)
    with torch.no_grad():
        mixer.set_kernels(KernelConfig(ssd_scan=scan))
        fast = mixer(x, fast_state, valid_lens=valid_lens)
        fast_stateless = mixer(x)  # no initial state, no final state asked of the kernel
        # Same module, device and dtype; only the scan differs.
        mixer.set_kernels(KernelConfig(ssd_scan="reference"))
        ref = mixer(x, ref_state, valid_lens=valid_lens)
        ref_stateless = mixer(x)
    assert max_relative_error(fast_stateless, ref_stateless) < tol
    is_real = torch.arange(T, device="cuda")[None, :] < valid_lens[:, None]
    assert max_relative_error(fast[is_real], ref[is_real]) < tol
    assert max_relative_error(fast_state.ssm_state, ref_state.ssm_state) < tol
    # the state is copied from the inputs on both paths (the fast path's conv is fla's, its state is not)
    assert torch.equal(fast_state.conv_state, ref_state.conv_state)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("scan", ["triton", "fla"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_groups", [1, 2])
def test_packed_sequences_on_the_fast_path_match_reference(scan, dtype, num_groups):
    """A Triton scan over packed sequences (cu_seqlens), with fla's conv where fla is installed and the packed
    torch conv otherwise, against each sequence run alone on the reference path, with carried states;
    lengths 1, 2 (under the conv width), 64, 65, 300."""
    fast_scan_or_skip(scan)
    tol = 2e-3 if dtype == torch.float32 else 2e-2
    config = Mamba2Config(hidden_size=64, num_heads=4, head_dim=32, state_size=64, num_groups=num_groups,
                          chunk_size=64)
    mixer = make_mixer(config).to("cuda", dtype)
    lens = [1, 2, 64, 65, 300]
    x = torch.randn(1, sum(lens), config.hidden_size, device="cuda", dtype=dtype)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], device="cuda", dtype=torch.int32)
    init = random_state(len(lens), config)
    fast_state = Mamba2State(init.conv_state.to("cuda", dtype), init.ssm_state.cuda())
    ref_state = clone_state(fast_state)
    with torch.no_grad():
        mixer.set_kernels(KernelConfig(ssd_scan=scan))
        fast = mixer(x, fast_state, cu_seqlens=cu)
        mixer.set_kernels(KernelConfig(ssd_scan="reference"))
        ref = mixer(x, ref_state, cu_seqlens=cu)
    assert max_relative_error(fast, ref) < tol
    assert max_relative_error(fast_state.ssm_state, ref_state.ssm_state) < tol
    # copies of the conv inputs, which come from in_proj GEMMs of other shapes on the reference path
    assert max_relative_error(fast_state.conv_state, ref_state.conv_state) < tol


def max_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("hidden_size", 0),
        ("num_heads", -1),
        ("head_dim", 0),
        ("state_size", 0),
        ("num_groups", 3),  # 4 heads do not split into 3 groups
        ("num_groups", 0),
        ("conv_kernel", 0),
        ("chunk_size", 0),
        ("norm_eps", 0.0),
        ("time_step_min_max", (1.0, 0.5)),
        ("time_step_min_max", (-1.0, 1.0)),
    ],
)
def test_bad_config_raises_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(TINY, **{field: value})


def test_config_derived_sizes_and_hf_style_limits():
    c = Mamba2Config(hidden_size=1536, num_heads=48, head_dim=64, state_size=128, time_step_min_max=[0.0, float("inf")])
    assert (c.inner_dim, c.conv_dim) == (3072, 3328)
    assert c.time_step_min_max == (0.0, float("inf"))
    hash(c)  # frozen and hashable even when the limits came in as a list


def test_state_bytes_granite_4_h_1b():
    c = Mamba2Config(hidden_size=1536, num_heads=48, head_dim=64, state_size=128)
    # conv [3328, 3] bf16 + ssm [48, 64, 128] fp32 (spec §4.4 counts 4 conv columns; we keep K-1 = 3).
    assert mamba_state_bytes(c, torch.bfloat16) == 3328 * 3 * 2 + 48 * 64 * 128 * 4
    state = Mamba2State.zeros(1, c, torch.bfloat16)
    nbytes = sum(t.numel() * t.element_size() for t in (state.conv_state, state.ssm_state))
    assert nbytes == mamba_state_bytes(c, torch.bfloat16)


def test_bad_inputs_raise():
    mixer = make_mixer()
    x = torch.randn(2, 5, TINY.hidden_size)
    with pytest.raises(ValueError, match="valid_lens"):
        mixer(x, valid_lens=torch.tensor([5, 6]))
    with pytest.raises(ValueError, match="valid_lens"):
        mixer(x, valid_lens=torch.tensor([5]))
    with pytest.raises(ValueError, match="conv_state"):
        mixer(x, Mamba2State(torch.zeros(2, TINY.conv_dim, 4), torch.zeros(2, 4, 4, 8)))
    with pytest.raises(ValueError, match="x must be"):
        mixer(torch.randn(2, 0, TINY.hidden_size))
