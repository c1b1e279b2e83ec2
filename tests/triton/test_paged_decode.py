"""Paged decode kernel vs dense SDPA over contiguous K/V.

On CPU the Triton kernel runs in the interpreter (slow), so shapes here are tiny.
Tolerances: fp32 atol/rtol 2e-5 (interpreter and GPU, products in IEEE fp32);
bf16 atol/rtol 2e-2 (GPU).
"""

import math

import pytest
import torch

# On CPU, tests/conftest.py has put Triton in interpreter mode before anything imported it.
pytest.importorskip("triton", reason="triton is not installed; the paged decode kernel needs it")

import torch.nn.functional as F  # noqa: E402

from fms.triton.paged_decode import (  # noqa: E402
    DECODE_LAUNCH,
    choose_num_splits,
    default_launch,
    default_pages_per_iter,
    paged_decode_attention,
    paged_decode_reference,
)

pytestmark = pytest.mark.paged

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def fused_qkv_slice(q, num_kv_heads):
    """q (B, Hq, D) as a decode step hands it to the op: q[:, :, 0] of the (B, Hq, 1, D) view of a (B, 1, Hq + 2 Hkv,
    D) fused q/k/v projection (k and v zeros), so its row stride is (Hq + 2 Hkv) D."""
    b, hq, d = q.shape
    fused = q.new_zeros(b, 1, hq + 2 * num_kv_heads, d)
    fused[:, 0, :hq] = q
    return fused[:, :, :hq].transpose(1, 2)[:, :, 0]


def make_paged_case(seq_lens, page_size, num_kv_heads, group_size, head_dim, dtype, seed=0):
    """Random K/V per sequence, scattered into a NaN-filled pool through a shuffled page table.

    Table entries past each sequence's pages hold -1 or an out-of-range page id, so a kernel
    that reads them (or an unused slot) shows up as NaN or a fault.
    """
    gen = torch.Generator().manual_seed(seed)
    batch_size = len(seq_lens)
    num_q_heads = num_kv_heads * group_size
    pages_per_seq = [math.ceil(n / page_size) for n in seq_lens]
    max_pages = max(pages_per_seq) + 2
    num_pages = sum(pages_per_seq) + 3  # spare pages stay NaN
    physical = torch.randperm(num_pages, generator=gen)

    k_pool = torch.full((num_kv_heads, num_pages * page_size, head_dim), float("nan"))
    v_pool = torch.full_like(k_pool, float("nan"))
    page_table = torch.full((batch_size, max_pages), -1, dtype=torch.int32)
    page_table[:, 1::2] = num_pages + 1000
    dense_k, dense_v = [], []
    next_page = 0
    for b, (n, num_seq_pages) in enumerate(zip(seq_lens, pages_per_seq)):
        pages = physical[next_page : next_page + num_seq_pages]
        next_page += num_seq_pages
        page_table[b, :num_seq_pages] = pages.to(torch.int32)
        slots = (pages[:, None] * page_size + torch.arange(page_size)).reshape(-1)[:n]
        k = torch.randn(num_kv_heads, n, head_dim, generator=gen)
        v = torch.randn(num_kv_heads, n, head_dim, generator=gen)
        k_pool[:, slots] = k
        v_pool[:, slots] = v
        dense_k.append(k.to(dtype))
        dense_v.append(v.to(dtype))
    q = torch.randn(batch_size, num_q_heads, head_dim, generator=gen)
    return dict(
        q=q.to(DEVICE, dtype),
        k_pool=k_pool.to(DEVICE, dtype),
        v_pool=v_pool.to(DEVICE, dtype),
        page_table=page_table.to(DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        dense_k=dense_k,
        dense_v=dense_v,
    )


def dense_sdpa(case, scale, window=None):
    """Per-sequence SDPA over that sequence's contiguous K/V, in fp32."""
    outs = []
    for b, (k, v) in enumerate(zip(case["dense_k"], case["dense_v"])):
        n = k.shape[1]
        q = case["q"][b].float().cpu()[None, :, None, :]  # (1, Hq, 1, D)
        mask = None
        if window is not None:
            mask = ((n - 1 - torch.arange(n)) < window)[None, :]  # (1, L)
        out = F.scaled_dot_product_attention(
            q, k.float()[None], v.float()[None], attn_mask=mask, scale=scale, enable_gqa=True
        )
        outs.append(out[0, :, 0])  # (Hq, D)
    return torch.stack(outs)


def run_kernel(case, page_size, scale, **kwargs):
    keys = ("q", "k_pool", "v_pool", "page_table", "seq_lens")
    return paged_decode_attention(*(case[k] for k in keys), page_size, scale, **kwargs)


def assert_close(out, expected, dtype):
    assert out.dtype == dtype
    tol = TOL[dtype]
    torch.testing.assert_close(out.float().cpu(), expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("page_size", [16, 32])
@pytest.mark.parametrize("group_size", [1, 4, 8])
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("pages_per_iter", [1, 4])
def test_matches_dense_sdpa(page_size, group_size, num_splits, pages_per_iter):
    seq_lens = [1, page_size - 1, page_size, page_size + 1, 6 * page_size + 3]
    case = make_paged_case(seq_lens, page_size, 2, group_size, 32, torch.float32, seed=page_size + group_size)
    scale = 32**-0.5
    out = run_kernel(case, page_size, scale, num_splits=num_splits, pages_per_iter=pages_per_iter)
    assert_close(out, dense_sdpa(case, scale), torch.float32)


@pytest.mark.parametrize("page_size", [64, 128, 256])
@pytest.mark.parametrize(
    "dtype",
    [
        torch.float32,
        torch.float16,
        pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
            DEVICE == "cpu", reason="Triton's interpreter gets bf16 wrong (NumPy has no bfloat16; errors ~1e8 here); "
                              "bf16 runs on CUDA here and in test_gpu_llama_shapes_bf16")),
    ],
)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_large_pages_and_half_precision(page_size, dtype, num_splits):
    """The serving page sizes and fp16 / bf16 K/V, small enough for the interpreter on CPU."""
    seq_lens = [1, page_size - 1, page_size, page_size + 1, 3 * page_size + 5]
    case = make_paged_case(seq_lens, page_size, 2, 4, 32, dtype, seed=page_size)
    scale = 32**-0.5
    out = run_kernel(case, page_size, scale, num_splits=num_splits)
    assert_close(out, dense_sdpa(case, scale), dtype)
    out_w = run_kernel(case, page_size, scale, num_splits=num_splits, window=page_size + 3)
    assert_close(out_w, dense_sdpa(case, scale, window=page_size + 3), dtype)


