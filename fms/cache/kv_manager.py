"""The KV manager: the one host owner of page ids, page tables, sequence slots and prefix-cache hits.

Both drivers use it: static generate() (fms.utils.generation) and the serving scheduler. It decides;
the device caches (fms.cache.paged, fms.cache.contiguous) only apply its decisions, which it hands
out as PageGrants:

    kv = KVManager(num_pages=8, page_size=4, max_num_seqs=2)
    kv.add("a")                        -> slot 0 ("a"'s row in the device page table / Mamba state pool)
    kv.reserve(["a"], [6])             -> [PageGrant("a", start=0, pages=[0, 1])]   6 tokens, 2 pages
    kv.reserve(["a"], [3])             -> [PageGrant("a", start=2, pages=[2])]      9 tokens, 3 pages
    kv.free("a")                       -> pages 0, 1, 2 back to the pool (or kept by the prefix cache)

A grant lists the table entries that changed, from logical page `start` on: freshly allocated pages,
or a private copy that replaced a shared partial last page (copy-on-write; `copies` then says which
page's K/V to copy where). The device cache writes them into its page table; the manager never
touches the device.

Hybrid models (Mamba layers) resume a cached prefix only where the state after it was checkpointed
(fms.cache.prefix_cache.StateCheckpoint, held in pages of the same pool). The manager decides which
page boundaries a sequence checkpoints while it is prefilled, and gives them storage at reserve():

    boundaries of a sequence admitted with A tokens, resuming at L0 (a prefix hit), every k pages:
        j * page_size in (L0, A] with j % k == 0        periodic (k: CheckpointPolicy.interval)
        m * page_size, m = pages its prompt matched      where it diverged from cached K/V, so that the
                                                        next request with this prefix resumes there
    grant.captures: the boundaries this step computes, with the pages to write each into (only from
    free or evictable pages: a checkpoint never makes a reservation fail); the device reads them
    through capture_targets() when it builds the step, and commit_computed() caches them under the
    key of the page they end (freed if that key already has one).
    grant.restore: on a hit, the checkpoint's pages, copied into the sequence's state slot.
    take_pages_to_scrub(): pages a checkpoint gave back since the last call, which the device zeroes
    at its next apply (before any step can write or read them as K/V, even after a failed step).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from typing import Hashable, Sequence

from fms.cache.allocator import RELEASED, BlockAllocator, OutOfPagesError, PageTables
from fms.cache.prefix_cache import PrefixCache, StateCheckpoint

__all__ = ["KVManager", "PageGrant", "OutOfPagesError", "CheckpointPolicy"]


@dataclass(frozen=True)
class CheckpointPolicy:
    """Mamba-state checkpoints of a hybrid model's prefix cache (fms.cache.state.CheckpointLayout makes one).

    num_pages: pages one checkpoint takes; interval: periodic checkpoints every `interval` pages;
    bytes: what one checkpoint costs the budget (num_pages whole pages)."""

    num_pages: int
    interval: int
    bytes: int = 0

    def __post_init__(self):
        for name in ("num_pages", "interval"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"CheckpointPolicy.{name} must be an int >= 1, got {value!r}")


@dataclass(frozen=True)
class PageGrant:
    """Table entries of one sequence that changed in one reservation (what the device must write)."""

    seq_id: Hashable
    start: int  # logical page index of pages[0]
    pages: tuple[int, ...]  # physical pages now at logical start, start + 1, ...; RELEASED (-1) possible after fork
    copies: tuple[tuple[int, int], ...] = ()  # (src, dst): copy page src's K/V into dst before the step
    # what undo() needs: the sequence's length and table size before this reservation
    num_tokens_before: int = 0
    num_pages_before: int = 0
    # hybrid models: the Mamba-state checkpoint to copy into the sequence's slot (its pages), and the
    # boundaries this step checkpoints (position, pages)
    restore: tuple[int, ...] = ()
    captures: tuple[tuple[int, tuple[int, ...]], ...] = ()


@dataclass
class KVStats:
    num_pages: int
    num_free_pages: int  # in the allocator's free list
    num_cached_pages: int  # held only by the prefix cache: evictable on demand
    num_used_pages: int  # held by at least one sequence
    num_seqs: int
    prefix_cache_hit_tokens: int = 0
    prefix_cache_queried_tokens: int = 0
    num_checkpoints: int = 0  # Mamba-state checkpoints cached (hybrid models)
    num_checkpoint_pages: int = 0  # pages they and the ones being computed hold
    checkpoint_bytes: int = 0
    extra: dict = field(default_factory=dict)


class KVManager:
    """Pages (through a BlockAllocator and PageTables), one slot per live sequence, the prefix cache.

    num_pages, page_size: the page pool. A contiguous cache is a pool of max_num_seqs pages of
    max_seq_len tokens: a sequence's one page is its cache row.
    max_num_seqs: live sequences at once; each holds a slot in 0..max_num_seqs-1 (lowest free first)
    from add() to free(): its row in the device page table and in the Mamba state pool.
    enable_prefix_caching: full pages stay cached after their sequences end, found again by a hash
    chained over their tokens, and evicted least recently used when the pool needs room.
    checkpoints: a hybrid model's Mamba-state checkpoints (with prefix caching; see the module docstring).
    """

    def __init__(self, num_pages: int, page_size: int, max_num_seqs: int, enable_prefix_caching: bool = False,
                 checkpoints: CheckpointPolicy | None = None):
        for name, value in (("num_pages", num_pages), ("page_size", page_size), ("max_num_seqs", max_num_seqs)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if checkpoints is not None and not isinstance(checkpoints, CheckpointPolicy):
            raise ValueError(f"checkpoints must be a CheckpointPolicy or None, got {checkpoints!r}")
        self.page_size = page_size
        self.max_num_seqs = max_num_seqs
        self.allocator = BlockAllocator(num_pages)
        self.tables = PageTables(self.allocator, page_size)
        self.checkpoints = checkpoints if enable_prefix_caching else None
        self.prefix_cache = None
        if enable_prefix_caching:
            self.prefix_cache = PrefixCache(self.allocator, page_size, checkpoints.num_pages if checkpoints else 0)
        self._slot: dict[Hashable, int] = {}
        self._free_slots = list(range(max_num_seqs - 1, -1, -1))  # pop() gives the lowest
        self._num_registered: dict[Hashable, int] = {}  # full pages of a sequence already in the prefix cache
        # checkpoints (hybrid models): per sequence, the boundaries it should checkpoint (see the module
        # docstring), the checkpoints being computed (boundary -> storage), the one it resumed from (held
        # until its first step is committed: the device copies it at that step)
        self._wanted: dict[Hashable, tuple[int, int, int | None]] = {}  # (A, L0, divergence boundary)
        self._capturing: dict[Hashable, dict[int, StateCheckpoint]] = {}
        self._resumed_from: dict[Hashable, StateCheckpoint] = {}
        self._last_match: tuple[tuple[int, ...], int] | None = None  # (pages returned, pages of K/V matched)

    # -- sequences -----------------------------------------------------------------------------
    @property
    def num_pages(self) -> int:
        return self.allocator.num_pages

    def __contains__(self, seq_id: Hashable) -> bool:
        return seq_id in self._slot

    @property
    def sequences(self) -> list[Hashable]:
        return list(self._slot)

    @property
    def num_seqs(self) -> int:
        return len(self._slot)

    def add(self, seq_id: Hashable, prefix_pages: Sequence[int] = (), prefix_len: int = 0,
            num_query_tokens: int | None = None) -> tuple[int, PageGrant | None]:
        """Start a sequence; -> (its slot, the grant of its prefix pages or None).

        prefix_pages: pages already in the pool holding the K/V of the first prefix_len tokens (a
        prefix-cache match), shared as logical pages 0..; num_query_tokens (the prompt's length)
        counts toward the prefix cache's hit rate. With checkpoints, a prefix must end at a page with a
        cached checkpoint (match_prefix returns such prefixes); the grant's `restore` names it.
        """
        if seq_id in self._slot:
            raise ValueError(f"sequence {seq_id!r} is already in the cache")
        if not self._free_slots:
            raise ValueError(f"the cache holds at most {self.max_num_seqs} sequences")
        prefix_pages = list(prefix_pages)
        checkpoint = None
        if self.checkpoints is not None and prefix_pages:
            checkpoint = self.prefix_cache.checkpoint_after_page(prefix_pages[-1])
            if checkpoint is None or prefix_len != len(prefix_pages) * self.page_size:
                raise ValueError(f"a hybrid model resumes a prefix only at a page with a Mamba-state checkpoint: "
                                 f"page {prefix_pages[-1]} has none, or {prefix_len} tokens are not its "
                                 f"{len(prefix_pages)} whole pages; use match_prefix()'s pages")
        if prefix_pages or prefix_len:
            self.tables.add_with_prefix(seq_id, prefix_pages, prefix_len)
        else:
            self.tables.add(seq_id)
        if self.prefix_cache is not None:
            self.prefix_cache.acquire(prefix_pages, num_query_tokens or 0, checkpoint)
        self._num_registered[seq_id] = len(prefix_pages)
        slot = self._free_slots.pop()
        self._slot[seq_id] = slot
        if self.checkpoints is not None:
            self._plan_checkpoints(seq_id, prefix_pages, prefix_len, num_query_tokens or 0, checkpoint)
        restore = checkpoint.pages if checkpoint is not None else ()
        grant = PageGrant(seq_id, 0, tuple(prefix_pages), restore=restore) if prefix_pages else None
        return slot, grant

    def _plan_checkpoints(self, seq_id, prefix_pages, prefix_len, num_tokens, checkpoint) -> None:
        divergence = None
        match, self._last_match = self._last_match, None
        if match is not None and match[0] == tuple(prefix_pages) and match[1] * self.page_size > prefix_len:
            divergence = match[1] * self.page_size  # the K/V matched deeper than any checkpoint
        self._wanted[seq_id] = (num_tokens, prefix_len, divergence)
        self._capturing[seq_id] = {}
        if checkpoint is not None:
            self._resumed_from[seq_id] = checkpoint

    def _is_wanted(self, seq_id: Hashable, boundary: int) -> bool:
        num_tokens, start, divergence = self._wanted[seq_id]
        if not start < boundary <= num_tokens or boundary % self.page_size:
            return False
        return boundary == divergence or (boundary // self.page_size) % self.checkpoints.interval == 0

    def fork(self, parent: Hashable, child: Hashable) -> tuple[int, PageGrant]:
        """child starts as parent's copy, sharing its pages (copy-on-write of a partial last page)."""
        self._check_known(parent)
        if child in self._slot:
            raise ValueError(f"sequence {child!r} is already in the cache")
        if not self._free_slots:
            raise ValueError(f"the cache holds at most {self.max_num_seqs} sequences")
        self.tables.fork(parent, child)
        slot = self._free_slots.pop()
        self._slot[child] = slot
        self._num_registered[child] = self._num_registered.get(parent, 0)
        return slot, PageGrant(child, 0, tuple(self.tables.block_table(child)))

    def free(self, seq_id: Hashable) -> None:
        """End a sequence: its slot, pages and unfinished checkpoints go back (cached full pages and
        checkpoints stay, evictable)."""
        self._check_known(seq_id)
        table = self.tables.block_table(seq_id)
        self.tables.free(seq_id)
        self._num_registered.pop(seq_id, None)
        self._free_slots.append(self._slot.pop(seq_id))
        self._free_slots.sort(reverse=True)
        if self.prefix_cache is not None:
            self.prefix_cache.release([p for p in table if p != RELEASED])
        self._drop_checkpoints(seq_id)

    def _drop_checkpoints(self, seq_id: Hashable) -> None:
        if self.checkpoints is None:
            return
        self._wanted.pop(seq_id, None)
        for checkpoint in self._capturing.pop(seq_id, {}).values():
            self.prefix_cache.free_checkpoint(checkpoint)
        checkpoint = self._resumed_from.pop(seq_id, None)
        if checkpoint is not None:
            self.prefix_cache.release_checkpoint(checkpoint)

    def slot_of(self, seq_id: Hashable) -> int:
        self._check_known(seq_id)
        return self._slot[seq_id]

    def length(self, seq_id: Hashable) -> int:
        """Tokens the sequence holds room for (computed, or reserved for the step being run)."""
        self._check_known(seq_id)
        return self.tables.length(seq_id)

    def block_table(self, seq_id: Hashable) -> list[int]:
        self._check_known(seq_id)
        return self.tables.block_table(seq_id)

    # -- pages for steps -----------------------------------------------------------------------
    def num_pages_needed(self, seq_id: Hashable, num_new_tokens: int) -> int:
        return self.tables.num_pages_needed(seq_id, num_new_tokens)

    @property
    def num_free_pages(self) -> int:
        return self.allocator.num_free

    @property
    def num_evictable_pages(self) -> int:
        return self.prefix_cache.num_evictable if self.prefix_cache is not None else 0

    @property
    def num_obtainable_pages(self) -> int:
        """Free pages plus cached pages nobody holds (evicted on demand)."""
        return self.allocator.num_free + self.num_evictable_pages

    def make_room(self, num_pages: int) -> None:
        """Evict least recently used prefix-cache pages until num_pages are free (if it can)."""
        shortfall = num_pages - self.allocator.num_free
        if shortfall > 0 and self.prefix_cache is not None:
            self.prefix_cache.evict(min(shortfall, self.prefix_cache.num_evictable))

    def reserve(self, seq_ids: Sequence[Hashable], num_new_tokens: Sequence[int]) -> list[PageGrant]:
        """Room for num_new_tokens more tokens of each sequence; all or nothing.

        Raises OutOfPagesError with nothing changed when the pool (after evicting prefix-cache pages)
        cannot give every sequence its pages. Returns one grant per sequence whose table changed.
        """
        if len(seq_ids) != len(num_new_tokens):
            raise ValueError(f"reserve needs one token count per sequence, got {len(seq_ids)} ids and "
                             f"{len(num_new_tokens)} counts")
        ps = self.page_size
        # A cheap bound first (each sequence needs at most its new pages plus one copy-on-write page);
        # the exact count only when the pool is nearly full.
        bound = sum(-(-n // ps) + 1 for n in num_new_tokens)
        if bound > self.allocator.num_free:
            needed = sum(self.tables.num_pages_needed(s, n) for s, n in zip(seq_ids, num_new_tokens))
            self.make_room(needed)
            if needed > self.allocator.num_free:
                raise OutOfPagesError(needed, self.allocator.num_free)
        grants = []
        for seq_id, n in zip(seq_ids, num_new_tokens):
            self._check_known(seq_id)
            before = self.tables.num_pages(seq_id)
            length = self.tables.length(seq_id)
            copies = self.tables.reserve(seq_id, n)
            start = before - 1 if copies else before
            if self.tables.num_pages(seq_id) > start:
                grants.append(PageGrant(seq_id, start, tuple(self.tables.pages_from(seq_id, start)), tuple(copies),
                                        length, before))
            elif n:
                grants.append(PageGrant(seq_id, before, (), (), length, before))  # undo() still needs the length
        if self.checkpoints is not None:  # after every page of the step: a checkpoint only takes what is left
            grants = [self._with_captures(g) for g in grants]
        return grants

    def take_pages_to_scrub(self) -> list[int]:
        """Pages that held checkpoint bytes since the last call (forgotten here: the caller zeroes them)."""
        if self.prefix_cache is None or not self.prefix_cache.dirty_pages:
            return []
        pages = sorted(self.prefix_cache.dirty_pages)
        self.prefix_cache.dirty_pages.clear()
        return pages

    def _with_captures(self, grant: PageGrant) -> PageGrant:
        """The grant with storage for the checkpoints its step computes, as far as free or evictable pages
        allow (a boundary without storage is skipped: a later request recomputes past it)."""
        seq_id, c = grant.seq_id, self.checkpoints.num_pages
        if seq_id not in self._wanted:
            return grant
        ps = self.page_size
        captures = []
        for boundary in range((grant.num_tokens_before // ps + 1) * ps, self.tables.length(seq_id) + 1, ps):
            if not self._is_wanted(seq_id, boundary) or boundary in self._capturing[seq_id]:
                continue
            if self.allocator.num_free < c:
                self.make_room(c)
                if self.allocator.num_free < c:
                    break
            checkpoint = StateCheckpoint(tuple(self.allocator.allocate(c)))
            self._capturing[seq_id][boundary] = checkpoint
            captures.append((boundary, checkpoint.pages))
        return replace(grant, captures=tuple(captures)) if captures else grant

    def decode_steps_until_checkpoint(self, seq_id: Hashable) -> int:
        """Most one-token steps the sequence may run in one decode window without going past a checkpoint it
        still wants (its prompt's last token left alone by chunked prefill, at a wanted boundary): a window
        ending there lets the device capture it from the state slot. sys.maxsize when nothing limits it."""
        if self.checkpoints is None or seq_id not in self._wanted:
            return sys.maxsize
        length = self.tables.length(seq_id)
        ps = self.page_size
        for boundary in range((length // ps + 1) * ps, self._wanted[seq_id][0] + 1, ps):
            if self._is_wanted(seq_id, boundary):
                return boundary - length
        return sys.maxsize

    def drop_captures(self, seq_id: Hashable, below: int) -> None:
        """The device could not compute these checkpoints (boundaries < below): their storage goes back."""
        capturing = self._capturing.get(seq_id, {})
        for boundary in [b for b in capturing if b < below]:
            self.prefix_cache.free_checkpoint(capturing.pop(boundary))

    def capture_targets(self, seq_id: Hashable, num_computed: int,
                        num_new_tokens: int) -> list[tuple[int, tuple[int, ...]]]:
        """Checkpoints a step computes for this sequence, from num_computed tokens on, num_new_tokens of them:
        (tokens of the step after which the state is taken, 1..num_new_tokens; pages to write it to)."""
        capturing = self._capturing.get(seq_id)
        if not capturing:
            return []
        end = num_computed + num_new_tokens
        return [(b - num_computed, ck.pages) for b, ck in sorted(capturing.items()) if num_computed < b <= end]

    def undo(self, grants: Sequence[PageGrant]) -> None:
        """Take back reservations (the grants of one reserve() call, in any order), restoring each
        sequence's length and table: for a step that failed before its results were committed."""
        for grant in reversed(grants):
            if self.checkpoints is not None:
                for boundary, _ in grant.captures:
                    self.prefix_cache.free_checkpoint(self._capturing[grant.seq_id].pop(boundary))
            self.tables.unreserve(grant.seq_id, grant.num_tokens_before, grant.num_pages_before, list(grant.copies))

    def release_out_of_window(self, seq_id: Hashable, window: int | None) -> list[int]:
        """Free the pages no future query of this sequence can see (sliding-window attention)."""
        if window is None:
            return []
        next_pos = self.tables.length(seq_id)  # position of the next query
        first_visible = max(next_pos - window + 1, 0)
        droppable = first_visible // self.page_size - self.tables.num_released_pages(seq_id)
        if droppable <= 0:
            return []
        dropped = self.tables.truncate_front(seq_id, droppable)
        if self.prefix_cache is not None:
            self.prefix_cache.release(dropped)
        return dropped

    # -- prefix cache --------------------------------------------------------------------------
    def match_prefix(self, token_ids: Sequence[int], hashes: list[int]) -> list[int]:
        """Pages of the longest cached prefix of token_ids (at least one token left to compute); [] when
        prefix caching is off. With checkpoints: cut to the longest such prefix that ends at a page with a
        state checkpoint (add() then remembers how much deeper the K/V matched). Changes nothing but the hash
        memo `hashes` (and that note)."""
        if self.prefix_cache is None:
            return []
        pages = self.prefix_cache.match(token_ids, hashes)
        if self.checkpoints is None:
            return pages
        depth = len(pages)
        while depth and self.prefix_cache.checkpoint_at(hashes[depth - 1]) is None:
            depth -= 1
        self._last_match = (tuple(pages[:depth]), len(pages))
        return pages[:depth]

    def num_evictable_among(self, pages: Sequence[int]) -> int:
        """Evictable pages among a match's (and of the checkpoint it would resume from): admitting it makes
        them unevictable."""
        if self.prefix_cache is None:
            return 0
        checkpoint = self.prefix_cache.checkpoint_after_page(pages[-1]) if pages and self.checkpoints else None
        return self.prefix_cache.num_evictable_among(pages, checkpoint)

    def commit_computed(self, seq_id: Hashable, token_ids: Sequence[int], num_computed: int,
                        hashes: list[int]) -> None:
        """The sequence's first num_computed tokens now hold K/V: cache its new full pages."""
        if self.prefix_cache is None:
            return
        num_full = num_computed // self.page_size
        first = self._num_registered[seq_id]
        if num_full > first:
            self.prefix_cache.insert(token_ids, self.tables.block_table(seq_id), first, num_full, hashes)
            self._num_registered[seq_id] = num_full
        if self.checkpoints is None:
            return
        resumed = self._resumed_from.pop(seq_id, None)
        if resumed is not None:  # its state was copied into the sequence's slot at the step just committed
            self.prefix_cache.release_checkpoint(resumed)
        capturing = self._capturing.get(seq_id, {})
        for boundary in [b for b in capturing if b <= num_computed]:
            checkpoint = capturing.pop(boundary)
            if not self.prefix_cache.add_checkpoint(hashes[boundary // self.page_size - 1], checkpoint):
                self.prefix_cache.free_checkpoint(checkpoint)  # computed by another sequence as well

    # -- statistics and checks ----------------------------------------------------------------
    def stats(self) -> KVStats:
        pc = self.prefix_cache
        cached = self.num_evictable_pages
        checkpoint_pages = 0
        if self.checkpoints is not None:  # counted, not listed: stats() may be read often
            orphans = {id(c) for c in self._resumed_from.values() if c.key is None}
            num = pc.num_checkpoints + sum(map(len, self._capturing.values())) + len(orphans)
            checkpoint_pages = num * self.checkpoints.num_pages
        return KVStats(
            num_pages=self.num_pages,
            num_free_pages=self.allocator.num_free,
            num_cached_pages=cached,
            num_used_pages=self.allocator.num_used - cached,
            num_seqs=self.num_seqs,
            prefix_cache_hit_tokens=pc.num_hit_tokens if pc else 0,
            prefix_cache_queried_tokens=pc.num_queried_tokens if pc else 0,
            num_checkpoints=pc.num_checkpoints if self.checkpoints else 0,
            num_checkpoint_pages=checkpoint_pages,
            checkpoint_bytes=checkpoint_pages // self.checkpoints.num_pages * self.checkpoints.bytes
            if self.checkpoints else 0,
        )

    def _checkpoint_page_ids(self) -> set[int]:
        """Pages held by checkpoints: cached, being computed, or resumed from (possibly no longer cached)."""
        pages = self.prefix_cache.checkpoint_page_ids()
        for capturing in self._capturing.values():
            for checkpoint in capturing.values():
                pages.update(checkpoint.pages)
        for checkpoint in self._resumed_from.values():
            pages.update(checkpoint.pages)
        return pages

    def check_invariants(self) -> None:
        """Assert allocator, tables, slots and prefix cache agree (tests call this after every step)."""
        self.allocator.check_invariants()
        self.tables.check_invariants()
        if self.prefix_cache is not None:
            self.prefix_cache.check_invariants()
        if set(self._slot) != set(self.tables.sequences()):
            raise AssertionError(f"slots {sorted(map(str, self._slot))} != sequences "
                                 f"{sorted(map(str, self.tables.sequences()))}")
        slots = sorted(self._slot.values()) + sorted(self._free_slots)
        if sorted(slots) != list(range(self.max_num_seqs)):
            raise AssertionError(f"slots held {sorted(self._slot.values())} and free {self._free_slots} do not "
                                 f"partition 0..{self.max_num_seqs - 1}")
        held = {p for s in self.tables.sequences() for p in self.tables.block_table(s) if p != RELEASED}
        checkpoint_pages = self._checkpoint_page_ids() if self.checkpoints else set()
        if checkpoint_pages & held:
            raise AssertionError(f"pages {sorted(checkpoint_pages & held)} hold both a checkpoint and K/V")
        for page in range(self.num_pages):
            expected = (page in held) + (self.prefix_cache is not None and self.prefix_cache.is_cached(page))
            expected += page in checkpoint_pages
            if expected == 0 and self.allocator.refcount(page):
                raise AssertionError(f"page {page} has refcount {self.allocator.refcount(page)} but no holder")
        if self.checkpoints is not None:
            if self.stats().num_checkpoint_pages != len(checkpoint_pages):
                raise AssertionError(f"stats count {self.stats().num_checkpoint_pages} checkpoint pages, "
                                     f"{len(checkpoint_pages)} are held")
            stray = (set(self._wanted) | set(self._capturing) | set(self._resumed_from)) - set(self._slot)
            if stray:
                raise AssertionError(f"checkpoint plans of sequences no longer in the cache: {sorted(map(str, stray))}")

    def _check_known(self, seq_id: Hashable) -> None:
        if seq_id not in self._slot:
            raise KeyError(f"sequence {seq_id!r} is not in the cache")
