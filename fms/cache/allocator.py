"""Owns KV-cache page ids: the refcounted free pool and the per-sequence page tables built on it."""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Hashable, Iterable

RELEASED = -1
"""block_table() entry for a logical page that truncate_front() has given back."""


class OutOfPagesError(RuntimeError):
    """Raised when an allocation needs more free pages than the pool has; nothing was changed."""

    def __init__(self, requested: int, available: int):
        self.requested = requested
        self.available = available
        super().__init__(
            f"requested {requested} KV-cache pages but only {available} are free; "
            "use a bigger page pool (more num_pages) or run fewer / shorter sequences at once"
        )


def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")


class BlockAllocator:
    """Refcounted pool of physical page ids 0 .. num_pages-1.

    Free pages are handed out lowest id first so that page ids in tests and
    logs are reproducible run to run.
    """

    def __init__(self, num_pages: int):
        if isinstance(num_pages, bool) or not isinstance(num_pages, int) or num_pages < 1:
            raise ValueError(f"num_pages must be an int >= 1, got {num_pages!r}")
        self.num_pages = num_pages
        self._refcounts = [0] * num_pages
        # Already a valid min-heap: ascending ids.
        self._free_heap = list(range(num_pages))

    @property
    def num_free(self) -> int:
        return len(self._free_heap)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self._free_heap)

    def allocate(self, n: int) -> list[int]:
        _check_count("n", n)
        if n > len(self._free_heap):
            raise OutOfPagesError(requested=n, available=len(self._free_heap))
        pages = [heapq.heappop(self._free_heap) for _ in range(n)]
        for page in pages:
            self._refcounts[page] = 1
        return pages

    def share(self, pages: Iterable[int]) -> None:
        pages = list(pages)
        for page in pages:
            self._check_in_use(page, "share")
        for page in pages:
            self._refcounts[page] += 1

    def free(self, pages: Iterable[int]) -> None:
        # Validate the whole batch first so a bad id leaves every refcount untouched;
        # counting repeats catches freeing one page more times than it is referenced.
        drops = Counter(pages)
        for page, count in drops.items():
            self._check_in_use(page, "free")
            if count > self._refcounts[page]:
                raise ValueError(
                    f"cannot free page {page} {count} times: it has refcount "
                    f"{self._refcounts[page]}; each free must match one allocate or share"
                )
        for page, count in drops.items():
            self._refcounts[page] -= count
            if self._refcounts[page] == 0:
                heapq.heappush(self._free_heap, page)

    def refcount(self, page: int) -> int:
        self._check_page_id(page)
        return self._refcounts[page]

    def check_invariants(self) -> None:
        free = set(self._free_heap)
        if len(free) != len(self._free_heap):
            raise AssertionError(f"free list holds duplicates: {sorted(self._free_heap)}")
        used = {p for p, rc in enumerate(self._refcounts) if rc > 0}
        if free & used:
            raise AssertionError(f"pages both free and in use: {sorted(free & used)}")
        if free | used != set(range(self.num_pages)):
            missing = sorted(set(range(self.num_pages)) - free - used)
            raise AssertionError(f"pages neither free nor in use (leaked): {missing}")
        negative = [p for p, rc in enumerate(self._refcounts) if rc < 0]
        if negative:
            raise AssertionError(f"negative refcounts on pages {negative}")
        if any(self._free_heap[(i - 1) // 2] > self._free_heap[i] for i in range(1, len(self._free_heap))):
            raise AssertionError("free list lost its heap order")

    def _check_page_id(self, page: int) -> None:
        if isinstance(page, bool) or not isinstance(page, int) or not 0 <= page < self.num_pages:
            raise ValueError(f"page id {page!r} is not in 0..{self.num_pages - 1}")

    def _check_in_use(self, page: int, action: str) -> None:
        self._check_page_id(page)
        if self._refcounts[page] == 0:
            raise ValueError(f"cannot {action} page {page}: it is free (refcount 0); only allocated pages can be")


class PageTables:
    """Per-sequence page tables over one BlockAllocator.

    block_table[seq][logical_page] -> physical_page; token position t of a
    sequence lives in logical page t // page_size, slot t % page_size.

        page_size = 4
        seq A, 10 tokens:  logical  0    1    2
                           physical [3]  [5]  [6]      page 6 holds 2 of 4 slots
        fork(A, B):        B = [3, 5, 6], refcounts 3:2 5:2 6:2
        reserve(B, 1):     6 is partial and shared -> copy-on-write
                           B = [3, 5, 7], returns [(6, 7)]; A unchanged
        truncate_front(A, 1):  A = [-1, 5, 6]; logical 1 is still index 1
        truncate_front(A, 1):  A = [-1, -1, 6]; each call walks further forward

    A physical page sits at the same logical index in every sequence that holds
    it: pages enter a table only freshly allocated (reserve, copy-on-write) or
    through fork, which keeps the index. logical_index_of_page() reads it, so one
    page -> logical-page array serves the whole batch.
    """

    def __init__(self, allocator: BlockAllocator, page_size: int):
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
            raise ValueError(f"page_size must be an int >= 1, got {page_size!r}")
        self.allocator = allocator
        self.page_size = page_size
        self._tables: dict[Hashable, list[int]] = {}
        self._lengths: dict[Hashable, int] = {}
        self._num_released: dict[Hashable, int] = {}
        # Counted here rather than read from the allocator, so pages that something
        # other than these tables also references are still tracked exactly.
        self._num_holders = [0] * allocator.num_pages
        self._page_logical = [RELEASED] * allocator.num_pages

    def __contains__(self, seq_id: Hashable) -> bool:
        return seq_id in self._tables

    def sequences(self) -> list[Hashable]:
        return list(self._tables)

    def add(self, seq_id: Hashable) -> None:
        if seq_id in self._tables:
            raise ValueError(f"sequence {seq_id!r} already exists; free it first or pick a new id")
        self._tables[seq_id] = []
        self._lengths[seq_id] = 0
        self._num_released[seq_id] = 0

    def add_with_prefix(self, seq_id: Hashable, pages: list[int], num_tokens: int) -> None:
        """Start seq_id holding `pages` (refcount + 1 each) as logical pages 0.. with num_tokens tokens.

        For a cached prefix: page j must not sit at another logical index than j in any table.
        A partial last page is copy-on-write on the next reserve, as after fork.
        """
        _check_count("num_tokens", num_tokens)
        pages = list(pages)
        if seq_id in self._tables:
            raise ValueError(f"sequence {seq_id!r} already exists; free it first or pick a new id")
        if len(pages) != self._pages_for(num_tokens):
            raise ValueError(
                f"{num_tokens} tokens fill {self._pages_for(num_tokens)} pages of page_size {self.page_size}, "
                f"got {len(pages)} pages"
            )
        if len(set(pages)) != len(pages):
            raise ValueError(f"prefix pages repeat a page: {pages}")
        for logical, page in enumerate(pages):
            self.allocator._check_in_use(page, "share")
            if self._num_holders[page] and self._page_logical[page] != logical:
                raise ValueError(
                    f"page {page} is at logical index {self._page_logical[page]} in other sequences, "
                    f"cannot put it at {logical}"
                )
        self.allocator.share(pages)
        for logical, page in enumerate(pages):
            self._hold(page, logical)
        self._tables[seq_id] = pages
        self._lengths[seq_id] = num_tokens
        self._num_released[seq_id] = 0

    def fork(self, parent: Hashable, child: Hashable) -> None:
        self._check_known(parent)
        if child in self._tables:
            raise ValueError(f"cannot fork {parent!r} into {child!r}: sequence {child!r} already exists")
        table = self._tables[parent]
        held = [p for p in table if p != RELEASED]
        self.allocator.share(held)
        for page in held:
            self._num_holders[page] += 1
        self._tables[child] = list(table)
        self._lengths[child] = self._lengths[parent]
        self._num_released[child] = self._num_released[parent]

    def num_pages_needed(self, seq_id: Hashable, num_new_tokens: int) -> int:
        self._check_known(seq_id)
        _check_count("num_new_tokens", num_new_tokens)
        length = self._lengths[seq_id]
        new_pages = self._pages_for(length + num_new_tokens) - len(self._tables[seq_id])
        return new_pages + int(self._needs_copy_on_write(seq_id, num_new_tokens))

    def reserve(self, seq_id: Hashable, num_new_tokens: int) -> list[tuple[int, int]]:
        needed = self.num_pages_needed(seq_id, num_new_tokens)
        if needed == 0:  # room in the last page, which is this sequence's alone (most decode steps)
            self._lengths[seq_id] += num_new_tokens
            return []
        # The one call that can fail comes before any mutation: all-or-nothing.
        fresh = self.allocator.allocate(needed)
        table = self._tables[seq_id]
        copies = []
        if self._needs_copy_on_write(seq_id, num_new_tokens):
            src, dst = table[-1], fresh.pop(0)
            table[-1] = dst
            self._hold(dst, len(table) - 1)
            self._drop([src])
            copies.append((src, dst))
        for page in fresh:
            self._hold(page, len(table))
            table.append(page)
        self._lengths[seq_id] += num_new_tokens
        return copies

    def unreserve(self, seq_id: Hashable, num_tokens: int, num_pages: int, copies: list[tuple[int, int]]) -> None:
        """Undo reserve(): back to num_tokens tokens in num_pages table entries; a copy-on-write
        (src, dst) of the last page is reverted (the sequence holds src again, dst is dropped)."""
        self._check_known(seq_id)
        table = self._tables[seq_id]
        if num_tokens > self._lengths[seq_id] or num_pages > len(table) or num_pages != self._pages_for(num_tokens):
            raise ValueError(f"cannot unreserve sequence {seq_id!r} to {num_tokens} tokens in {num_pages} pages: it "
                             f"holds {self._lengths[seq_id]} tokens in {len(table)} pages")
        self._drop(table[num_pages:])
        del table[num_pages:]
        for src, dst in copies:
            if table[-1] != dst:
                raise ValueError(f"sequence {seq_id!r}: last page is {table[-1]}, not the copy {dst} to revert")
            self.allocator.share([src])
            self._hold(src, len(table) - 1)
            table[-1] = src
            self._drop([dst])
        self._lengths[seq_id] = num_tokens

    def free(self, seq_id: Hashable) -> None:
        self._check_known(seq_id)
        self._drop([p for p in self._tables.pop(seq_id) if p != RELEASED])
        del self._lengths[seq_id]
        del self._num_released[seq_id]

    def truncate_front(self, seq_id: Hashable, num_pages: int) -> list[int]:
        """Release the next num_pages still-held pages at the front of the sequence (sliding window).

        Released entries always form a prefix of the table, so successive calls
        walk forward: truncate_front(s, 1) twice releases logical pages 0 and 1.
        Returns the physical pages this call dropped, in logical order; a page
        goes back to the pool only if no other sequence still holds it. Only
        complete pages can be released, because the partially filled last page
        is still being written.
        """
        self._check_known(seq_id)
        _check_count("num_pages", num_pages)
        table = self._tables[seq_id]
        start = self._num_released[seq_id]
        num_full = self._lengths[seq_id] // self.page_size
        if start + num_pages > num_full:
            raise ValueError(
                f"cannot release {num_pages} more pages of sequence {seq_id!r}: it has "
                f"{self._lengths[seq_id]} tokens = {num_full} complete pages of page_size "
                f"{self.page_size}, {start} already released, so at most {num_full - start} more"
            )
        dropped = table[start : start + num_pages]
        self._drop(dropped)
        table[start : start + num_pages] = [RELEASED] * num_pages
        self._num_released[seq_id] = start + num_pages
        return dropped

    def num_released_pages(self, seq_id: Hashable) -> int:
        """How many front pages truncate_front() has released; block_table()[:this] are all RELEASED."""
        self._check_known(seq_id)
        return self._num_released[seq_id]

    def block_table(self, seq_id: Hashable) -> list[int]:
        self._check_known(seq_id)
        return list(self._tables[seq_id])

    def num_pages(self, seq_id: Hashable) -> int:
        """Length of the sequence's table (released entries included), without copying it."""
        self._check_known(seq_id)
        return len(self._tables[seq_id])

    def pages_from(self, seq_id: Hashable, start: int) -> list[int]:
        """block_table(seq_id)[start:], copying only that tail (a per-step caller needs just the new pages)."""
        self._check_known(seq_id)
        return self._tables[seq_id][start:]

    def length(self, seq_id: Hashable) -> int:
        self._check_known(seq_id)
        return self._lengths[seq_id]

    def logical_index_of_page(self, page: int) -> int:
        self.allocator._check_page_id(page)
        if self._num_holders[page] == 0:
            raise ValueError(f"page {page} is not in any sequence's page table")
        return self._page_logical[page]

    def check_invariants(self) -> None:
        """Assert table sizes match lengths and holder counts / logical indices match the tables.

        Also asserts every page's allocator refcount is at least the number of
        sequences holding it (equal when nothing else shares this allocator).
        """
        holders = [0] * self.allocator.num_pages
        for seq_id, table in self._tables.items():
            length = self._lengths[seq_id]
            if len(table) != self._pages_for(length):
                raise AssertionError(
                    f"sequence {seq_id!r} has {length} tokens but {len(table)} table entries"
                )
            num_released = self._num_released[seq_id]
            if table[:num_released] != [RELEASED] * num_released or RELEASED in table[num_released:]:
                raise AssertionError(
                    f"sequence {seq_id!r} table {table} is not {num_released} released pages then held ones"
                )
            if num_released > length // self.page_size:
                raise AssertionError(f"sequence {seq_id!r} released a partially filled page")
            for logical, page in enumerate(table):
                if page == RELEASED:
                    continue
                holders[page] += 1
                if self._page_logical[page] != logical:
                    raise AssertionError(
                        f"page {page} is at logical index {logical} in {seq_id!r} "
                        f"but recorded at {self._page_logical[page]}"
                    )
        if holders != self._num_holders:
            raise AssertionError(f"holder counts {self._num_holders} != counted from tables {holders}")
        for page, count in enumerate(holders):
            if self.allocator.refcount(page) < count:
                raise AssertionError(
                    f"page {page} is held by {count} sequences but has refcount {self.allocator.refcount(page)}"
                )

    def _pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def _needs_copy_on_write(self, seq_id: Hashable, num_new_tokens: int) -> bool:
        # Full shared pages are immutable and stay shared; only a partial last page
        # is written into, and writing into one another sequence reads would corrupt it.
        if num_new_tokens == 0 or self._lengths[seq_id] % self.page_size == 0:
            return False
        return self.allocator._refcounts[self._tables[seq_id][-1]] > 1  # (a table's pages are valid ids)

    def _hold(self, page: int, logical: int) -> None:
        self._num_holders[page] += 1
        self._page_logical[page] = logical

    def _drop(self, pages: list[int]) -> None:
        self.allocator.free(pages)
        for page in pages:
            self._num_holders[page] -= 1
            if self._num_holders[page] == 0:
                self._page_logical[page] = RELEASED

    def _check_known(self, seq_id: Hashable) -> None:
        if seq_id not in self._tables:
            raise ValueError(f"unknown sequence {seq_id!r}; add() it first")
