import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from fms.cache.allocator import RELEASED, BlockAllocator, OutOfPagesError, PageTables

pytestmark = pytest.mark.paged


def make_tables(num_pages: int = 8, page_size: int = 4) -> tuple[BlockAllocator, PageTables]:
    allocator = BlockAllocator(num_pages)
    return allocator, PageTables(allocator, page_size)


# ---------------------------------------------------------------- BlockAllocator


@pytest.mark.parametrize("num_pages", [0, -1, 2.0, True])
def test_allocator_rejects_bad_num_pages(num_pages):
    with pytest.raises(ValueError, match="num_pages must be an int >= 1"):
        BlockAllocator(num_pages)


def test_allocate_lowest_id_first_and_free_returns_pages():
    allocator = BlockAllocator(4)
    assert (allocator.num_pages, allocator.num_free, allocator.num_used) == (4, 4, 0)
    assert allocator.allocate(2) == [0, 1]
    assert allocator.allocate(0) == []
    assert (allocator.num_free, allocator.num_used) == (2, 2)
    assert [allocator.refcount(p) for p in range(4)] == [1, 1, 0, 0]

    allocator.free([0])
    assert allocator.num_free == 3
    assert allocator.allocate(2) == [0, 2]
    assert [allocator.refcount(p) for p in range(4)] == [1, 1, 1, 0]
    allocator.check_invariants()


def test_allocate_is_all_or_nothing():
    allocator = BlockAllocator(3)
    allocator.allocate(2)
    with pytest.raises(OutOfPagesError) as info:
        allocator.allocate(2)
    assert (info.value.requested, info.value.available) == (2, 1)
    assert "2" in str(info.value) and "1 are free" in str(info.value)
    assert "bigger page pool" in str(info.value)
    assert allocator.num_free == 1
    assert allocator.allocate(1) == [2]
    allocator.check_invariants()


@pytest.mark.parametrize("n", [-1, 1.5, None])
def test_allocate_rejects_bad_count(n):
    with pytest.raises(ValueError, match="n must be an int >= 0"):
        BlockAllocator(2).allocate(n)


def test_share_and_free_track_refcounts():
    allocator = BlockAllocator(3)
    allocator.allocate(2)
    allocator.share([1, 1])
    assert allocator.refcount(1) == 3
    allocator.free([1, 0])
    assert (allocator.refcount(0), allocator.refcount(1), allocator.num_free) == (0, 2, 2)
    allocator.free([1, 1])
    assert allocator.num_free == 3
    allocator.check_invariants()


def test_double_free_raises_and_changes_nothing():
    allocator = BlockAllocator(3)
    allocator.allocate(2)
    allocator.free([1])
    with pytest.raises(ValueError, match="page 1"):
        allocator.free([0, 1])
    assert (allocator.refcount(0), allocator.num_free) == (1, 2)
    # One reference cannot be dropped twice in one call either.
    with pytest.raises(ValueError, match="page 0 2 times"):
        allocator.free([0, 0])
    assert (allocator.refcount(0), allocator.num_free) == (1, 2)
    allocator.check_invariants()


@pytest.mark.parametrize("bad", [3, -1, "0"])
def test_unknown_page_id_raises_and_changes_nothing(bad):
    allocator = BlockAllocator(3)
    allocator.allocate(1)
    for op in (allocator.free, allocator.share):
        with pytest.raises(ValueError, match=f"page id {bad!r} is not in 0..2"):
            op([0, bad])
    with pytest.raises(ValueError, match="not in 0..2"):
        allocator.refcount(bad)
    assert (allocator.refcount(0), allocator.num_free) == (1, 2)


def test_share_free_page_raises():
    allocator = BlockAllocator(2)
    allocator.allocate(1)
    with pytest.raises(ValueError, match="cannot share page 1: it is free"):
        allocator.share([0, 1])
    assert allocator.refcount(0) == 1


# ---------------------------------------------------------------- PageTables


