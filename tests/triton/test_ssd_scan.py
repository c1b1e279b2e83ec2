"""The Triton SSD scan (fms/modules/ssd_scan.py) against the chunked PyTorch reference.

On CPU the kernel runs in Triton's interpreter (tests/conftest.py), so the shapes stay small; on a GPU
(FMS_TEST_DEVICE=cuda) the same cases run compiled, plus one at the Granite-4.0-H-1B mixer's shape.
"""

import os

import pytest
import torch

from fms.triton import ssd_scan
from fms.triton.ssd_reference import ssd_scan_recurrent, ssd_scan_reference

pytestmark = pytest.mark.skipif(not ssd_scan.HAS_TRITON, reason="Triton is not installed")

DEVICE = torch.device(os.environ.get("FMS_TEST_DEVICE", "cpu"))
# fp32, relative to the largest reference value: the interpreter computes in fp32 numpy (~1e-6); a GPU may run
# the fp32 dots in TF32 (10-bit mantissa) -> 2e-3. bf16 inputs: the intra-chunk dot takes bf16 operands -> 2e-2.
FP32_TOL = 2e-3 if DEVICE.type == "cuda" else 2e-5
BF16_TOL = 2e-2
BLOCK_T = 16  # the kernel's chunk in these tests: lengths below cross it


