"""The one-launch paged K/V write (fms.triton.kv_write) against two index_copy_, bit for bit.

On CPU the kernel runs in Triton's interpreter; shapes are small.
"""

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed; the K/V write kernel needs it")

from fms.triton.kv_write import kv_write_reference, kv_write_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("b,t,hkv,d,dtype", [(3, 1, 2, 16, torch.float32), (2, 5, 4, 32, torch.bfloat16),
                                             (1, 7, 1, 24, torch.float16)])
def test_kernel_equals_index_copy(b, t, hkv, d, dtype):
    g = torch.Generator().manual_seed(b * 100 + t)
    # k/v as the attention layer hands them over: views of a (B, T, Hkv, D) projection, transposed
    k, v = (torch.randn(b, t, hkv, d, generator=g).to(dtype).to(DEVICE).transpose(1, 2) for _ in range(2))
    slots = torch.randperm(40, generator=g)[: b * t].to(DEVICE)
    pools = [torch.randn(hkv, 40, d, generator=g).to(dtype).to(DEVICE) for _ in range(2)]
    expected = [p.clone() for p in pools]
    kv_write_reference(*expected, k, v, slots)
    kv_write_triton(*pools, k, v, slots)
    for got, want in zip(pools, expected):
        assert torch.equal(got, want)


def test_bad_shapes_are_named():
    k = torch.zeros(2, 2, 1, 16)
    with pytest.raises(ValueError, match=r"slot_mapping must hold B\*T = 2 slots, got shape \(3,\)"):
        kv_write_triton(torch.zeros(2, 8, 16), torch.zeros(2, 8, 16), k, k, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"v_pool must be \[Hkv=2, slots, D=16\], got \(2, 8, 32\)"):
        kv_write_triton(torch.zeros(2, 8, 16), torch.zeros(2, 8, 32), k, k, torch.zeros(2, dtype=torch.int64))