@pytest.mark.parametrize("page_size", [0, -2, 1.0])
def test_page_tables_reject_bad_page_size(page_size):
    with pytest.raises(ValueError, match="page_size must be an int >= 1"):
        PageTables(BlockAllocator(2), page_size)


def test_add_and_duplicate_and_unknown_sequence():
    _, tables = make_tables()
    tables.add("a")
    assert "a" in tables and "b" not in tables
    assert tables.sequences() == ["a"]
    assert (tables.block_table("a"), tables.length("a")) == ([], 0)
    with pytest.raises(ValueError, match="sequence 'a' already exists"):
        tables.add("a")
    with pytest.raises(ValueError, match="unknown sequence 'b'"):
        tables.reserve("b", 1)


@pytest.mark.parametrize(
    "num_tokens, expected_table",
    [(1, [0]), (3, [0]), (4, [0]), (5, [0, 1]), (0, [])],  # 1, page_size-1, page_size, page_size+1
)
def test_reserve_from_empty(num_tokens, expected_table):
    allocator, tables = make_tables(page_size=4)
    tables.add("a")
    assert tables.num_pages_needed("a", num_tokens) == len(expected_table)
    assert tables.reserve("a", num_tokens) == []
    assert tables.block_table("a") == expected_table
    assert tables.length("a") == num_tokens
    assert allocator.num_free == 8 - len(expected_table)


def test_reserve_token_by_token_crosses_page_boundaries():
    allocator, tables = make_tables(page_size=4)
    tables.add("a")
    tables_seen = []
    for _ in range(9):
        tables.reserve("a", 1)
        tables_seen.append(tables.block_table("a"))
    assert tables_seen == [[0]] * 4 + [[0, 1]] * 4 + [[0, 1, 2]]
    assert (tables.length("a"), allocator.num_free) == (9, 5)


def test_reserve_out_of_pages_changes_nothing():
    allocator, tables = make_tables(num_pages=3, page_size=2)
    tables.add("a")
    tables.add("b")
    tables.reserve("a", 3)
    assert tables.num_pages_needed("b", 3) == 2
    with pytest.raises(OutOfPagesError) as info:
        tables.reserve("b", 3)
    assert (info.value.requested, info.value.available) == (2, 1)
    assert (tables.block_table("a"), tables.length("a")) == ([0, 1], 3)
    assert (tables.block_table("b"), tables.length("b")) == ([], 0)
    assert allocator.num_free == 1


def test_fork_shares_all_pages():
    allocator, tables = make_tables(page_size=4)
    tables.add("a")
    tables.reserve("a", 6)
    tables.fork("a", "b")
    assert tables.block_table("b") == [0, 1]
    assert tables.length("b") == 6
    assert (allocator.refcount(0), allocator.refcount(1), allocator.num_free) == (2, 2, 6)
    with pytest.raises(ValueError, match="'b' already exists"):
        tables.fork("a", "b")
    with pytest.raises(ValueError, match="unknown sequence 'z'"):
        tables.fork("z", "c")


def test_copy_on_write_of_shared_partial_last_page():
    allocator, tables = make_tables(page_size=4)
    tables.add("a")
    tables.reserve("a", 6)  # [0, 1], page 1 holds 2 of 4 slots
    tables.fork("a", "b")
    assert tables.num_pages_needed("b", 1) == 1

    assert tables.reserve("b", 1) == [(1, 2)]
    assert tables.block_table("b") == [0, 2]
    assert tables.block_table("a") == [0, 1]
    assert (tables.length("a"), tables.length("b")) == (6, 7)
    assert [allocator.refcount(p) for p in range(3)] == [2, 1, 1]

    # "a" is now the only holder of page 1, so it writes in place.
    assert tables.num_pages_needed("a", 2) == 0
    assert tables.reserve("a", 2) == []
    assert tables.block_table("a") == [0, 1]
    assert allocator.num_free == 5


