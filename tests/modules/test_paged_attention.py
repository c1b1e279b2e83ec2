"""The paged op against SDPA over contiguous K/V, at op level, on fresh random inputs.

fp32 on CPU (eager FlexAttention): outputs agree within atol 1e-5, rtol 1e-5.
"""

import itertools
import math
import os
import random

import pytest
import torch
import torch.nn.functional as F

from fms.modules.attention import PagedOp, get_attention_op
from fms.cache.allocator import OutOfPagesError
from fms.cache.spec import KVCacheSpec
from fms.modules.masks import AttentionVariant
from fms.cache.paged import SUPPORTED_PAGE_SIZES, PagedKVCache, build_paged_block_mask

pytestmark = pytest.mark.paged

# FMS_TEST_DEVICE=cuda runs the same checks through the compiled CUDA kernels (TF32-level tolerance).
DEVICE = torch.device(os.environ.get("FMS_TEST_DEVICE", "cpu"))
ATOL = RTOL = 1e-5 if DEVICE.type == "cpu" else 2e-3
HEAD_DIM = 16
CAUSAL = AttentionVariant()


def _spec(num_kv_heads=2, max_pos=4096):
    return KVCacheSpec(num_layers=1, attention_layers=(0,), num_kv_heads=num_kv_heads, head_dim=HEAD_DIM,
                       dtype=torch.float32, device=DEVICE, max_position_embeddings=max_pos)


def _reference(q, k_all, v_all, q_positions, scale):
    """Dense causal attention of one sequence: q (Hq, T, D) at positions q_positions over k_all (Hkv, L, D)."""
    mask = torch.arange(k_all.shape[1], device=k_all.device)[None, :] <= q_positions[:, None]
    return F.scaled_dot_product_attention(q[None], k_all[None], v_all[None], attn_mask=mask[None, None],
                                          scale=scale, enable_gqa=True)[0]


