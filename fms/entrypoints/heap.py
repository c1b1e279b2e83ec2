"""The garbage collector in the server's long-lived processes.

A full (oldest-generation) collection scans every object the collector tracks, and after start-up that is mostly
the modules, the model and the compiled graphs, which live as long as the process. On the CPU it paused the HTTP
process and the engine process for 100-140 ms at a time while serving a burst of 128 streams
(final_project/results/session18/cpu/gc_*.txt); each such pause of the engine process stops every request.
`freeze_startup_heap`, called once a process is ready to serve, moves what exists then out of the collector's
scans (gc.freeze, as vLLM's servers do), so later collections scan only what serving allocates. Objects frozen
that become garbage are not reclaimed: call it only in a process that keeps what it built until it exits (the
engine process), or thaw afterwards (`frozen_heap`: run_server, which may run inside a caller's process).
"""

import contextlib
import gc


def freeze_startup_heap() -> int:
    """Collect what start-up left as garbage, then freeze the rest; returns how many objects are frozen now."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


@contextlib.contextmanager
def frozen_heap():
    """The heap frozen for a section (serving, or a benchmark's timed runs), then thawed, so that what was frozen
    can be collected again. The load generator of `fms bench serve` paused for 200 ms in one collection while
    sending a burst on the CPU (final_project/results/session18/cpu/gc_client.txt)."""
    freeze_startup_heap()
    try:
        yield
    finally:
        gc.unfreeze()
