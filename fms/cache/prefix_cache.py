"""Prefix caching: full KV pages found again by a hash chained over the tokens they hold.

    page j of a sequence holds tokens [j*ps, (j+1)*ps); its key is (hash of page j-1, its tokens)

    request A: [t0..t15][t16..t31][t32..t40]     pages 4, 9 (full) cached under keys k0, k1
    request B: [t0..t15][t16..t31][u32..]        match -> [4, 9]: B starts at position 32
                                                 holding pages 4, 9 (refcount + 1 each)

The cache is one more holder of each cached page, next to the page tables: it keeps one allocator
reference, so a page whose sequences have all ended stays in the pool, reusable, until the
allocator needs room and evict() hands the least recently used such pages back. A key names the
whole prefix up to its page, so a cached page always sits at the same logical index (its depth
in the chain) in every sequence that reuses it, which the paged cache's page_logical relies on.
The allocator stays the only owner of page ids and refcounts.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

from fms.cache.allocator import BlockAllocator

_ROOT = None  # parent of page 0


def chain_hashes(token_ids: Sequence[int], page_size: int, num_pages: int, known: list[int]) -> list[int]:
    """Chained hashes of the first num_pages full pages, extending (in place) the memo `known`."""
    while len(known) < num_pages:
        j = len(known)
        parent = known[-1] if known else _ROOT
        known.append(hash((parent, tuple(token_ids[j * page_size : (j + 1) * page_size]))))
    return known[:num_pages]


class PrefixCache:
    def __init__(self, allocator: BlockAllocator, page_size: int):
        self.allocator = allocator
        self.page_size = page_size
        self._page_of: dict[int, int] = {}  # page key hash -> physical page
        self._key_of: dict[int, int] = {}  # physical page -> its key hash
        # pages no sequence holds (refcount 1: only this cache), least recently used first
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self.num_queried_tokens = 0
        self.num_hit_tokens = 0
        self.num_evicted = 0

    # -- lookups ---------------------------------------------------------------------------
    def match(self, token_ids: Sequence[int], hashes: list[int]) -> list[int]:
        """Pages of the longest cached prefix of token_ids, leaving at least its last token uncached.

        The last token must be computed by the model to give logits to sample from. `hashes` is the
        request's memo of its chained page hashes (extended here).
        """
        num_full = (len(token_ids) - 1) // self.page_size
        pages = []
        for key in chain_hashes(token_ids, self.page_size, num_full, hashes):
            page = self._page_of.get(key)
            if page is None:
                break
            pages.append(page)
        return pages

    def num_evictable_among(self, pages: Sequence[int]) -> int:
        return sum(1 for p in pages if p in self._evictable)

    @property
    def num_evictable(self) -> int:
        return len(self._evictable)

    @property
    def num_cached_pages(self) -> int:
        return len(self._key_of)

    @property
    def hit_rate(self) -> float:
        return self.num_hit_tokens / self.num_queried_tokens if self.num_queried_tokens else 0.0

    def is_cached(self, page: int) -> bool:
        return page in self._key_of

    # -- updates ---------------------------------------------------------------------------
    def acquire(self, pages: Sequence[int], num_query_tokens: int) -> None:
        """A sequence now holds these matched pages: they stop being evictable. Counts the hit rate."""
        for page in pages:
            self._evictable.pop(page, None)
        self.num_queried_tokens += num_query_tokens
        self.num_hit_tokens += len(pages) * self.page_size

    def insert(self, token_ids: Sequence[int], block_table: Sequence[int], first_page: int, num_full: int,
               hashes: list[int]) -> None:
        """Cache the sequence's full, computed pages first_page .. num_full - 1 (block_table's pages)."""
        keys = chain_hashes(token_ids, self.page_size, num_full, hashes)
        for j in range(first_page, num_full):
            page, key = block_table[j], keys[j]
            if key in self._page_of or page in self._key_of:
                continue  # the same prefix is already cached in another page (computed concurrently)
            self.allocator.share([page])
            self._page_of[key] = page
            self._key_of[page] = key

    def release(self, pages: Sequence[int]) -> None:
        """A sequence let go of these pages (in logical order): cached ones no one holds become evictable.

        Deeper pages go first in LRU order, so a prefix's head outlives its tail.
        """
        for page in reversed(pages):
            if page in self._key_of and self.allocator.refcount(page) == 1:
                self._evictable[page] = None
                self._evictable.move_to_end(page)

    def evict(self, num_pages: int) -> list[int]:
        """Give the num_pages least recently used evictable pages back to the allocator."""
        if num_pages > len(self._evictable):
            raise ValueError(f"cannot evict {num_pages} pages: only {len(self._evictable)} are evictable")
        pages = []
        for _ in range(num_pages):
            page, _ = self._evictable.popitem(last=False)
            del self._page_of[self._key_of.pop(page)]
            pages.append(page)
        self.allocator.free(pages)
        self.num_evicted += len(pages)
        return pages

    def clear(self) -> None:
        """Evict every page no sequence holds."""
        self.evict(len(self._evictable))

    def check_invariants(self) -> None:
        for page, key in self._key_of.items():
            if self._page_of.get(key) != page:
                raise AssertionError(f"page {page} and key {key} disagree")
            refcount = self.allocator.refcount(page)
            if refcount < 1:
                raise AssertionError(f"cached page {page} has refcount {refcount}")
            if (refcount == 1) != (page in self._evictable):
                raise AssertionError(f"cached page {page} has refcount {refcount} but evictable={page in self._evictable}")
        if len(self._page_of) != len(self._key_of) or not set(self._evictable) <= set(self._key_of):
            raise AssertionError("prefix cache maps out of sync")
