"""SSD scans that also emit the states on the way (prefix-cache checkpoints), in one pass.

Each emitted state must equal the final state of the same scan run on that prefix alone (a separate
call, so not computed by the code under test), for the reference, the token-by-token recurrence and the
Triton kernel (Triton's interpreter on CPU), padded rows and packed sequences alike; and the mixer's
emitted conv windows and SSM states must equal those of running the mixer on the prefix alone.
"""

import os

import pytest
import torch

from fms.modules.kernel_config import KernelConfig
from fms.modules.ssm import Mamba2Config, Mamba2Mixer, Mamba2State
from fms.triton import ssd_scan
from fms.triton.ssd_reference import ssd_scan_recurrent, ssd_scan_reference

DEVICE = torch.device(os.environ.get("FMS_TEST_DEVICE", "cpu"))
# fp32, relative to the largest state value: the interpreter computes in fp32 numpy; a GPU may run the Triton
# kernel's fp32 dots in TF32
TOL = 2e-3 if DEVICE.type == "cuda" else 2e-5
SCANS = {"reference": ssd_scan_reference, "recurrent": ssd_scan_recurrent}
if ssd_scan.HAS_TRITON:
    SCANS["triton"] = ssd_scan.ssd_scan_triton


def make_inputs(b, T, nh=4, P=16, G=2, N=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, T, nh, P, generator=g)
    dt = torch.rand(b, T, nh, generator=g) * 0.3
    A = -(torch.rand(nh, generator=g) * 4 + 0.5)
    B = torch.randn(b, T, G, N, generator=g)
    C = torch.randn(b, T, G, N, generator=g)
    h0 = torch.randn(b, nh, P, N, generator=g)
    return tuple(t.to(DEVICE) for t in (x, dt, A, B, C, h0))


def prefix_state(x, dt, A, B, C, h0, row, start, num_tokens):
    """The reference's final state of row `row` run alone on tokens start .. start + num_tokens - 1."""
    end = start + num_tokens
    _, h = ssd_scan_reference(x[row:row + 1, start:end], dt[row:row + 1, start:end], A, B[row:row + 1, start:end],
                              C[row:row + 1, start:end], 8, h0[row:row + 1], True)
    return h[0]


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name", list(SCANS))
@pytest.mark.parametrize("T, seq, counts", [
    (16, [0, 1], [16, 1]),
    (37, [1, 0, 1, 0], [37, 5, 21, 37]),  # row 0: after 5 and 37 (its end); row 1: 21 and 37, listed out of order
    (53, [0, 1, 0, 1], [53, 1, 37, 33]),
])
def test_emitted_states_equal_the_prefix_run_alone_padded(name, T, seq, counts):
    """Counts 16 apart (page boundaries of page size 16), and the row's whole length, in any order."""
    x, dt, A, B, C, h0 = make_inputs(2, T)
    seq, counts = torch.tensor(seq), torch.tensor(counts)
    y, final, emitted = SCANS[name](x, dt, A, B, C, 8, h0, True, emit=(seq, counts))
    y_ref, final_ref = ssd_scan_reference(x, dt, A, B, C, 8, h0, True)
    assert rel_err(y, y_ref) < TOL and rel_err(final, final_ref) < TOL  # emitting changes nothing else
    for k in range(seq.shape[0]):
        expected = prefix_state(x, dt, A, B, C, h0, int(seq[k]), 0, int(counts[k]))
        assert rel_err(emitted[k], expected) < TOL, (k, int(counts[k]))


@pytest.mark.skipif(not ssd_scan.HAS_TRITON, reason="Triton is not installed")
def test_triton_emits_per_packed_sequence():
    x, dt, A, B, C, _ = make_inputs(1, 53)
    h0 = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(5)).to(DEVICE)  # one per sequence
    cu = torch.tensor([0, 20, 53], device=DEVICE)
    seq, counts = torch.tensor([1, 0, 1]), torch.tensor([33, 4, 17])
    _, _, emitted = ssd_scan.ssd_scan_triton(x, dt, A, B, C, 8, h0, True, cu_seqlens=cu, emit=(seq, counts))
    for k in range(3):
        s = int(seq[k])
        span = slice(int(cu[s]), int(cu[s]) + int(counts[k]))
        _, expected = ssd_scan_reference(x[:, span], dt[:, span], A, B[:, span], C[:, span], 8, h0[s:s + 1], True)
        assert rel_err(emitted[k], expected[0]) < TOL


