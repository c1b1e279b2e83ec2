"""launch(fn, world_size): run fn on world_size ranks, one process each (torch.multiprocessing), and collect
what each returns. The first rank that fails stops the others; its traceback is raised in the caller."""

import os
import pickle
import queue as queue_lib
import socket
import time
import traceback
from contextlib import contextmanager
from typing import Callable

import torch
import torch.multiprocessing as mp

from fms.distributed.group import DEFAULT_TIMEOUT_S, init_distributed

# How long a rank that exited is given for its report to arrive through the queue before it counts as lost.
_REPORT_GRACE_S = 2.0


class RankFailedError(RuntimeError):
    """A rank raised or died; the other ranks were stopped. .rank is the failed rank, .details its traceback."""

    def __init__(self, rank: int, details: str, others: dict[int, str]):
        self.rank, self.details, self.others = rank, details, others
        message = f"tensor-parallel rank {rank} failed; the other ranks were stopped.\n{details}"
        for other, text in sorted(others.items()):
            last = text.strip().splitlines()[-1] if text.strip() else text
            message += f"\n(rank {other} then reported: {last})"
        super().__init__(message)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _environment(**values):
    """os.environ with values added (only those not set already) while processes start."""
    added = {k: v for k, v in values.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def _worker(rank, world_size, port, fn, args, kwargs, backend, timeout_s, seed, num_threads, reports):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        init_distributed(backend, timeout_s=timeout_s, seed=seed)
        result = pickle.dumps(fn(*args, **kwargs))
    except BaseException:  # noqa: BLE001  (reported to the launcher, which raises it)
        reports.put((rank, False, traceback.format_exc()))
        reports.close()
        reports.join_thread()
        os._exit(1)  # no teardown: a process group with a dead peer may block in destroy
    reports.put((rank, True, result))
    reports.close()
    reports.join_thread()
    import torch.distributed as dist

    dist.destroy_process_group()


def launch(fn: Callable, world_size: int, args: tuple = (), kwargs: dict | None = None, *,
           backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S, seed: int = 0,
           num_threads: int | None = None, start_method: str = "spawn", max_run_s: float | None = None) -> list:
    """Run fn(*args, **kwargs) on ranks 0..world_size-1, one process each, with torch.distributed initialized
    (fms.distributed.init_distributed: NCCL and cuda:rank on CUDA, else gloo); returns [rank 0's return value,
    rank 1's, ...]. fn and its arguments must pickle (a module-level function); so must what it returns.

    The first rank that raises (or dies) stops the run: the others are terminated and RankFailedError carries
    that rank's traceback. Collectives time out after timeout_s; max_run_s bounds the whole run (TimeoutError).
    seed: torch's host generator on every rank (so unseeded requests draw the same seeds everywhere).
    num_threads: torch CPU threads per rank (None: torch's default).
    start_method: "spawn" (safe with CUDA) or "fork" (faster to start, CPU only).
    """
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    if start_method not in ("spawn", "fork", "forkserver"):
        raise ValueError(f"start_method must be 'spawn', 'fork' or 'forkserver', got {start_method!r}")
    if backend in (None, "nccl") and torch.cuda.is_available() and world_size > torch.cuda.device_count():
        raise ValueError(f"world_size {world_size} is more than the {torch.cuda.device_count()} GPUs of this host")
    ctx = mp.get_context(start_method)
    reports = ctx.Queue()
    port = _free_port()
    processes = []
    # the same string hashes on every rank, so that iterating a set of string request ids agrees
    with _environment(PYTHONHASHSEED="0"):
        for rank in range(world_size):
            p = ctx.Process(target=_worker, name=f"fms-tp-rank{rank}", daemon=True,
                            args=(rank, world_size, port, fn, args, kwargs or {}, backend, timeout_s, seed,
                                  num_threads, reports))
            p.start()
            processes.append(p)
    try:
        return _collect(processes, reports, max_run_s)
    finally:
        _stop(processes, grace_s=5.0)  # after a success the ranks are only leaving the process group


def _collect(processes, reports, max_run_s) -> list:
    world_size = len(processes)
    results: dict[int, bytes] = {}
    errors: dict[int, str] = {}
    exited_at: dict[int, float] = {}
    start = time.monotonic()
    while len(results) < world_size and not errors:
        try:
            rank, ok, payload = reports.get(timeout=0.1)
            (results if ok else errors)[rank] = payload
            continue
        except queue_lib.Empty:
            pass
        now = time.monotonic()
        for rank, p in enumerate(processes):
            if rank in results or rank in errors or p.exitcode is None:
                continue
            if now - exited_at.setdefault(rank, now) > _REPORT_GRACE_S:
                errors[rank] = (f"rank {rank}'s process exited with code {p.exitcode} without a report "
                                "(killed by a signal, out of memory, or os._exit)")
        if max_run_s is not None and now - start > max_run_s:
            raise TimeoutError(f"the {world_size} tensor-parallel ranks ran past max_run_s={max_run_s}; "
                               f"finished: {sorted(results)}; stopped the rest")
    if errors:
        first = next(iter(errors))
        _stop(processes, grace_s=0.0)
        while True:  # what the others said before they were stopped (e.g. a collective's error)
            try:
                rank, ok, payload = reports.get_nowait()
            except (queue_lib.Empty, OSError, EOFError):
                break
            if not ok and rank != first:
                errors[rank] = payload
        raise RankFailedError(first, errors[first], {r: t for r, t in errors.items() if r != first})
    return [pickle.loads(results[rank]) for rank in range(world_size)]


def _stop(processes, grace_s: float) -> None:
    """Wait up to grace_s for the processes to exit, then terminate (and if need be kill) the rest."""
    deadline = time.monotonic() + grace_s
    for p in processes:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in processes:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + 5.0
    for p in processes:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(1.0)
