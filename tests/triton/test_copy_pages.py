"""The one-launch copy-on-write page copy (fms.triton.copy_pages) against a per-pool index copy written out here,
bit for bit, and the paged cache's fork using it.

On CPU the kernel runs in Triton's interpreter; shapes are small.
"""

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed; the page copy kernel needs it")

from fms.triton.copy_pages import (copy_pages, copy_pages_reference, copy_pages_triton,  # noqa: E402
                                   pool_address_table)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _expected(pools, pairs, page_size):
    """Slot by slot, in plain Python loops: what every pool holds after the copies."""
    out = [p.clone() for p in pools]
    for src, dst in pairs:
        for j in range(page_size):
            for pool in out:
                pool[:, dst * page_size + j] = pool[:, src * page_size + j]
    return out


@pytest.mark.parametrize("hkv,pages,page_size,d,num_pools,dtype", [
    (2, 6, 4, 16, 3, torch.float32), (1, 5, 16, 64, 4, torch.bfloat16), (3, 4, 3, 24, 2, torch.float16)])
def test_kernel_equals_slot_by_slot_copy(hkv, pages, page_size, d, num_pools, dtype):
    g = torch.Generator().manual_seed(pages * 10 + d)
    pools = [torch.randn(hkv, pages * page_size, d, generator=g).to(dtype).to(DEVICE) for _ in range(num_pools)]
    pairs = [(0, 3), (2, 1)] if pages > 3 else [(0, 1)]
    want = _expected(pools, pairs, page_size)
    copy_pages_triton(pools, torch.tensor(pairs, dtype=torch.int64, device=DEVICE), page_size)
    for got, expected in zip(pools, want):
        assert torch.equal(got, expected)


def test_reference_and_dispatch_equal_the_slot_by_slot_copy():
    g = torch.Generator().manual_seed(1)
    pools = [torch.randn(2, 12, 8, generator=g) for _ in range(2)]
    want = _expected(pools, [(2, 0)], 4)
    ref = [p.clone() for p in pools]
    copy_pages_reference(ref, torch.tensor([[2, 0]]), 4)
    copy_pages(pools, torch.tensor([[2, 0]]), 4)  # CPU tensors: the reference
    for a, b, c in zip(ref, pools, want):
        assert torch.equal(a, c) and torch.equal(b, c)


def test_a_kept_address_table_is_used_and_checked():
    pools = [torch.zeros(1, 8, 16, device=DEVICE) for _ in range(2)]
    pools[0][:, :4] = 1.0
    table = pool_address_table(pools)
    copy_pages_triton(pools, torch.tensor([[0, 1]], device=DEVICE), 4, table)
    assert torch.equal(pools[0][:, 4:], torch.ones(1, 4, 16, device=DEVICE))
    with pytest.raises(ValueError, match=r"addresses must be \[2\] int64"):
        copy_pages_triton(pools, torch.tensor([[0, 1]], device=DEVICE), 4, table[:1])


def test_bad_input_is_named():
    pools = [torch.zeros(1, 8, 16), torch.zeros(1, 8, 16)]
    pair = torch.tensor([[0, 1]])
    with pytest.raises(ValueError, match="at least one pool"):
        copy_pages([], pair, 4)
    with pytest.raises(ValueError, match=r"pool 1 is \(1, 8, 32\)"):
        copy_pages([pools[0], torch.zeros(1, 8, 32)], pair, 4)
    with pytest.raises(ValueError, match=r"pairs must be \[P, 2\] int64"):
        copy_pages(pools, torch.tensor([0, 1]), 4)
    with pytest.raises(ValueError, match="page_size must be an int >= 1, got 0"):
        copy_pages(pools, pair, 0)
    with pytest.raises(ValueError, match="8 slots are not a whole number of 3-slot pages"):
        copy_pages(pools, pair, 3)


def test_paged_cache_fork_copies_the_shared_partial_page_in_every_layer(monkeypatch):
    """A fork's first step copies the parent's partial last page (copy-on-write) through the kernel; the parent's
    K/V stay, and the child's first slots hold the parent's tokens, in every layer."""
    from fms.cache.paged import PagedKVCache
    from fms.cache.spec import KVCacheSpec

    import fms.cache.paged as paged_module

    if DEVICE == "cpu":  # route the cache's copy through the interpreted kernel, as CUDA would
        monkeypatch.setattr(paged_module, "copy_pages", copy_pages_triton)
    spec = KVCacheSpec(num_layers=3, attention_layers=(0, 1, 2), num_kv_heads=2, head_dim=16, dtype=torch.float32,
                       device=torch.device(DEVICE), max_position_embeddings=64)
    cache = PagedKVCache(spec, max_batch_size=2, max_seq_len=64, page_size=16, num_pages=6)
    cache.add("a")
    cache.prepare(["a"], [21])  # pages: one full, one holding 5 of 16
    g = torch.Generator().manual_seed(0)
    for pool in (*cache.keys, *cache.values):
        pool.copy_(torch.randn(pool.shape, generator=g))
    before = [p.clone() for p in (*cache.keys, *cache.values)]
    parent = cache.block_table("a")
    cache.fork_many([("a", "b")])
    cache.prepare(["b"], [1])
    child = cache.block_table("b")
    assert child[0] == parent[0] and child[1] != parent[1]  # the full page shared, the partial one copied
    for pool, old in zip((*cache.keys, *cache.values), before):
        src, dst = parent[1] * 16, child[1] * 16
        assert torch.equal(pool[:, src:src + 16], old[:, src:src + 16])  # parent untouched
        assert torch.equal(pool[:, dst:dst + 5], old[:, src:src + 5])  # child's copy of the 5 real tokens
        assert not torch.equal(old[:, dst:dst + 5], old[:, src:src + 5])  # (so the copy is what made them equal)
