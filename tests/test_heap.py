"""fms.entrypoints.heap: the start-up heap frozen out of the collector's full scans (server processes), and frozen
only for a timed section (benchmarks)."""

import gc
import weakref

from fms.entrypoints.heap import freeze_startup_heap, frozen_heap


class Node:
    def __init__(self):
        self.other = self  # a cycle: only the collector reclaims it


def test_freeze_collects_startup_garbage_first_then_freezes_what_lives():
    garbage, kept = Node(), Node()
    dead = weakref.ref(garbage)
    del garbage
    try:
        count = freeze_startup_heap()
        assert dead() is None  # collected before the freeze, not frozen forever
        assert count == gc.get_freeze_count() > 0
        gc.collect()
        assert gc.get_freeze_count() == count  # a full collection leaves the frozen objects alone
        assert kept.other is kept
    finally:
        gc.unfreeze()


def test_frozen_heap_thaws_on_exit_so_that_frozen_cycles_can_be_collected():
    assert gc.get_freeze_count() == 0
    node = Node()
    ref = weakref.ref(node)
    with frozen_heap():
        assert gc.get_freeze_count() > 0
        del node
        gc.collect()
        assert ref() is not None  # frozen: the collector does not see it
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert ref() is None