class _Driver:
    """Feeds random K/V through the paged op step by step and keeps the full history per sequence.

    The op computes even fresh prefills and decode steps over the page pool with FlexAttention
    (not its SDPA shortcut or the decode kernel, which have tests of their own).
    """

    def __init__(self, cache, num_heads, num_kv_heads, seed, op=None):
        self.cache, self.hq, self.hkv = cache, num_heads, num_kv_heads
        self.gen = torch.Generator(device=DEVICE).manual_seed(seed)
        self.history = {}
        self.op = op or PagedOp(decode_kernel="flex", prefill_kernel="flex")
        self.scale = HEAD_DIM**-0.5

    def add(self, seq_id):
        self.cache.add(seq_id)
        empty = torch.empty(self.hkv, 0, HEAD_DIM, device=DEVICE)
        self.history[seq_id] = (empty, empty)

    def step(self, seq_ids, counts, packed=False):
        t = max(counts)
        b = len(seq_ids)
        q = torch.randn(b, self.hq, t, HEAD_DIM, generator=self.gen, device=DEVICE)
        k = torch.randn(b, self.hkv, t, HEAD_DIM, generator=self.gen, device=DEVICE)
        v = torch.randn(b, self.hkv, t, HEAD_DIM, generator=self.gen, device=DEVICE)
        if packed:  # the same tokens, rows back to back in one (1, H, N, D) row
            meta = self.cache.prepare(seq_ids, counts, packed=True)
            qp, kp, vp = (torch.cat([x[row, :, :n] for row, n in enumerate(counts)], 1)[None] for x in (q, k, v))
            flat = self.op.attend(qp, kp, vp, layer_idx=0, scale=self.scale, variant=CAUSAL, cache=self.cache,
                                  meta=meta)
            out = torch.zeros_like(q)
            for row, (start, n) in enumerate(zip([0, *itertools.accumulate(counts)], counts)):
                out[row, :, :n] = flat[0, :, start:start + n]
        else:
            meta = self.cache.prepare(seq_ids, counts)
            out = self.op.attend(q, k, v, layer_idx=0, scale=self.scale, variant=CAUSAL, cache=self.cache, meta=meta)
        for row, (seq_id, n) in enumerate(zip(seq_ids, counts)):
            hk, hv = self.history[seq_id]
            hk, hv = torch.cat([hk, k[row, :, :n]], 1), torch.cat([hv, v[row, :, :n]], 1)
            self.history[seq_id] = (hk, hv)
            positions = torch.arange(hk.shape[1] - n, hk.shape[1], device=DEVICE)
            expected = _reference(q[row, :, :n], hk, hv, positions, self.scale)
            torch.testing.assert_close(out[row, :, :n], expected, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("page_size", SUPPORTED_PAGE_SIZES)
@pytest.mark.parametrize("group", [1, 4, 8])
def test_prefill_then_decode_every_page_size_and_gqa(page_size, group):
    hkv = 2
    lengths = [1, page_size - 1, page_size, page_size + 1]
    cache = PagedKVCache(_spec(hkv), max_batch_size=4, max_seq_len=page_size * 3, page_size=page_size)
    driver = _Driver(cache, hkv * group, hkv, seed=page_size * 10 + group)
    for i in range(4):
        driver.add(i)
    driver.step([0, 1, 2, 3], lengths)  # ragged prefill
    for _ in range(3):
        driver.step([0, 1, 2, 3], [1, 1, 1, 1])  # decode across page boundaries


@pytest.mark.parametrize("packed", [False, True])
def test_registered_op_varlen_prefill_matches(packed):
    """The default op: multi-token steps by varlen attention (flash on CUDA bf16, per-row SDPA here)."""
    cache = PagedKVCache(_spec(2), max_batch_size=3, max_seq_len=96, page_size=16)
    driver = _Driver(cache, 8, 2, seed=21, op=get_attention_op("paged"))
    driver.add(0)
    driver.add(1)
    driver.step([0, 1], [20, 3], packed)  # fresh ragged prefill: the step's own K/V are all the keys
    driver.step([0, 1], [5, 9], packed)  # chunks after cached context: keys gathered from the pool
    driver.add(2)
    driver.step([2, 0, 1], [17, 1, 30], packed)  # a fresh row beside rows with context
    driver.step([0, 1, 2], [1, 1, 1])  # decode kernel (Triton on CUDA, its torch reference on CPU)


@pytest.mark.parametrize("counts", [[20, 3], [1, 1]])  # a prefill step and a decode step
def test_write_kv_then_attend_equals_attend_writing(counts):
    """The layers compile scope writes a step's K/V with write_kv (inside a compiled graph) and then attends with
    kv_written=True: the same pools and the same output as attend doing both. Ops without a separate write say so."""
    op = get_attention_op("paged")
    g = torch.Generator(device=DEVICE).manual_seed(5)
    q = torch.randn(2, 4, max(counts), HEAD_DIM, generator=g, device=DEVICE)
    k, v = (torch.randn(2, 2, max(counts), HEAD_DIM, generator=g, device=DEVICE) for _ in range(2))
    outs, pools = [], []
    for split in (False, True):
        cache = PagedKVCache(_spec(2), max_batch_size=2, max_seq_len=64, page_size=16)
        for seq in (0, 1):
            cache.add(seq)
        if counts == [1, 1]:  # context first, so that the decode step reads cached keys
            cache.prepare([0, 1], [7, 12])
        meta = cache.prepare([0, 1], counts)
        kwargs = dict(layer_idx=0, scale=HEAD_DIM**-0.5, variant=CAUSAL, cache=cache, meta=meta)
        if split:
            state = op.layer_kv_state(cache, 0)
            assert state[0] is cache.layer_kv(0)[0]
            op.write_kv(k, v, state, meta)
            outs.append(op.attend(q, k, v, kv_written=True, **kwargs))
        else:
            outs.append(op.attend(q, k, v, **kwargs))
        pools.append(cache.layer_kv(0))
    for a, b in zip(pools[0], pools[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert pools[0][0].abs().sum() > 0  # something was written
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    sdpa = get_attention_op("sdpa")
    assert sdpa.layer_kv_state(None, 0) is None
    with pytest.raises(NotImplementedError, match="attention op 'sdpa' writes K/V in attend"):
        sdpa.write_kv(k, v, None, None)


def test_compiled_write_kv_is_one_opaque_in_place_op():
    """Under torch.compile the paged op's write_kv (the layers scope's K/V write) stays the opaque op
    fms::paged_kv_write on the graph's input pools: inductor generates no kernel that mutates a pool (it would
    benchmark such a kernel on a backup of the whole pool) and copies no pool. The pools end up as the eager write
    leaves them."""
    from types import SimpleNamespace

    from torch._inductor.utils import run_and_get_code

    op = get_attention_op("paged")

    def step(x, k_pool, v_pool, slots):
        k, v = (x * 2).sin(), x.cos()  # stands for the projections and rotary the write is traced with
        op.write_kv(k, v, (k_pool, v_pool), SimpleNamespace(slot_mapping=slots))
        return k + 1

    x = torch.randn(3, 2, 1, HEAD_DIM, generator=torch.Generator().manual_seed(0))
    slots = torch.tensor([5, 9, 100])
    pools = [torch.zeros(2, 256, HEAD_DIM) for _ in range(4)]
    step(x, pools[0], pools[1], slots)  # eager
    torch._dynamo.reset()
    _, codes = run_and_get_code(torch.compile(step, dynamic=True), x, pools[2], pools[3], slots)
    code = "\n".join(codes)
    assert code.count("torch.ops.fms.paged_kv_write.default(") == 1, code
    assert "index_copy" not in code and "clone" not in code, code
    for eager, compiled in zip(pools[:2], pools[2:]):
        assert eager.abs().sum() > 0
        torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)


def test_packed_steps_are_refused_where_they_cannot_run():
    cache = PagedKVCache(_spec(2), max_batch_size=2, max_seq_len=64, page_size=16)
    cache.add(0)
    with pytest.raises(ValueError, match="query_len or packed"):
        cache.prepare([0], [4], query_len=8, packed=True)
    meta = cache.prepare([0], [4], packed=True)
    q = torch.randn(1, 4, 4, HEAD_DIM, device=DEVICE)
    k = torch.randn(1, 2, 4, HEAD_DIM, device=DEVICE)
    with pytest.raises(ValueError, match="packed step needs causal"):
        PagedOp(prefill_kernel="flex").attend(q, k, k, layer_idx=0, scale=1.0, variant=CAUSAL, cache=cache, meta=meta)
    with pytest.raises(ValueError, match="packed step needs causal"):
        get_attention_op("paged").attend(q, k, k, layer_idx=0, scale=1.0, variant=AttentionVariant(alibi=True),
                                         cache=cache, meta=meta)
    contiguous = get_attention_op("sdpa").create_cache(_spec(2), 1, 64)
    contiguous.add(0)
    with pytest.raises(ValueError, match="cannot take packed steps"):
        contiguous.prepare([0], [4], packed=True)
    with pytest.raises(ValueError, match="prefill_kernel must be"):
        PagedOp(prefill_kernel="sdpa")


def test_which_prefill_steps_take_flex():
    cache = PagedKVCache(_spec(2), max_batch_size=1, max_seq_len=64, page_size=16)
    assert get_attention_op("paged").can_pack(CAUSAL, cache)
    assert not get_attention_op("paged").prefill_uses_flex(CAUSAL, cache)
    assert get_attention_op("paged").prefill_uses_flex(AttentionVariant(alibi=True), cache)
    assert PagedOp(prefill_kernel="flex").prefill_uses_flex(CAUSAL, cache)
    assert not PagedOp(prefill_kernel="flex").can_pack(CAUSAL, cache)


@pytest.mark.parametrize("page_size", [16, 32])
def test_chunked_prefill_and_interleaved_growth_scatter_pages(page_size):
    cache = PagedKVCache(_spec(2), max_batch_size=3, max_seq_len=8 * page_size, page_size=page_size)
    driver = _Driver(cache, 8, 2, seed=7)
    for i in range(3):
        driver.add(i)
    rng = random.Random(3)
    # sequences grow in random-sized chunks, so their pages interleave in the pool
    for _ in range(6):
        counts = [rng.randint(1, page_size + 3) for _ in range(3)]
        driver.step([0, 1, 2], counts)
    tables = [cache.block_table(i) for i in range(3)]
    assert any(t != sorted(t) or t != list(range(t[0], t[0] + len(t))) for t in tables), tables


def test_subset_of_sequences_per_step_and_freeing():
    cache = PagedKVCache(_spec(2), max_batch_size=4, max_seq_len=128, page_size=16)
    driver = _Driver(cache, 4, 2, seed=11)
    for i in range(4):
        driver.add(i)
    driver.step([0, 1, 2, 3], [20, 3, 17, 40])
    cache.free(1)
    driver.step([3, 0], [1, 5])
    driver.add(9)
    driver.step([9, 2], [33, 1])  # new sequence reuses freed pages
    driver.step([0, 2, 3, 9], [1, 1, 1, 1])


def test_fork_many_is_all_or_nothing():
    cache = PagedKVCache(_spec(2), max_batch_size=3, max_seq_len=64, page_size=16)
    cache.add("parent")
    cache.prepare(["parent"], [20])
    free = cache.manager.num_free_pages
    with pytest.raises(ValueError, match="'parent' is already in the cache"):
        cache.fork_many([("parent", "a"), ("parent", "parent")])
    assert cache.sequences == ["parent"] and cache.manager.num_free_pages == free
    cache.manager.check_invariants()
    cache.fork_many([("parent", "a"), ("parent", "b")])  # the two slots left
    assert cache.block_table("a") == cache.block_table("b") == cache.block_table("parent")
    with pytest.raises(ValueError, match="at most 3 sequences"):
        cache.fork_many([("parent", "c")])
    for seq in ("a", "b", "parent"):
        cache.free(seq)
    assert cache.manager.num_free_pages == cache.manager.num_pages
    cache.manager.check_invariants()


def test_forked_sequences_share_a_prefix_with_copy_on_write():
    page_size = 16
    cache = PagedKVCache(_spec(2), max_batch_size=3, max_seq_len=128, page_size=page_size)
    driver = _Driver(cache, 8, 2, seed=5)
    driver.add("parent")
    driver.step(["parent"], [page_size + 5])  # one full page + a partial page
    cache.fork("parent", "child")
    driver.history["child"] = driver.history["parent"]
    parent_pages = cache.block_table("parent")
    assert cache.block_table("child") == parent_pages
    driver.step(["parent", "child"], [3, 4])  # both write into the shared partial page -> copy on write
    assert cache.block_table("child")[0] == parent_pages[0]  # the full page stays shared
    assert cache.block_table("child")[1] != cache.block_table("parent")[1]
    driver.step(["child", "parent"], [1, 1])


def test_fork_of_a_windowed_sequence_maps_released_pages_to_no_slot():
    """A sliding-window sequence gives back pages no query can see (RELEASED, -1, in its block table); a
    fork inherits those entries. The device table reads them as page 0, and the held pages keep their
    logical index, so the child's window rows and page_logical match its block table."""
    page_size, window = 16, 32
    spec = KVCacheSpec(num_layers=1, attention_layers=(0,), num_kv_heads=2, head_dim=HEAD_DIM, dtype=torch.float32,
                       device=DEVICE, max_position_embeddings=4096, sliding_window=window)
    cache = PagedKVCache(spec, max_batch_size=2, max_seq_len=128, page_size=page_size)
    cache.add("parent")
    cache.prepare(["parent"], [5 * page_size + 3])
    assert cache.release_out_of_window("parent")  # the first pages fall out of the window
    table = cache.block_table("parent")
    released = [j for j, p in enumerate(table) if p < 0]
    assert released and released == list(range(len(released)))
    cache.fork("parent", "child")
    assert cache.block_table("child") == table
    rows = cache.prepare_decode_window(["child", "parent"], [1, 1]).rows
    child = cache.block_table("child")
    assert rows[0, :len(child)].tolist() == [max(p, 0) for p in child]
    logical = cache.page_logical.cpu()
    for j, p in enumerate(child):
        if p >= 0:
            assert logical[p].item() == j


@pytest.mark.parametrize("page_size", [16, 64])
def test_block_mask_from_a_shuffled_page_table(page_size):
    """Any permutation of physical pages gives the same attention as contiguous K/V."""
    gen = torch.Generator().manual_seed(page_size)
    hkv, hq, num_pages = 2, 8, 12
    lengths = [3 * page_size + 1, page_size, 1]
    width = 4
    perm = torch.randperm(num_pages, generator=gen)
    pool_k = torch.randn(hkv, (num_pages + 1) * page_size, HEAD_DIM, generator=gen)
    pool_v = torch.randn_like(pool_k)
    table = torch.zeros(len(lengths), width, dtype=torch.int32)
    page_logical = torch.zeros(num_pages + 1, dtype=torch.int32)
    used = iter(perm.tolist())
    for b, n in enumerate(lengths):
        for j in range(math.ceil(n / page_size)):
            p = next(used)
            table[b, j] = p
            page_logical[p] = j
    # decode: one query per sequence at its last position
    q = torch.randn(len(lengths), hq, 1, HEAD_DIM, generator=gen)
    q_start = torch.tensor([n - 1 for n in lengths])
    pool_k, pool_v, q, table, q_start, page_logical = (
        t.to(DEVICE) for t in (pool_k, pool_v, q, table, q_start, page_logical))
    mask = build_paged_block_mask(table, q_start, torch.ones(len(lengths), dtype=torch.int64, device=DEVICE), 1,
                                  page_size, page_logical, pool_k.shape[1], None)
    from fms.modules.attention import flex_attention

    out = flex_attention(q, pool_k[None], pool_v[None], scale=0.25, block_mask=mask)
    for b, n in enumerate(lengths):
        slots = torch.cat([torch.arange(p * page_size, (p + 1) * page_size) for p in table[b].tolist()])[:n]
        slots = slots.to(DEVICE)
        expected = _reference(q[b], pool_k[:, slots], pool_v[:, slots], torch.tensor([n - 1], device=DEVICE), 0.25)
        torch.testing.assert_close(out[b], expected, atol=ATOL, rtol=RTOL)


def test_out_of_pages_raises_and_leaves_the_cache_intact():
    cache = PagedKVCache(_spec(2), max_batch_size=3, max_seq_len=256, page_size=16, num_pages=4)
    driver = _Driver(cache, 4, 2, seed=1)
    driver.add(0)
    driver.add(1)
    driver.step([0, 1], [30, 20])  # 2 + 2 pages: pool full
    before = (cache.block_table(0), cache.block_table(1), cache.length(0), cache.manager.allocator.num_free)
    with pytest.raises(OutOfPagesError, match="pages"):
        cache.prepare([0, 1], [1, 20])
    assert (cache.block_table(0), cache.block_table(1), cache.length(0), cache.manager.allocator.num_free) == before
    driver.step([0], [2])  # seq 0's last page still has room; nothing was corrupted
    driver.step([1], [1])


def test_memory_stats_follow_the_tokens():
    cache = PagedKVCache(_spec(2), max_batch_size=2, max_seq_len=256, page_size=16, num_pages=20)
    cache.add(0)
    cache.add(1)
    cache.prepare([0, 1], [17, 40])
    stats = cache.memory_stats()
    per_token = _spec(2).kv_bytes_per_token
    assert stats.pages_in_use == 2 + 3
    assert stats.bytes_holding_tokens == 57 * per_token
    assert stats.bytes_in_use == 5 * 16 * per_token
    assert stats.bytes_allocated == 20 * 16 * per_token
    cache.free(1)
    assert cache.memory_stats().pages_in_use == 2


@pytest.mark.parametrize("page_size", [0, 8, 24, 100, 512])
def test_bad_page_size_is_rejected(page_size):
    with pytest.raises(ValueError, match=f"page_size {page_size} cannot be used"):
        PagedKVCache(_spec(), max_batch_size=1, max_seq_len=64, page_size=page_size)


def test_pool_too_small_for_one_prompt():
    cache = PagedKVCache(_spec(), max_batch_size=1, max_seq_len=256, page_size=16, num_pages=2)
    cache.add(0)
    with pytest.raises(OutOfPagesError, match="3"):
        cache.prepare([0], [40])
    assert cache.manager.allocator.num_free == 2


def test_unknown_attention_op():
    with pytest.raises(ValueError, match="unknown attn_name 'pagd'.*paged"):
        get_attention_op("pagd")


def test_prompt_longer_than_cache():
    cache = PagedKVCache(_spec(max_pos=64), max_batch_size=1, max_seq_len=64, page_size=16)
    cache.add(0)
    with pytest.raises(ValueError, match="max_seq_len of 64"):
        cache.prepare([0], [65])


def test_pool_sized_from_a_memory_budget():
    spec = _spec(2)
    page_bytes = spec.kv_bytes_per_token * 16  # K and V x 1 layer x 2 heads x 16 dims x 4 B, 16 tokens
    assert page_bytes == 2 * 1 * 2 * HEAD_DIM * 4 * 16
    cache = PagedKVCache(spec, max_batch_size=2, max_seq_len=64, page_size=16, memory_gb=page_bytes * 10 / 1e9)
    assert cache.num_pages == 9  # 10 pages of budget, one kept for the scratch page
    assert cache.memory_stats().bytes_allocated == 9 * page_bytes
    if DEVICE.type == "cpu":
        with pytest.raises(ValueError, match="memory_fraction sizes the pool from free GPU memory"):
            PagedKVCache(spec, max_batch_size=2, max_seq_len=64, page_size=16, memory_fraction=0.5)
    with pytest.raises(ValueError, match="memory_gb must be > 0"):
        PagedKVCache(spec, max_batch_size=2, max_seq_len=64, page_size=16, memory_gb=-1.0)