@pytest.mark.parametrize("head_dim", [16, 64, 128, 256])
def test_head_dims(head_dim):
    page_size = 16
    case = make_paged_case([3, 2 * page_size + 1], page_size, 1, 2, head_dim, torch.float32, seed=head_dim)
    out = run_kernel(case, page_size, 0.3, num_splits=2, pages_per_iter=1)
    assert_close(out, dense_sdpa(case, 0.3), torch.float32)


@pytest.mark.parametrize("window", [1, 15, 19, 40])
@pytest.mark.parametrize("num_splits", [1, 2])
def test_sliding_window(window, num_splits):
    page_size = 16
    seq_lens = [1, page_size, page_size + 1, 5 * page_size + 7]
    case = make_paged_case(seq_lens, page_size, 2, 4, 32, torch.float32, seed=window)
    out = run_kernel(case, page_size, 0.2, window=window, num_splits=num_splits, pages_per_iter=1)
    assert_close(out, dense_sdpa(case, 0.2, window=window), torch.float32)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_page_logical_start_skips_freed_pages(num_splits):
    """Pages freed behind a sliding window: table entries -1, pool contents NaN."""
    page_size, window = 16, 20
    seq_lens = [5, 3 * page_size + 2, 6 * page_size]
    case = make_paged_case(seq_lens, page_size, 2, 4, 32, torch.float32, seed=7)
    first_held = [max(0, (n - window) // page_size) for n in seq_lens]
    for b, start in enumerate(first_held):
        for j in range(start):
            page = int(case["page_table"][b, j])
            case["k_pool"][:, page * page_size : (page + 1) * page_size] = float("nan")
            case["v_pool"][:, page * page_size : (page + 1) * page_size] = float("nan")
            case["page_table"][b, j] = -1
    start = torch.tensor(first_held, dtype=torch.int32, device=DEVICE)
    out = run_kernel(case, page_size, 0.2, window=window, num_splits=num_splits, page_logical_start=start)
    assert_close(out, dense_sdpa(case, 0.2, window=window), torch.float32)


def test_default_num_splits_and_pages_per_iter():
    page_size = 16
    case = make_paged_case([1, 40, 17], page_size, 2, 4, 64, torch.float32, seed=3)
    out = run_kernel(case, page_size, 0.125)
    assert_close(out, dense_sdpa(case, 0.125), torch.float32)


def test_default_launch_table():
    # The listed head dims, as written in the table; others take the next listed one up, or the largest.
    assert default_launch(64) == DECODE_LAUNCH[64] and default_launch(128) == DECODE_LAUNCH[128]
    assert default_launch(16) == DECODE_LAUNCH[min(DECODE_LAUNCH)]
    assert default_launch(256) == DECODE_LAUNCH[max(DECODE_LAUNCH)]
    block_n = DECODE_LAUNCH[64][0]
    assert default_pages_per_iter(16, 64) == block_n // 16
    assert default_pages_per_iter(block_n * 2, 64) == 1  # a page larger than the block: one page per step


@pytest.mark.parametrize("knobs", [dict(num_warps=1), dict(num_stages=1), dict(num_warps=2, num_stages=2)])
def test_explicit_launch_knobs_keep_the_result(knobs):
    page_size = 16
    case = make_paged_case([5, 40], page_size, 2, 4, 32, torch.float32, seed=4)
    assert_close(run_kernel(case, page_size, 0.2, **knobs), dense_sdpa(case, 0.2), torch.float32)


def test_reference_matches_dense_sdpa():
    page_size = 16
    case = make_paged_case([1, 15, 16, 17, 50], page_size, 2, 4, 32, torch.float32, seed=11)
    keys = ("q", "k_pool", "v_pool", "page_table", "seq_lens")
    for window in (None, 18):
        out = paged_decode_reference(*(case[k] for k in keys), page_size, 0.2, window=window)
        assert_close(out, dense_sdpa(case, 0.2, window=window), torch.float32)


def test_cpu_without_interpreter_uses_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    page_size = 16
    case = make_paged_case([1, 17], page_size, 1, 4, 16, torch.float32, seed=5)
    case = {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in case.items()}
    keys = ("q", "k_pool", "v_pool", "page_table", "seq_lens")
    out = paged_decode_attention(*(case[k] for k in keys), page_size, 0.25)
    torch.testing.assert_close(out, dense_sdpa(case, 0.25), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("lens", [[17], [5, 40, 9]])
def test_output_is_contiguous_for_a_query_sliced_from_fused_qkv(lens):
    """q as a decode step hands it over: a slice of the fused q/k/v projection, (B, Hq, D) with row stride
    (Hq + 2 Hkv) D, a dense layout at a batch of 1 only. The output's strides are the contiguous ones at every batch
    (empty_like would give a batch of 1 the slice's row stride: a compiled function taking the output would see its
    strides change with the batch) and its values equal the reference's."""
    page_size = 16
    case = make_paged_case(lens, page_size, 2, 4, 32, torch.float32, seed=6)
    q = case["q"]
    b, hq, d = q.shape
    hkv = case["k_pool"].shape[0]
    sliced = fused_qkv_slice(q, hkv)
    assert sliced.stride(0) == (hq + 2 * hkv) * d
    keys = ("k_pool", "v_pool", "page_table", "seq_lens")
    out = paged_decode_attention(sliced, *(case[k] for k in keys), page_size, 0.2)
    assert out.stride() == (hq * d, d, 1)
    assert_close(out, paged_decode_reference(q, *(case[k] for k in keys), page_size, 0.2), torch.float32)


def test_choose_num_splits():
    # Batch alone fills the GPU: no split.
    assert choose_num_splits(32, 8, 16384, 64, num_sms=132) == 1
    # Batch 1, long context: about two programs per SM.
    splits = choose_num_splits(1, 8, 16384, 64, num_sms=132)
    assert 1 * 8 * splits >= 2 * 132 and splits <= 64
    # Short context: no more splits than key blocks.
    assert choose_num_splits(1, 8, 256, 64, num_sms=132) == 4
    assert choose_num_splits(1, 8, 16, 64, num_sms=132) == 1
    # Batch 8 at 64 programs: about two programs per SM.
    assert choose_num_splits(8, 8, 4096, 64, num_sms=132) == 5


def _valid_args():
    q = torch.randn(2, 8, 32)
    k_pool = torch.randn(2, 64, 32)
    v_pool = torch.randn(2, 64, 32)
    page_table = torch.zeros(2, 4, dtype=torch.int32)
    seq_lens = torch.ones(2, dtype=torch.int32)
    return dict(q=q, k_pool=k_pool, v_pool=v_pool, page_table=page_table, seq_lens=seq_lens, page_size=16, scale=1.0)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(k_pool=torch.randn(2, 64, 32, dtype=torch.float16)), "dtype mismatch"),
        (dict(q=torch.randn(2, 8, 32).long()), "q dtype"),
        (dict(q=torch.randn(2, 7, 32)), "multiple of num_kv_heads"),
        (dict(q=torch.randn(2, 8, 16)), "head_dim mismatch"),
        (dict(q=torch.randn(2, 8, 24), k_pool=torch.randn(2, 48, 24), v_pool=torch.randn(2, 48, 24)), "power of two"),
        (dict(q=torch.randn(2, 8, 1, 32)), r"q must be \[batch"),
        (dict(v_pool=torch.randn(2, 32, 32)), "v_pool shape"),
        (dict(page_size=24), "page_size=24"),
        (dict(page_size=8), "page_size=8"),
        (dict(page_size=512), "page_size=512"),
        (dict(page_table=torch.zeros(2, 4, dtype=torch.int64)), "page_table dtype"),
        (dict(page_table=torch.zeros(3, 4, dtype=torch.int32)), "page_table must be"),
        (dict(seq_lens=torch.ones(3, dtype=torch.int32)), "seq_lens must be"),
        (dict(seq_lens=torch.ones(2, dtype=torch.int64)), "seq_lens must be"),
        (dict(window=0), "window=0"),
        (dict(num_splits=0), "num_splits=0"),
        (dict(page_logical_start=torch.zeros(2, dtype=torch.int64)), "page_logical_start"),
        (dict(pages_per_iter=3), "pages_per_iter=3"),
        (dict(num_warps=0), "num_warps=0"),
        (dict(num_stages=2.0), "num_stages=2.0"),
        (dict(num_warps=True), "num_warps=True"),
    ],
)
def test_rejects_bad_inputs(change, match):
    args = _valid_args()
    args.update(change)
    with pytest.raises(ValueError, match=match):
        paged_decode_attention(**args)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("page_size", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("group_size", [1, 4, 8])
@pytest.mark.parametrize("num_splits", [1, 4, None])
def test_gpu_llama_shapes_bf16(page_size, group_size, num_splits):
    seq_lens = [1, page_size - 1, page_size, page_size + 1, 1000, 3001]
    case = make_paged_case(seq_lens, page_size, 8, group_size, 128, torch.bfloat16, seed=page_size)
    scale = 128**-0.5
    out = run_kernel(case, page_size, scale, num_splits=num_splits)
    assert_close(out, dense_sdpa(case, scale), torch.bfloat16)
    out_w = run_kernel(case, page_size, scale, num_splits=num_splits, window=700)
    assert_close(out_w, dense_sdpa(case, scale, window=700), torch.bfloat16)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_gpu_dtypes_and_head_dims(dtype, head_dim):
    page_size = 16
    seq_lens = [1, 15, 16, 17, 517]
    case = make_paged_case(seq_lens, page_size, 4, 4, head_dim, dtype, seed=head_dim)
    scale = head_dim**-0.5
    for num_splits in (1, 5):
        assert_close(run_kernel(case, page_size, scale, num_splits=num_splits), dense_sdpa(case, scale), dtype)


# The engine's CUDA-graph batch sizes (fms.serving.config) and a batch of one (the unbacked batch's graph).
GRAPH_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128)


