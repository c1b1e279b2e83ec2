"""KVManager: exact page ids, free counts, refcounts, slots, prefix hits, evictions and undo (pure CPU)."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fms.cache.allocator import RELEASED, OutOfPagesError
from fms.cache.kv_manager import KVManager, PageGrant


def test_reserve_grants_exact_pages_and_slots():
    kv = KVManager(num_pages=8, page_size=4, max_num_seqs=2)
    assert kv.add("a") == (0, None) and kv.add("b") == (1, None)
    assert kv.reserve(["a", "b"], [6, 1]) == [PageGrant("a", 0, (0, 1), (), 0, 0), PageGrant("b", 0, (2,), (), 0, 0)]
    assert kv.num_free_pages == 5 and kv.length("a") == 6 and kv.length("b") == 1
    # a's second page has room for 2 more tokens: no new page; the third token opens page 3
    assert kv.reserve(["a"], [2]) == [PageGrant("a", 2, (), (), 6, 2)]
    assert kv.reserve(["a"], [1]) == [PageGrant("a", 2, (3,), (), 8, 2)]
    assert kv.block_table("a") == [0, 1, 3] and kv.num_free_pages == 4
    kv.free("a")
    assert kv.num_free_pages == 7 and kv.slot_of("b") == 1
    assert kv.add("c") == (0, None)  # the lowest free slot
    kv.check_invariants()


def test_reserve_is_all_or_nothing():
    kv = KVManager(num_pages=3, page_size=4, max_num_seqs=2)
    kv.add("a"), kv.add("b")
    kv.reserve(["a"], [8])
    with pytest.raises(OutOfPagesError):
        kv.reserve(["a", "b"], [1, 4])  # needs 2 pages, 1 is free
    assert kv.length("a") == 8 and kv.length("b") == 0 and kv.num_free_pages == 1
    kv.check_invariants()


def test_slots_run_out_with_a_clear_error():
    kv = KVManager(num_pages=4, page_size=4, max_num_seqs=1)
    kv.add("a")
    with pytest.raises(ValueError, match="at most 1 sequences"):
        kv.add("b")
    with pytest.raises(ValueError, match="already in the cache"):
        kv.add("a")
    with pytest.raises(KeyError, match="'zz' is not in the cache"):
        kv.length("zz")


def test_undo_restores_tables_lengths_and_free_pages():
    kv = KVManager(num_pages=6, page_size=4, max_num_seqs=2)
    kv.add("a"), kv.add("b")
    kv.reserve(["a", "b"], [5, 3])
    before = (kv.block_table("a"), kv.block_table("b"), kv.length("a"), kv.length("b"), kv.num_free_pages)
    grants = kv.reserve(["a", "b"], [6, 1])
    assert kv.block_table("a") == [0, 1, 3]  # 11 tokens in 3 pages
    kv.undo(grants)
    assert (kv.block_table("a"), kv.block_table("b"), kv.length("a"), kv.length("b"), kv.num_free_pages) == before
    kv.check_invariants()


def test_undo_reverts_a_copy_on_write():
    kv = KVManager(num_pages=6, page_size=4, max_num_seqs=2)
    kv.add("a")
    kv.reserve(["a"], [6])  # pages 0, 1; page 1 holds 2 of 4
    kv.fork("a", "b")
    assert kv.allocator.refcount(1) == 2
    grants = kv.reserve(["b"], [1])  # b writes into the shared partial page: a private copy
    assert grants == [PageGrant("b", 1, (2,), ((1, 2),), 6, 2)]
    assert kv.block_table("b") == [0, 2] and kv.allocator.refcount(1) == 1
    kv.undo(grants)
    assert kv.block_table("b") == [0, 1] and kv.allocator.refcount(1) == 2 and kv.allocator.refcount(2) == 0
    assert kv.length("b") == 6
    kv.check_invariants()


def test_prefix_hit_eviction_and_stats():
    ps = 4
    kv = KVManager(num_pages=4, page_size=ps, max_num_seqs=2, enable_prefix_caching=True)
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    hashes: list[int] = []
    kv.add("a", num_query_tokens=len(prompt))
    kv.reserve(["a"], [len(prompt)])  # pages 0, 1, 2
    kv.commit_computed("a", prompt, len(prompt), hashes)  # pages 0 and 1 are full: cached
    kv.free("a")
    stats = kv.stats()
    assert (stats.num_free_pages, stats.num_cached_pages, stats.num_used_pages) == (2, 2, 0)
    other: list[int] = []
    assert kv.match_prefix(prompt, other) == [0, 1]
    assert kv.match_prefix([1, 2, 3, 4, 5, 6, 7, 99, 9], []) == [0]  # differs at page 1's last token
    assert kv.match_prefix([1, 2, 3, 4, 5, 6, 7, 8], []) == [0]  # the last token is always computed
    slot, grant = kv.add("b", [0, 1], 8, num_query_tokens=len(prompt))
    assert grant == PageGrant("b", 0, (0, 1)) and kv.length("b") == 8
    assert kv.stats().prefix_cache_hit_tokens == 8
    # b needs 3 more pages: 2 free, then the LRU cached page that nobody holds... none: both held by b
    with pytest.raises(OutOfPagesError):
        kv.reserve(["b"], [9])
    kv.free("b")
    kv.add("c")
    kv.reserve(["c"], [13])  # 4 pages: the two cached pages are evicted
    assert kv.prefix_cache.num_evicted == 2 and kv.num_free_pages == 0
    kv.check_invariants()


def test_sliding_window_release_returns_front_pages():
    kv = KVManager(num_pages=8, page_size=4, max_num_seqs=1)
    kv.add("a")
    kv.reserve(["a"], [13])  # next query at 13 sees 13 - 5 + 1 = 9..13: pages 0 and 1 are out
    assert kv.release_out_of_window("a", window=5) == [0, 1]
    assert kv.block_table("a") == [RELEASED, RELEASED, 2, 3] and kv.num_free_pages == 6
    assert kv.release_out_of_window("a", window=None) == []
    kv.check_invariants()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(["add", "reserve", "free", "undo", "window"]),
                          st.integers(0, 3), st.integers(1, 9)), max_size=60),
       st.booleans())
def test_random_lifecycles_never_leak(ops, prefix):
    """Random adds, reservations (some undone), releases and frees: no leaked page, slot or refcount."""
    kv = KVManager(num_pages=10, page_size=4, max_num_seqs=3, enable_prefix_caching=prefix)
    tokens = {}
    for op, seq, n in ops:
        if op == "add" and seq not in kv and kv.num_seqs < 3:
            prompt = [(seq * 3 + i) % 5 for i in range(12)]
            prefix_pages = kv.match_prefix(prompt, [])
            kv.add(seq, prefix_pages, len(prefix_pages) * 4, num_query_tokens=len(prompt))
            tokens[seq] = prompt
        elif seq not in kv:
            continue
        elif op in ("reserve", "undo"):
            n = min(n, 40 - kv.length(seq))
            if n < 1:
                continue
            before = (kv.block_table(seq), kv.length(seq))
            try:
                grants = kv.reserve([seq], [n])
            except OutOfPagesError:
                assert (kv.block_table(seq), kv.length(seq)) == before
                continue
            if op == "undo":
                kv.undo(grants)
                assert (kv.block_table(seq), kv.length(seq)) == before
            else:
                stream = tokens[seq] + [7] * 40
                kv.commit_computed(seq, stream, kv.length(seq), [])
        elif op == "window":
            kv.release_out_of_window(seq, window=n)
        elif op == "free":
            kv.free(seq)
        kv.check_invariants()
    for seq in kv.sequences:
        kv.free(seq)
    if kv.prefix_cache is not None:
        kv.prefix_cache.clear()
    kv.check_invariants()
    assert kv.num_free_pages == 10 and kv.num_seqs == 0
