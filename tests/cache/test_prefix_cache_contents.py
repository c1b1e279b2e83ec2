"""Prefix cache: a matched page holds exactly the query's tokens at its position (its content, not
just its refcount), checked against a shadow of what each physical page was written with."""

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fms.cache.allocator import BlockAllocator
from fms.cache.prefix_cache import PrefixCache

PS = 4  # a small page: short prompts over a small alphabet hit many near-collisions


class ShadowPool:
    """A page pool plus prefix cache where each physical page remembers the tokens written into it."""

    def __init__(self, num_pages: int):
        self.allocator = BlockAllocator(num_pages)
        self.cache = PrefixCache(self.allocator, PS)
        self.content: dict[int, tuple[int, ...]] = {}

    def check_match(self, tokens) -> list[int]:
        """The cache's match for tokens; fails unless every matched page holds the tokens it stands for."""
        pages = self.cache.match(tokens, [])
        assert len(pages) <= (len(tokens) - 1) // PS  # the last token is always computed
        for j, page in enumerate(pages):
            want = tuple(tokens[j * PS: (j + 1) * PS])
            assert self.content.get(page) == want, (
                f"logical page {j} of {tokens} matched page {page} holding {self.content.get(page)}, not {want}")
        return pages

    def serve(self, tokens) -> list[int]:
        """Admit a sequence as the scheduler does (matched pages shared, the rest allocated and written),
        cache its full pages, end it. Returns the matched pages."""
        hashes: list[int] = []
        matched = self.check_match(tokens)
        self.cache.match(tokens, hashes)  # fills the request's hash memo as the scheduler's call does
        self.allocator.share(matched)
        self.cache.acquire(matched, len(tokens))
        num_new = -(-len(tokens) // PS) - len(matched)
        shortfall = num_new - self.allocator.num_free
        if shortfall > 0:
            for page in self.cache.evict(shortfall):
                del self.content[page]
        table = matched + self.allocator.allocate(num_new)
        for j in range(len(matched), len(table)):
            self.content[table[j]] = tuple(tokens[j * PS: (j + 1) * PS])  # the 'forward' writes K/V
        self.cache.insert(tokens, table, len(matched), len(tokens) // PS, hashes)
        self.allocator.free(table)
        self.cache.release(table)
        self.cache.check_invariants()
        return matched


BASE = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]  # pages [1 2 3 4] [5 6 7 8], then 3 tokens


@pytest.mark.parametrize(
    "index,num_matched",
    [(PS - 1, 0), (PS, 1), (2 * PS - 1, 1), (2 * PS, 2), (len(BASE) - 1, 2)],
    ids=["last-of-page-0", "first-of-page-1", "last-of-page-1", "first-after-pages", "last-token"],
)
def test_one_changed_token_stops_the_match_at_its_page(index, num_matched):
    pool = ShadowPool(num_pages=8)
    pool.serve(BASE)
    query = list(BASE)
    query[index] = 99
    assert len(pool.check_match(query)) == num_matched
    assert len(pool.serve(query)) == num_matched


def test_the_same_tokens_in_another_chain_are_not_a_match():
    """Page 1 holds [5 6 7 8] in both prompts, but after different page-0 tokens: its K/V differ."""
    pool = ShadowPool(num_pages=8)
    pool.serve(BASE)
    assert pool.check_match([9] + BASE[1:]) == []


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), num_pages=st.integers(4, 12))
def test_random_prompts_match_only_pages_holding_their_tokens(seed, num_pages):
    rng = random.Random(seed)
    pool = ShadowPool(num_pages)
    served = []
    for _ in range(40):
        if served and rng.random() < 0.7:  # an earlier prompt with one token changed, cut or extended
            tokens = list(rng.choice(served))
            tokens[rng.randrange(len(tokens))] = rng.randrange(1, 3)
            tokens = tokens[: rng.randrange(1, len(tokens) + 1)]
            tokens += [rng.randrange(1, 3) for _ in range(rng.randrange(3))]
        else:
            tokens = [rng.randrange(1, 3) for _ in range(rng.randrange(1, 4 * PS))]
        if -(-len(tokens) // PS) > num_pages:
            continue
        pool.serve(tokens)
        served.append(tokens)
    assert pool.allocator.num_free + pool.cache.num_evictable == num_pages