@pytest.mark.parametrize("num_q_heads, num_kv_heads, head_dim", [(32, 8, 64), (32, 8, 128), (12, 4, 128)],
                         ids=["llama-3.2-1b", "llama-3.1-8b", "granite-4.0-h-1b"])
def test_one_compile_of_each_kernel_for_every_graph_batch_size(monkeypatch, num_q_heads, num_kv_heads, head_dim):
    """Every distinct launch key is a Triton compile at engine start-up, when the decode step is captured at each
    batch size (about 0.25 s each on the H200, final_project section 29). The split count follows the batch, so the
    split kernel compiles twice (with and without a split) and the merge kernel once, whatever the batch; the shapes
    are the real models' (4096-token context, pages of 16, 132 SMs as on the H100 and H200)."""
    from fms.triton import paged_decode as module
    from tests.triton.launch_keys import LaunchRecorder

    split = LaunchRecorder(module._paged_decode_split_kernel)
    merge = LaunchRecorder(module._paged_decode_merge_kernel)
    monkeypatch.setattr(module, "_paged_decode_split_kernel", split)
    monkeypatch.setattr(module, "_paged_decode_merge_kernel", merge)
    monkeypatch.setattr(module, "can_run_triton", lambda device: True)
    monkeypatch.setattr(module, "sm_count", lambda device: 132)
    page_size, max_pages = 16, 4096 // 16
    pool = torch.zeros(num_kv_heads, 8 * page_size, head_dim, dtype=torch.bfloat16)
    for batch in GRAPH_BATCHES:
        q = fused_qkv_slice(torch.zeros(batch, num_q_heads, head_dim, dtype=torch.bfloat16), num_kv_heads)
        table = torch.zeros(batch, max_pages, dtype=torch.int32)
        paged_decode_attention(q, pool, pool, table, torch.ones(batch, dtype=torch.int32), page_size, 0.1)
    split_counts = {grid[2] for grid, _, _ in split.launches}
    assert 1 in split_counts and len(split_counts) >= 5  # the batches took no split and several split counts
    assert len(merge.launches) == sum(1 for c in (grid[2] for grid, _, _ in split.launches) if c > 1)
    assert len(split.variants) == 2, split.variants
    assert len(merge.variants) == 1, merge.variants