@pytest.mark.skipif(not ssd_scan.HAS_TRITON, reason="Triton is not installed")
def test_triton_refuses_states_that_cannot_all_fall_on_chunk_ends():
    x, dt, A, B, C, h0 = make_inputs(1, 40)
    with pytest.raises(ValueError, match="multiples of 16"):
        ssd_scan.ssd_scan_triton(x, dt, A, B, C, 8, h0, True, emit=(torch.tensor([0, 0]), torch.tensor([5, 12])))
    with pytest.raises(ValueError, match="after 1 to the sequence's length"):
        ssd_scan.ssd_scan_triton(x, dt, A, B, C, 8, h0, True, emit=(torch.tensor([0]), torch.tensor([41])))
    with pytest.raises(ValueError, match="twice"):
        ssd_scan.ssd_scan_triton(x, dt, A, B, C, 8, h0, True, emit=(torch.tensor([0, 0]), torch.tensor([8, 8])))


@pytest.fixture(scope="module")
def mixer():
    torch.manual_seed(0)
    m = Mamba2Mixer(Mamba2Config(hidden_size=32, num_heads=4, head_dim=16, state_size=16, chunk_size=16))
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
        m.A_log.uniform_(0, 1)
    return m


def _copy(state, row):
    return Mamba2State(state.conv_state[row:row + 1].clone(), state.ssm_state[row:row + 1].clone())


# the mixer here is on the CPU: the Triton scan runs there under the interpreter only (CPU test runs)
@pytest.mark.parametrize("scan", ["reference", "recurrent"] + (
    ["triton"] if ssd_scan.can_run_triton(torch.device("cpu")) else []))
@pytest.mark.parametrize("packed", [False, True])
def test_mixer_emits_the_state_of_the_prefix_run_alone(mixer, scan, packed):
    mixer.set_kernels(KernelConfig(ssd_scan=scan))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 40, 32, generator=g)
    start = Mamba2State(torch.randn(2, mixer.config.conv_dim, 3, generator=g), torch.randn(2, 4, 16, 16, generator=g))
    state = Mamba2State(start.conv_state.clone(), start.ssm_state.clone())
    if packed:  # 17 tokens of row 0, 23 of row 1
        seq, counts = torch.tensor([1, 0, 1]), torch.tensor([7, 17, 23])
        xs = torch.cat([x[0, :17], x[1, :23]])[None]
        out, emitted = mixer(xs, state, cu_seqlens=torch.tensor([0, 17, 40]), emit=(seq, counts))
    else:
        seq, counts = torch.tensor([0, 1, 1, 0]), torch.tensor([7, 23, 39, 23])
        out, emitted = mixer(x, state, valid_lens=torch.tensor([40, 39]), emit=(seq, counts))
    for k in range(seq.shape[0]):
        alone = _copy(start, int(seq[k]))
        mixer(x[int(seq[k]):int(seq[k]) + 1, :int(counts[k])], alone)
        assert rel_err(emitted.conv_state[k], alone.conv_state[0]) < TOL
        assert rel_err(emitted.ssm_state[k], alone.ssm_state[0]) < TOL
    mixer.set_kernels(KernelConfig())


def test_mixer_emits_after_a_single_token_step(mixer):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 1, 32, generator=g)
    state = Mamba2State(torch.randn(3, mixer.config.conv_dim, 3, generator=g), torch.randn(3, 4, 16, 16, generator=g))
    out, emitted = mixer(x, state, emit=(torch.tensor([2, 0]), torch.tensor([1, 1])))
    assert torch.equal(emitted.ssm_state, state.ssm_state[[2, 0]])
    assert torch.equal(emitted.conv_state, state.conv_state[[2, 0]])
