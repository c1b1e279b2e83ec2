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

Hybrid models (Mamba layers) also need the recurrent state at the end of a cached prefix. A
StateCheckpoint holds it in whole pages of its own (fms.cache.state.CheckpointLayout: the bytes of KV
pages, so checkpoints and K/V share one budget) and is keyed by the same chained hash as the page it
ends, so a prefix can resume only up to its deepest checkpointed page:

    pages     p0   p1   p2   p3   p4          keys k0..k4 (KV of every full page)
    ckpts               c2             c4     state after page 2, after page 4
    LRU (oldest first, once released): c4 p4 p3 c2 p2 p1 p0 -- deeper first, a checkpoint just before
    its page; evicting a page evicts its checkpoint too (nothing could find it any more)
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
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


@dataclass(eq=False)
class StateCheckpoint:
    """The Mamba state after a page, held in `pages` (allocator references of its own, one each).

    key: the chained hash of the page it ends once cached (None while being computed, or once its page was
    evicted while a sequence still held it); holders: sequences that hold it (not evictable while > 0)."""

    pages: tuple[int, ...]
    key: int | None = None
    holders: int = 0


class PrefixCache:
    """checkpoint_pages: pages one StateCheckpoint takes (0: no Mamba layers, no checkpoints)."""

    def __init__(self, allocator: BlockAllocator, page_size: int, checkpoint_pages: int = 0):
        self.allocator = allocator
        self.page_size = page_size
        self.checkpoint_pages = checkpoint_pages
        self._page_of: dict[int, int] = {}  # page key hash -> physical page
        self._key_of: dict[int, int] = {}  # physical page -> its key hash
        self._checkpoint_of: dict[int, StateCheckpoint] = {}  # page key hash -> the state after that page
        # pages and checkpoints no sequence holds (only this cache), least recently used first
        self._evictable: OrderedDict[int | StateCheckpoint, None] = OrderedDict()
        self._num_evictable_pages = 0  # pages that evicting every entry would free
        # pages that held checkpoint bytes since they were last zeroed (fms.cache.state.CheckpointStore.scrub)
        self.dirty_pages: set[int] = set()
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

    def num_evictable_among(self, pages: Sequence[int], checkpoint: StateCheckpoint | None = None) -> int:
        """Evictable pages among these (and the checkpoint's pages, if it is evictable)."""
        n = sum(1 for p in pages if p in self._evictable)
        if checkpoint is not None and checkpoint in self._evictable:
            n += len(checkpoint.pages)
        return n

    @property
    def num_evictable(self) -> int:
        """Pages that evicting every evictable entry (pages and checkpoints) would give back."""
        return self._num_evictable_pages

    def checkpoint_at(self, key: int) -> StateCheckpoint | None:
        return self._checkpoint_of.get(key)

    def checkpoint_after_page(self, page: int) -> StateCheckpoint | None:
        """The cached checkpoint of the state after this cached page, or None."""
        key = self._key_of.get(page)
        return None if key is None else self._checkpoint_of.get(key)

    @property
    def num_checkpoints(self) -> int:
        return len(self._checkpoint_of)

    @property
    def num_cached_pages(self) -> int:
        return len(self._key_of)

    @property
    def hit_rate(self) -> float:
        return self.num_hit_tokens / self.num_queried_tokens if self.num_queried_tokens else 0.0

    def is_cached(self, page: int) -> bool:
        return page in self._key_of

    # -- updates ---------------------------------------------------------------------------
    def acquire(self, pages: Sequence[int], num_query_tokens: int, checkpoint: StateCheckpoint | None = None) -> None:
        """A sequence now holds these matched pages (and the checkpoint it resumes from): they stop being
        evictable. Counts the hit rate."""
        for page in pages:
            self._unlist(page)
        if checkpoint is not None:
            self._unlist(checkpoint)
            checkpoint.holders += 1
        self.num_queried_tokens += num_query_tokens
        self.num_hit_tokens += len(pages) * self.page_size

    def release_checkpoint(self, checkpoint: StateCheckpoint) -> None:
        """A sequence let go of a checkpoint it held: evictable (most recently used) when no one holds it."""
        if checkpoint.holders < 1:
            raise ValueError(f"checkpoint in pages {checkpoint.pages} is not held")
        checkpoint.holders -= 1
        if checkpoint.holders == 0:
            if checkpoint.key is None:  # its page was evicted meanwhile: nothing can find it
                self.free_checkpoint(checkpoint)
            else:
                self._list(checkpoint)

    def add_checkpoint(self, key: int, checkpoint: StateCheckpoint) -> bool:
        """Cache a computed checkpoint of the state after the cached page `key` (evictable, most recently
        used). False, changing nothing, when that key already has one or its page is not cached."""
        if key in self._checkpoint_of or key not in self._page_of or checkpoint.holders:
            return False
        checkpoint.key = key
        self._checkpoint_of[key] = checkpoint
        self._list(checkpoint)
        return True

    def free_checkpoint(self, checkpoint: StateCheckpoint) -> None:
        """Give an uncached, unheld checkpoint's pages back to the allocator (they must be zeroed before
        they hold K/V: dirty_pages)."""
        self.allocator.free(list(checkpoint.pages))
        self.dirty_pages.update(checkpoint.pages)

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
                checkpoint = self._checkpoint_of.get(self._key_of[page])
                if checkpoint is not None and checkpoint in self._evictable:
                    self._list(checkpoint)  # touched with its page, evicted just before it
                self._list(page)

    def evict(self, num_pages: int) -> list[int]:
        """Evict least recently used entries until at least num_pages pages went back to the allocator (a
        checkpoint gives all its pages at once, a page its checkpoint's too); -> the pages freed."""
        if num_pages > self._num_evictable_pages:
            raise ValueError(f"cannot evict {num_pages} pages: only {self._num_evictable_pages} are evictable")
        freed: list[int] = []
        kv_pages: list[int] = []  # given back in one allocator call, as before checkpoints existed
        while len(freed) < num_pages:
            entry = next(iter(self._evictable))
            self._unlist(entry)
            if isinstance(entry, StateCheckpoint):
                del self._checkpoint_of[entry.key]
                self.free_checkpoint(entry)
                freed += entry.pages
                continue
            key = self._key_of.pop(entry)
            del self._page_of[key]
            kv_pages.append(entry)
            freed.append(entry)
            checkpoint = self._checkpoint_of.pop(key, None)
            if checkpoint is not None:  # nothing could reach it without its page
                checkpoint.key = None
                if checkpoint in self._evictable:
                    self._unlist(checkpoint)
                    self.free_checkpoint(checkpoint)
                    freed += checkpoint.pages
        self.allocator.free(kv_pages)
        self.num_evicted += len(kv_pages)
        return freed

    def clear(self) -> None:
        """Evict every page and checkpoint no sequence holds."""
        self.evict(self._num_evictable_pages)

    def _list(self, entry) -> None:
        """Make entry evictable, most recently used."""
        if entry not in self._evictable:
            self._num_evictable_pages += len(entry.pages) if isinstance(entry, StateCheckpoint) else 1
        self._evictable[entry] = None
        self._evictable.move_to_end(entry)

    def _unlist(self, entry) -> None:
        if self._evictable.pop(entry, 0) is None:
            self._num_evictable_pages -= len(entry.pages) if isinstance(entry, StateCheckpoint) else 1

    def check_invariants(self) -> None:
        for page, key in self._key_of.items():
            if self._page_of.get(key) != page:
                raise AssertionError(f"page {page} and key {key} disagree")
            refcount = self.allocator.refcount(page)
            if refcount < 1:
                raise AssertionError(f"cached page {page} has refcount {refcount}")
            if (refcount == 1) != (page in self._evictable):
                raise AssertionError(f"cached page {page} has refcount {refcount} but evictable={page in self._evictable}")
        pages = {e for e in self._evictable if not isinstance(e, StateCheckpoint)}
        if len(self._page_of) != len(self._key_of) or not pages <= set(self._key_of):
            raise AssertionError("prefix cache maps out of sync")
        for key, checkpoint in self._checkpoint_of.items():
            if checkpoint.key != key or key not in self._page_of:
                raise AssertionError(f"checkpoint in pages {checkpoint.pages} is keyed {checkpoint.key}, listed under "
                                     f"{key} (cached page: {key in self._page_of})")
            if (checkpoint.holders == 0) != (checkpoint in self._evictable):
                raise AssertionError(f"checkpoint {checkpoint.pages} has {checkpoint.holders} holders but evictable="
                                     f"{checkpoint in self._evictable}")
            for page in checkpoint.pages:
                if self.allocator.refcount(page) != 1 or page in self._key_of:
                    raise AssertionError(f"checkpoint page {page} has refcount {self.allocator.refcount(page)} "
                                         f"(must be 1) or is also a cached K/V page")
        listed = [e for e in self._evictable if isinstance(e, StateCheckpoint)]
        if any(c.key is None or self._checkpoint_of.get(c.key) is not c for c in listed):
            raise AssertionError("an evictable checkpoint is not cached")
        expected = len(pages) + sum(len(c.pages) for c in listed)
        if expected != self._num_evictable_pages:
            raise AssertionError(f"{self._num_evictable_pages} evictable pages counted, {expected} listed")

    def checkpoint_page_ids(self) -> set[int]:
        """Pages held by cached checkpoints."""
        return {p for c in self._checkpoint_of.values() for p in c.pages}