def test_one_merge_compile_for_every_explicit_split_count(monkeypatch):
    from fms.triton import paged_decode as module
    from tests.triton.launch_keys import LaunchRecorder

    merge = LaunchRecorder(module._paged_decode_merge_kernel)
    monkeypatch.setattr(module, "_paged_decode_split_kernel", LaunchRecorder(module._paged_decode_split_kernel))
    monkeypatch.setattr(module, "_paged_decode_merge_kernel", merge)
    monkeypatch.setattr(module, "can_run_triton", lambda device: True)
    args = _valid_args()
    for num_splits in range(2, 65):
        paged_decode_attention(**args, num_splits=num_splits)
    assert len(merge.launches) == 63
    assert len(merge.variants) == 1, len(merge.variants)


def _take_out_last_kv(case, seq_lens, page_size):
    """Move each sequence's last key and value out of the pool into new_kv (its slot NaN in the pool), as a decode
    step holds them before the write: the kernel must store them and attend to them."""
    table = case["page_table"].cpu().long()
    slots = torch.tensor([int(table[b, (n - 1) // page_size]) * page_size + (n - 1) % page_size
                          for b, n in enumerate(seq_lens)])
    k_new = case["k_pool"][:, slots.to(DEVICE)].transpose(0, 1).clone()  # (B, Hkv, D)
    v_new = case["v_pool"][:, slots.to(DEVICE)].transpose(0, 1).clone()
    case["k_pool"][:, slots.to(DEVICE)] = float("nan")
    case["v_pool"][:, slots.to(DEVICE)] = float("nan")
    return k_new, v_new, slots.to(DEVICE)


@pytest.mark.parametrize("num_splits, pages_per_iter", [(1, 1), (1, 4), (3, 1), (4, 2), (None, None)])
@pytest.mark.parametrize("window", [None, 40])
def test_new_kv_is_written_and_attended(num_splits, pages_per_iter, window):
    page_size, seq_lens = 16, [1, 15, 16, 17, 70, 129]
    case = make_paged_case(seq_lens, page_size, 2, 4, 32, torch.float32, seed=11)
    expected = dense_sdpa(case, 0.2, window=window)
    k_new, v_new, slots = _take_out_last_kv(case, seq_lens, page_size)
    k_before, v_before = case["k_pool"].clone(), case["v_pool"].clone()
    out = run_kernel(case, page_size, 0.2, num_splits=num_splits, pages_per_iter=pages_per_iter, window=window,
                     new_kv=(k_new, v_new, slots))
    assert_close(out, expected, torch.float32)
    # the pool holds the new K/V at their slots and is untouched elsewhere (NaN where it was NaN)
    k_before[:, slots] = k_new.transpose(0, 1)
    v_before[:, slots] = v_new.transpose(0, 1)
    torch.testing.assert_close(case["k_pool"], k_before, equal_nan=True, atol=0, rtol=0)
    torch.testing.assert_close(case["v_pool"], v_before, equal_nan=True, atol=0, rtol=0)


def test_new_kv_with_freed_leading_pages():
    page_size, seq_lens = 16, [40, 100]
    case = make_paged_case(seq_lens, page_size, 2, 2, 32, torch.float32, seed=5)
    start = torch.tensor([1, 3], dtype=torch.int32, device=DEVICE)  # pages before these are gone
    window_expected = run_kernel(case, page_size, 0.3, page_logical_start=start)
    new_kv = _take_out_last_kv(case, seq_lens, page_size)
    out = run_kernel(case, page_size, 0.3, page_logical_start=start, num_splits=2, new_kv=new_kv)
    assert_close(out, window_expected.float().cpu(), torch.float32)


def test_new_kv_on_the_reference_path_writes_then_attends(monkeypatch):
    from fms.triton import paged_decode as module

    monkeypatch.setattr(module, "can_run_triton", lambda device: False)
    page_size, seq_lens = 16, [3, 33]
    case = make_paged_case(seq_lens, page_size, 2, 2, 32, torch.float32, seed=2)
    expected = dense_sdpa(case, 0.2)
    k_new, v_new, slots = _take_out_last_kv(case, seq_lens, page_size)
    out = run_kernel(case, page_size, 0.2, new_kv=(k_new, v_new, slots.int()))
    assert_close(out, expected, torch.float32)
    torch.testing.assert_close(case["k_pool"][:, slots], k_new.transpose(0, 1))


@pytest.mark.parametrize("bad, match", [
    (lambda k, v, s: (k, v), "new_kv must be"),
    (lambda k, v, s: (k[:1], v, s), "new_kv's k must be"),
    (lambda k, v, s: (k, v.double(), s), "new_kv's v must be"),
    (lambda k, v, s: (k, v, s.float()), "new_kv's slots"),
    (lambda k, v, s: (k, v, s[:1]), "new_kv's slots"),
])
def test_new_kv_rejects_bad_input(bad, match):
    args = _valid_args()
    k, v, s = torch.zeros(2, 2, 32), torch.zeros(2, 2, 32), torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match=match):
        paged_decode_attention(**args, new_kv=bad(k, v, s))


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [1, 4, None])
def test_gpu_new_kv_bf16(num_splits):
    page_size, seq_lens = 16, [1, 15, 16, 17, 1000, 3001]
    case = make_paged_case(seq_lens, page_size, 8, 4, 128, torch.bfloat16, seed=3)
    expected = dense_sdpa(case, 128**-0.5)
    k_new, v_new, slots = _take_out_last_kv(case, seq_lens, page_size)
    out = run_kernel(case, page_size, 128**-0.5, num_splits=num_splits, new_kv=(k_new, v_new, slots))
    assert_close(out, expected, torch.bfloat16)
    torch.testing.assert_close(case["k_pool"][:, slots], k_new.transpose(0, 1), atol=0, rtol=0)
    torch.testing.assert_close(case["v_pool"][:, slots], v_new.transpose(0, 1), atol=0, rtol=0)