def test_copy_on_write_then_new_pages_in_one_reserve():
    allocator, tables = make_tables(page_size=4)
    tables.add("a")
    tables.reserve("a", 2)
    tables.fork("a", "b")
    assert tables.num_pages_needed("b", 7) == 3  # CoW page + 2 new pages for 9 tokens
    assert tables.reserve("b", 7) == [(0, 1)]
    assert tables.block_table("b") == [1, 2, 3]
    assert tables.block_table("a") == [0]
    assert allocator.num_free == 4


def test_copy_on_write_out_of_pages_changes_nothing():
    allocator, tables = make_tables(num_pages=2, page_size=4)
    tables.add("a")
    tables.reserve("a", 6)
    tables.fork("a", "b")
    with pytest.raises(OutOfPagesError):
        tables.reserve("b", 1)
    assert tables.block_table("a") == tables.block_table("b") == [0, 1]
    assert (tables.length("a"), tables.length("b")) == (6, 6)
    assert (allocator.refcount(0), allocator.refcount(1)) == (2, 2)


def test_full_shared_pages_are_not_copied():
    allocator, tables = make_tables(page_size=4)
    tables.add("a")
    tables.reserve("a", 8)
    tables.fork("a", "b")
    assert tables.num_pages_needed("b", 1) == 1
    assert tables.reserve("b", 1) == []
    assert tables.block_table("b") == [0, 1, 2]
    assert tables.block_table("a") == [0, 1]
    assert [allocator.refcount(p) for p in range(3)] == [2, 2, 1]


def test_reserve_zero_tokens_never_copies():
    allocator, tables = make_tables(page_size=4)
    tables.add("a")
    tables.reserve("a", 1)
    tables.fork("a", "b")
    assert tables.num_pages_needed("b", 0) == 0
    assert tables.reserve("b", 0) == []
    assert tables.block_table("b") == [0]
    assert allocator.refcount(0) == 2


def test_free_sequence_decrefs_its_pages():
    allocator, tables = make_tables(page_size=4)
    tables.add("a")
    tables.reserve("a", 5)
    tables.fork("a", "b")
    tables.free("a")
    assert "a" not in tables and tables.sequences() == ["b"]
    assert (allocator.refcount(0), allocator.refcount(1), allocator.num_free) == (1, 1, 6)
    tables.free("b")
    assert allocator.num_free == 8
    with pytest.raises(ValueError, match="unknown sequence 'b'"):
        tables.free("b")


def test_truncate_front_releases_pages_and_keeps_logical_indexing():
    allocator, tables = make_tables(page_size=4)
    tables.add("a")
    tables.reserve("a", 10)  # [0, 1, 2], page 2 partial
    assert tables.truncate_front("a", 1) == [0]
    assert tables.block_table("a") == [RELEASED, 1, 2] == [-1, 1, 2]
    assert (allocator.refcount(0), allocator.num_free, tables.num_released_pages("a")) == (0, 6, 1)
    assert tables.truncate_front("a", 0) == []
    # Each call continues after the pages already released.
    assert tables.truncate_front("a", 1) == [1]
    assert tables.block_table("a") == [-1, -1, 2]
    assert (tables.length("a"), tables.num_released_pages("a")) == (10, 2)
    assert tables.logical_index_of_page(2) == 2

    tables.reserve("a", 3)
    assert tables.block_table("a") == [-1, -1, 2, 0]
    assert tables.logical_index_of_page(0) == 3
    assert tables.truncate_front("a", 1) == [2]
    tables.free("a")
    assert allocator.num_free == 8


def test_truncate_front_only_complete_pages():
    _, tables = make_tables(page_size=4)
    tables.add("a")
    tables.reserve("a", 7)
    with pytest.raises(ValueError, match="1 complete pages of page_size 4, 0 already released, so at most 1 more"):
        tables.truncate_front("a", 2)
    assert tables.block_table("a") == [0, 1]
    tables.truncate_front("a", 1)
    with pytest.raises(ValueError, match="1 already released, so at most 0 more"):
        tables.truncate_front("a", 1)
    assert tables.block_table("a") == [-1, 1]
    tables.reserve("a", 1)
    assert tables.truncate_front("a", 1) == [1]
    assert tables.block_table("a") == [-1, -1]


