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
    dead, alive = weakref.ref(garbage), weakref.ref(kept)
    del garbage
    try:
        count = freeze_startup_heap()
        assert dead() is None  # collected before the freeze, not frozen forever
        # the count it returns is the frozen generation's; frozen objects still leave it when their last reference
        # goes (a temporary of the pytest run freed after the call: once 2 fewer in a full `make test`)
        assert 0 < gc.get_freeze_count() <= count
        del kept  # a cycle frozen while alive, now garbage: a full collection leaves it alone
        gc.collect()
        assert alive() is not None and alive().other is alive()
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