def make_inputs(b, T, nh, P, G, N, dtype=torch.float32, seed=0, with_state=True):
    """x, B, C randn; dt in (0, 0.3) (decays from mild to ~e^-1.2 per step); A in [-4.5, -0.5]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, T, nh, P, generator=g).to(dtype)
    dt = torch.rand(b, T, nh, generator=g) * 0.3
    A = -(torch.rand(nh, generator=g) * 4 + 0.5)
    B = torch.randn(b, T, G, N, generator=g).to(dtype)
    C = torch.randn(b, T, G, N, generator=g).to(dtype)
    h0 = torch.randn(b, nh, P, N, generator=g) if with_state else None
    to = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return tuple(map(to, (x, dt, A, B, C, h0)))


def rel_err(actual, expected) -> float:
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


@pytest.mark.parametrize("T", [1, BLOCK_T - 1, BLOCK_T, BLOCK_T + 1, 3 * BLOCK_T + 5])
@pytest.mark.parametrize("num_groups", [1, 2])
def test_scan_matches_reference(T, num_groups):
    x, dt, A, B, C, h0 = make_inputs(2, T, 4, 16, num_groups, 32)
    y, h = ssd_scan.ssd_scan_triton(x, dt, A, B, C, 8, h0, True, block_t=BLOCK_T)
    y_ref, h_ref = ssd_scan_reference(x, dt, A, B, C, 8, h0, True)
    assert y.dtype == h.dtype == torch.float32
    assert rel_err(y, y_ref) < FP32_TOL
    assert rel_err(h, h_ref) < FP32_TOL


def test_scan_matches_token_by_token_recurrence_without_initial_state():
    """Against ssd_step applied token by token (the recurrence itself), from the zero state, and with no final
    state asked for."""
    x, dt, A, B, C, _ = make_inputs(1, 2 * BLOCK_T + 3, 2, 16, 1, 16, with_state=False)
    y, h = ssd_scan.ssd_scan_triton(x, dt, A, B, C, 8, None, False, block_t=BLOCK_T)
    y_ref, _ = ssd_scan_recurrent(x, dt, A, B, C, 8)
    assert h is None
    assert rel_err(y, y_ref) < FP32_TOL


@pytest.mark.parametrize("num_segments", [2, 3, 7])
@pytest.mark.parametrize("with_state", [True, False])
def test_segmented_rows_match_reference(num_segments, with_state):
    """Rows cut into segments scanned in parallel (state pass, chaining, output pass); 7 asks for more segments
    than the 4 chunks there are. A mild decay (dt*A ~ -0.05) lets the carried state matter across segments."""
    x, dt, A, B, C, h0 = make_inputs(2, 3 * BLOCK_T + 5, 4, 16, 2, 16, with_state=with_state)
    dt = dt * 0.1
    y, h = ssd_scan.ssd_scan_triton(x, dt, A, B, C, 8, h0, True, block_t=BLOCK_T, num_segments=num_segments)
    y_ref, h_ref = ssd_scan_reference(x, dt, A, B, C, 8, h0, True)
    assert rel_err(y, y_ref) < FP32_TOL
    assert rel_err(h, h_ref) < FP32_TOL
    y_only, none = ssd_scan.ssd_scan_triton(x, dt, A, B, C, 8, h0, False, block_t=BLOCK_T,
                                              num_segments=num_segments)
    assert none is None and torch.equal(y_only, y)


def test_block_and_segment_choice():
    """The H100 sweep's choices for a 48-head, head_dim 64 mixer: whole heads, and segments until ~3 programs per
    SM (batch 1 -> 8, 2 -> 4, 4 -> 2, 8 -> 1), at least 512 steps each; packed sequences split heads instead."""
    assert ssd_scan.choose_block_p(1, 48, 64, 132, can_segment=True) == 64
    assert ssd_scan.choose_block_p(1, 4, 256, 132, can_segment=True) == 64
    assert ssd_scan.choose_block_p(1, 4, 20, 132, can_segment=True) == 32
    assert ssd_scan.choose_block_p(1, 48, 64, 132, can_segment=False) == 16  # 48 -> 96 -> 192 programs
    assert ssd_scan.choose_block_p(8, 48, 64, 132, can_segment=False) == 64
    assert [ssd_scan.choose_num_segments(b * 48, 4096, 132) for b in (1, 2, 4, 8, 16)] == [8, 4, 2, 1, 1]
    assert ssd_scan.choose_num_segments(48, 16384, 132) == 8
    assert ssd_scan.choose_num_segments(48, 1000, 132) == 1  # segments of at least 512 steps
    assert ssd_scan.choose_num_segments(48, 1500, 132) == 2


@pytest.mark.parametrize(("P", "N", "block_p"), [(32, 16, 16), (24, 20, None), (8, 8, None)])
def test_head_split_and_sizes_that_are_not_tiles(P, N, block_p):
    """Heads split over programs (block_p < head_dim), and head_dim / state_size that are not powers of two or
    are below the 16-wide dot tile (masked padding)."""
    x, dt, A, B, C, h0 = make_inputs(1, BLOCK_T + 3, 2, P, 1, N)
    y, h = ssd_scan.ssd_scan_triton(x, dt, A, B, C, 8, h0, True, block_t=BLOCK_T, block_p=block_p)
    y_ref, h_ref = ssd_scan_reference(x, dt, A, B, C, 8, h0, True)
    assert rel_err(y, y_ref) < FP32_TOL
    assert rel_err(h, h_ref) < FP32_TOL


def test_strided_views_are_read_in_place():
    """x, B and C as the mixer hands them over: column slices of one conv output row [b, T, conv_dim]."""
    b, T, nh, P, G, N = 2, BLOCK_T + 5, 2, 16, 1, 16
    x, dt, A, B, C, h0 = make_inputs(b, T, nh, P, G, N)
    packed = torch.cat([x.flatten(2), B.flatten(2), C.flatten(2)], dim=-1)  # (b, T, conv_dim)
    xs, Bs, Cs = packed.split([nh * P, G * N, G * N], dim=-1)
    xs, Bs, Cs = xs.view(b, T, nh, P), Bs.view(b, T, G, N), Cs.view(b, T, G, N)
    assert not xs.is_contiguous()
    y, h = ssd_scan.ssd_scan_triton(xs, dt, A, Bs, Cs, 8, h0, True, block_t=BLOCK_T)
    y_ref, h_ref = ssd_scan_reference(x, dt, A, B, C, 8, h0, True)
    assert rel_err(y, y_ref) < FP32_TOL
    assert rel_err(h, h_ref) < FP32_TOL


def test_padding_with_zero_dt_leaves_the_final_state_of_the_real_tokens():
    """Right padding reaches the kernel with dt = 0: the final state equals that after the real tokens alone."""
    T, real = 2 * BLOCK_T + 2, BLOCK_T + 3
    x, dt, A, B, C, h0 = make_inputs(1, T, 2, 16, 1, 16)
    x[:, real:] = 1e3  # loud padding: it must not leak
    dt[:, real:] = 0.0
    y, h = ssd_scan.ssd_scan_triton(x, dt, A, B, C, 8, h0, True, block_t=BLOCK_T)
    y_ref, h_ref = ssd_scan_reference(x[:, :real], dt[:, :real], A, B[:, :real], C[:, :real], 8, h0, True)
    assert rel_err(h, h_ref) < FP32_TOL
    assert rel_err(y[:, :real], y_ref) < FP32_TOL


@pytest.mark.parametrize("num_groups", [1, 2])
def test_packed_sequences_match_each_sequence_alone(num_groups):
    """cu_seqlens: sequences of lengths 1, block-1, block+1 and 2 blocks + 3 back to back in one row, each
    from its own initial state, with starts off the chunk grid."""
    lens = [1, BLOCK_T - 1, BLOCK_T + 1, 2 * BLOCK_T + 3]
    x, dt, A, B, C, _ = make_inputs(1, sum(lens), 4, 16, num_groups, 16, with_state=False)
    h0 = torch.randn(len(lens), 4, 16, 16, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    y, h = ssd_scan.ssd_scan_triton(x, dt, A, B, C, 8, h0, True, cu_seqlens=cu, block_t=BLOCK_T)
    assert h.shape == (len(lens), 4, 16, 16)
    for i, (s, e) in enumerate(zip(cu.tolist(), cu.tolist()[1:])):
        y_ref, h_ref = ssd_scan_reference(x[:, s:e], dt[:, s:e], A, B[:, s:e], C[:, s:e], 8, h0[i: i + 1], True)
        assert rel_err(y[:, s:e], y_ref) < FP32_TOL, f"sequence {i} (length {e - s})"
        assert rel_err(h[i: i + 1], h_ref) < FP32_TOL, f"sequence {i} (length {e - s})"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    """Model-dtype x, B, C (the intra-chunk dot then takes rounded operands) against the fp32 reference on the
    same rounded inputs."""
    if dtype == torch.bfloat16 and DEVICE.type != "cuda":
        pytest.skip("Triton 3.6's interpreter computes tl.dot on bf16 operands wrongly (off by ~1e10 on a 16x16 "
                    "randn product); fp16 covers the rounded-operand path here, bf16 runs on the GPU")
    x, dt, A, B, C, h0 = make_inputs(2, 2 * BLOCK_T + 7, 4, 16, 1, 16, dtype=dtype)
    y, h = ssd_scan.ssd_scan_triton(x, dt, A, B, C, 8, h0, True, block_t=BLOCK_T)
    y_ref, h_ref = ssd_scan_reference(x, dt, A, B, C, 8, h0, True)
    assert rel_err(y, y_ref) < BF16_TOL
    assert rel_err(h, h_ref) < BF16_TOL


def test_bad_inputs_raise_naming_the_value():
    x, dt, A, B, C, h0 = make_inputs(2, 5, 4, 16, 1, 16)
    scan = ssd_scan.ssd_scan_triton
    with pytest.raises(ValueError, match="num_heads=4 must be a multiple of num_groups=3"):
        scan(x, dt, A, B.expand(2, 5, 3, 16), C.expand(2, 5, 3, 16), 8)
    with pytest.raises(ValueError, match="dt must be float32"):
        scan(x, dt.double(), A, B, C, 8)
    with pytest.raises(ValueError, match="state_size=512 not supported"):
        scan(x, dt, A, torch.zeros(2, 5, 1, 512, device=DEVICE), torch.zeros(2, 5, 1, 512, device=DEVICE), 8)
    with pytest.raises(ValueError, match="initial_state must be"):
        scan(x, dt, A, B, C, 8, h0[:1])
    with pytest.raises(ValueError, match="one row"):
        scan(x, dt, A, B, C, 8, cu_seqlens=torch.tensor([0, 5], device=DEVICE))
    with pytest.raises(ValueError, match="block_p=32 must be a power of two"):
        scan(x, dt, A, B, C, 8, block_p=32)
    with pytest.raises(ValueError, match="block_t=24"):
        scan(x, dt, A, B, C, 8, block_t=24)
    with pytest.raises(ValueError, match="num_segments=0"):
        scan(x, dt, A, B, C, 8, num_segments=0)
    with pytest.raises(ValueError, match="num_segments=2 must be"):
        scan(x[:1], dt[:1], A, B[:1], C[:1], 8, cu_seqlens=torch.tensor([0, 2, 5], device=DEVICE), num_segments=2)


def test_refuses_cpu_tensors_outside_the_interpreter(monkeypatch):
    if DEVICE.type == "cuda":
        pytest.skip("checks the CPU refusal")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, dt, A, B, C, _ = make_inputs(1, 3, 2, 16, 1, 16)
    with pytest.raises(RuntimeError, match="runs on CUDA"):
        ssd_scan.ssd_scan_triton(x, dt, A, B, C, 8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("batch", [1, 3])
def test_granite_4_h_1b_shape_on_gpu(batch):
    """48 heads x 64 x state 128, one group, bf16, 1000 tokens (not a multiple of the default block), default
    block sizes; against the reference in fp32 on the same bf16 inputs."""
    x, dt, A, B, C, h0 = make_inputs(batch, 1000, 48, 64, 1, 128, dtype=torch.bfloat16)
    y, h = ssd_scan.ssd_scan_triton(x, dt, A, B, C, 256, h0, True)
    y_ref, h_ref = ssd_scan_reference(x, dt, A, B, C, 256, h0, True)
    assert rel_err(y, y_ref) < BF16_TOL
    assert rel_err(h, h_ref) < BF16_TOL