def test_truncate_front_of_shared_page_keeps_it_for_the_other_holder():
    allocator, tables = make_tables(page_size=2)
    tables.add("a")
    tables.reserve("a", 4)
    tables.fork("a", "b")
    assert tables.truncate_front("a", 1) == [0]
    assert allocator.refcount(0) == 1
    assert tables.block_table("b") == [0, 1]
    assert tables.logical_index_of_page(0) == 0
    tables.fork("a", "c")
    assert tables.block_table("c") == [-1, 1]
    assert tables.num_released_pages("c") == 1
    assert allocator.refcount(1) == 3
    assert tables.truncate_front("c", 1) == [1]
    assert tables.block_table("a") == [-1, 1]


def test_logical_index_of_page():
    _, tables = make_tables(page_size=2)
    tables.add("a")
    tables.reserve("a", 5)
    tables.fork("a", "b")
    tables.reserve("b", 1)  # CoW of page 2 into page 3, at logical index 2
    assert [tables.logical_index_of_page(p) for p in range(4)] == [0, 1, 2, 2]
    with pytest.raises(ValueError, match="page 4 is not in any sequence"):
        tables.logical_index_of_page(4)
    with pytest.raises(ValueError, match="not in 0..7"):
        tables.logical_index_of_page(8)


# ---------------------------------------------------------------- property test


