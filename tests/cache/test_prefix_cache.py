"""Prefix cache: exact page reuse, LRU eviction, and no page leaks over random request lifecycles."""

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fms.cache.allocator import BlockAllocator
from fms.cache.prefix_cache import PrefixCache
from fms.serving.request import RequestState
from tests.serving.helpers import PAGE, check_pages, make_scheduler, request, run_step

SHARED = list(range(100, 132))  # two full pages


def _finish_all(s, token=1):
    while s.has_unfinished():
        run_step(s, token=token)


def test_shared_prefix_pages_are_reused_with_refcounts():
    s = make_scheduler(num_pages=8, prefix=True)
    a = request("a", SHARED + [1] * 8, max_new_tokens=3)
    s.add(a)
    run_step(s)  # A computes 40 tokens: pages 0, 1 full -> cached
    assert s.kv.block_table("a") == [0, 1, 2]
    assert s.kv.prefix_cache.num_cached_pages == 2 and s.kv.allocator.refcount(0) == 2
    b = request("b", SHARED + [2] * 5, max_new_tokens=3)
    s.add(b)
    out, _ = run_step(s)
    chunk_b = out.chunks[1]
    assert (chunk_b.request_id, chunk_b.start_position, chunk_b.token_ids) == ("b", 32, [2] * 5)
    assert s.kv.block_table("b") == [0, 1, 3]
    assert s.kv.allocator.refcount(0) == 3 and s.kv.allocator.refcount(1) == 3
    assert b.num_cached_tokens == 32 and s.kv.prefix_cache.num_hit_tokens == 32
    assert s.kv.prefix_cache.hit_rate == 32 / (40 + 37)
    check_pages(s)
    _finish_all(s)
    check_pages(s)
    # A's 40 prompt + 2 computed outputs: pages 0, 1 (shared); page 2 holds 42 tokens -> not full.
    assert s.kv.prefix_cache.num_cached_pages == 2 and s.kv.prefix_cache.num_evictable == 2
    assert s.kv.allocator.num_free == 6


def test_whole_prompt_cached_still_recomputes_its_last_token():
    s = make_scheduler(num_pages=8, prefix=True)
    s.add(request("a", SHARED + [5], max_new_tokens=2))
    _finish_all(s)
    b = request("b", SHARED, max_new_tokens=2)  # 32 tokens, both pages cached
    s.add(b)
    out, _ = run_step(s)
    # only page 0 is reused: position 31 must be computed to get logits
    assert [(c.start_position, len(c.token_ids), c.sample) for c in out.chunks] == [(16, 16, True)]
    assert s.kv.block_table("b")[0] == 0 and s.kv.block_table("b")[1] != 1
    check_pages(s)


def test_output_pages_are_cached_and_reused_after_preemption():
    s = make_scheduler(num_pages=8, prefix=True)
    a = request("a", 20, max_new_tokens=20)
    s.add(a)
    for _ in range(13):
        run_step(s, token=4)  # 20 prompt + 12 outputs computed: 2 full pages
    assert s.kv.prefix_cache.num_cached_pages == 2
    s._preempt(a)
    assert s.kv.prefix_cache.num_evictable == 2 and a.state is RequestState.PREEMPTED
    out, _ = run_step(s, token=4)
    assert [(c.start_position, len(c.token_ids)) for c in out.chunks] == [(32, 1)]
    assert a.num_cached_tokens == 32
    _finish_all(s, token=4)
    check_pages(s)


def test_lru_eviction_takes_tails_first_and_only_when_needed():
    s = make_scheduler(num_pages=6, prefix=True)
    s.add(request("a", list(range(1, 50)), max_new_tokens=1))  # 49 tokens: pages 0, 1, 2 full
    _finish_all(s)
    assert s.kv.prefix_cache.num_evictable == 3 and s.kv.allocator.num_free == 3
    s.add(request("b", list(range(200, 240)), max_new_tokens=4))  # 40 tokens: 3 pages, all free ones
    run_step(s)
    assert s.kv.prefix_cache.num_evictable == 3 and s.kv.prefix_cache.num_evicted == 0
    s.add(request("c", list(range(300, 317)), max_new_tokens=4))  # 17 tokens: 2 pages -> evict 2
    run_step(s)
    assert s.kv.prefix_cache.num_evicted == 2
    assert s.kv.block_table("c") == [1, 2]  # A's deepest pages went first; page 0 (its head) stays
    check_pages(s)


def test_disabled_prefix_caching_holds_nothing():
    s = make_scheduler(num_pages=8, prefix=False)
    s.add(request("a", SHARED + [1], max_new_tokens=2))
    _finish_all(s)
    s.add(request("b", SHARED + [2], max_new_tokens=2))
    out, _ = run_step(s)
    assert out.chunks[0].start_position == 0
    _finish_all(s)
    assert s.kv.allocator.num_free == 8


def test_prefix_cache_unit():
    allocator = BlockAllocator(4)
    pc = PrefixCache(allocator, PAGE)
    tokens = list(range(40))
    hashes = []
    assert pc.match(tokens, hashes) == [] and len(hashes) == 2
    pages = allocator.allocate(3)
    pc.insert(tokens, pages, 0, 2, hashes)
    assert pc.num_cached_pages == 2 and allocator.refcount(pages[0]) == 2
    assert pc.match(tokens, []) == pages[:2]
    assert pc.match(tokens[:16] + [99] * 24, []) == pages[:1]
    allocator.free(pages)
    pc.release(pages)
    assert pc.num_evictable == 2 and allocator.num_free == 2
    assert pc.evict(1) == [pages[1]]
    pc.clear()
    assert allocator.num_free == 4 and pc.match(tokens, []) == []


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    num_pages=st.integers(3, 10),
    budget=st.integers(4, 48),
    max_num_seqs=st.integers(1, 4),
    prefix=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_random_lifecycles_leak_no_pages(num_pages, budget, max_num_seqs, prefix, seed):
    rng = random.Random(seed)
    s = make_scheduler(num_pages=num_pages, budget=budget, max_num_seqs=max_num_seqs, prefix=prefix)
    heads = [[rng.randrange(1, 6) for _ in range(rng.randrange(0, 40))] for _ in range(3)]
    requests, added = [], 0
    for step in range(60):
        if added < 10 and rng.random() < 0.5:
            prompt = rng.choice(heads) + [rng.randrange(1, 6) for _ in range(rng.randrange(1, 20))]
            r = request(added, prompt, max_new_tokens=rng.randrange(1, 12), eos=(0,))
            s.add(r)
            requests.append(r)
            added += 1
        if rng.random() < 0.05 and s.running:
            s.abort(rng.choice(s.running))
        out, _ = run_step(s, token=lambda c: rng.choice([0] + [1] * 9))
        assert out.num_batched_tokens <= budget and len(out.chunks) <= max_num_seqs
        assert len(s.running) <= max_num_seqs
        check_pages(s)
    _finish_all(s, token=lambda c: rng.choice([0] + [1] * 9))
    check_pages(s)
    assert all(r.is_finished for r in requests) and s.kv.sequences == []
    for r in requests:
        assert len(r.output_token_ids) <= r.params.max_new_tokens
    reclaimable = s.kv.allocator.num_free + (s.kv.prefix_cache.num_evictable if prefix else 0)
    assert reclaimable == num_pages
    if prefix:
        s.kv.prefix_cache.clear()
    assert s.kv.allocator.num_free == num_pages