class PageTablesLifecycle(RuleBasedStateMachine):
    """Random request lifecycles against a shadow model of refcounts and page contents.

    Every written token slot records (writer, position); after each step every
    sequence must read back exactly its own history, which fails if a write ever
    lands in a page another sequence still reads (a missed copy-on-write).
    """

    @initialize(num_pages=st.integers(1, 8), page_size=st.integers(1, 4))
    def setup(self, num_pages, page_size):
        self.allocator = BlockAllocator(num_pages)
        self.tables = PageTables(self.allocator, page_size)
        self.page_size = page_size
        self.next_id = 0
        self.history: dict[int, list[tuple[int, int]]] = {}
        self.contents: dict[int, dict[int, tuple[int, int]]] = {}  # page -> slot -> token
        self.raw_pages: list[int] = []  # held directly on the allocator, not by any sequence

    def _new_id(self) -> int:
        self.next_id += 1
        return self.next_id

    def _pick(self, index: int) -> int:
        seqs = self.tables.sequences()
        return seqs[index % len(seqs)]

    def _snapshot(self):
        return (
            {s: (self.tables.block_table(s), self.tables.length(s)) for s in self.tables.sequences()},
            [self.allocator.refcount(p) for p in range(self.allocator.num_pages)],
            self.allocator.num_free,
        )

    def _expected_pages_needed(self, seq, n) -> int:
        table, length = self.tables.block_table(seq), self.tables.length(seq)
        new = -(-(length + n) // self.page_size) - len(table)
        is_shared_partial = n > 0 and length % self.page_size and self.allocator.refcount(table[-1]) > 1
        return new + int(bool(is_shared_partial))

    @rule()
    def add(self):
        seq = self._new_id()
        self.tables.add(seq)
        self.history[seq] = []

    @precondition(lambda self: self.tables.sequences())
    @rule(index=st.integers(0, 100))
    def fork(self, index):
        parent, child = self._pick(index), self._new_id()
        self.tables.fork(parent, child)
        self.history[child] = list(self.history[parent])

    @precondition(lambda self: self.tables.sequences())
    @rule(index=st.integers(0, 100), n=st.integers(0, 9))
    def reserve(self, index, n):
        seq = self._pick(index)
        needed = self.tables.num_pages_needed(seq, n)
        assert needed == self._expected_pages_needed(seq, n)
        if needed > self.allocator.num_free:
            before = self._snapshot()
            with pytest.raises(OutOfPagesError) as info:
                self.tables.reserve(seq, n)
            assert (info.value.requested, info.value.available) == (needed, self.allocator.num_free)
            assert self._snapshot() == before
            return
        free_before = self.allocator.num_free
        copies = self.tables.reserve(seq, n)
        assert self.allocator.num_free == free_before - needed
        for src, dst in copies:
            self.contents[dst] = dict(self.contents.get(src, {}))
        table, start = self.tables.block_table(seq), len(self.history[seq])
        for pos in range(start, start + n):
            token = (seq, pos)
            self.contents.setdefault(table[pos // self.page_size], {})[pos % self.page_size] = token
            self.history[seq].append(token)

    @precondition(lambda self: self.tables.sequences())
    @rule(index=st.integers(0, 100), fraction=st.floats(0, 1))
    def truncate_front(self, index, fraction):
        seq = self._pick(index)
        table = self.tables.block_table(seq)
        start = table.count(RELEASED)
        num_pages = round(fraction * (self.tables.length(seq) // self.page_size - start))
        assert self.tables.truncate_front(seq, num_pages) == table[start : start + num_pages]
        assert self.tables.block_table(seq)[: start + num_pages] == [RELEASED] * (start + num_pages)
        assert self.tables.num_released_pages(seq) == start + num_pages

    @precondition(lambda self: self.tables.sequences())
    @rule(index=st.integers(0, 100))
    def free_sequence(self, index):
        seq = self._pick(index)
        self.tables.free(seq)
        del self.history[seq]

    @rule(n=st.integers(0, 3))
    def raw_allocate(self, n):
        if n > self.allocator.num_free:
            before = self._snapshot()
            with pytest.raises(OutOfPagesError):
                self.allocator.allocate(n)
            assert self._snapshot() == before
        else:
            self.raw_pages += self.allocator.allocate(n)

    @precondition(lambda self: self.raw_pages)
    @rule(count=st.integers(1, 3))
    def raw_free(self, count):
        dropped, self.raw_pages = self.raw_pages[:count], self.raw_pages[count:]
        self.allocator.free(dropped)

    @invariant()
    def refcounts_match_holders(self):
        self.allocator.check_invariants()
        self.tables.check_invariants()
        holders = [0] * self.allocator.num_pages
        for page in self.raw_pages:
            holders[page] += 1
        for seq in self.tables.sequences():
            for page in self.tables.block_table(seq):
                if page != RELEASED:
                    holders[page] += 1
        assert [self.allocator.refcount(p) for p in range(self.allocator.num_pages)] == holders
        assert self.allocator.num_free == holders.count(0)
        assert self.allocator.num_free + self.allocator.num_used == self.allocator.num_pages

    @invariant()
    def each_physical_page_has_one_logical_index(self):
        for seq in self.tables.sequences():
            for logical, page in enumerate(self.tables.block_table(seq)):
                if page != RELEASED:
                    assert self.tables.logical_index_of_page(page) == logical

    @invariant()
    def every_sequence_reads_its_own_tokens(self):
        for seq in self.tables.sequences():
            table = self.tables.block_table(seq)
            assert self.tables.length(seq) == len(self.history[seq])
            for pos, token in enumerate(self.history[seq]):
                page = table[pos // self.page_size]
                if page != RELEASED:
                    assert self.contents[page][pos % self.page_size] == token

    def teardown(self):
        for seq in self.tables.sequences():
            self.tables.free(seq)
        self.allocator.free(self.raw_pages)
        self.allocator.check_invariants()
        assert self.allocator.num_free == self.allocator.num_pages


PageTablesLifecycle.TestCase.settings = settings(max_examples=200, stateful_step_count=30, deadline=None)
test_page_tables_lifecycle = PageTablesLifecycle.TestCase
