"""Clocks on the device timeline, peak-memory counters, and timed calls (eager and replayed from a CUDA graph).

CUDA events on a GPU, time.perf_counter on the CPU. Sizes in GB are 1e9 bytes.
"""

import gc
import math
import statistics
import time

import torch

GB = 1e9


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median(values):
    """Median of the values that are not None; None when there are none."""
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def median_interval(values, confidence: float = 0.95) -> tuple[float, float] | None:
    """A distribution-free interval for the median of the population the values were drawn from: the
    order statistics (k-th smallest, k-th largest) with k the largest rank whose binomial(n, 1/2) tail
    keeps the coverage at least `confidence`. None when the sample is too small for that coverage
    (n < 6 at 95%). Assumes independent draws, such as the per-repeat ratios of interleaved runs."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    xs = sorted(values)
    n = len(xs)
    best = None
    tail = 0.0  # P(Binomial(n, 1/2) < k)
    for k in range(1, n // 2 + 1):
        tail += math.comb(n, k - 1) / 2**n
        if 1 - 2 * tail < confidence:
            break
        best = k
    return None if best is None else (xs[best - 1], xs[n - best])


class Clock:
    """Marks on the device timeline: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.is_cuda = device.type == "cuda"

    def mark(self):
        if self.is_cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def ms(self, start, end) -> float:
        """Elapsed ms between two marks; call after sync()."""
        return start.elapsed_time(end) if self.is_cuda else (end - start) * 1e3

    def sync(self) -> None:
        synchronize(self.device)

    def timed(self, fn) -> tuple[float, object]:
        """(ms, result) of one call of fn, with the device idle before and after."""
        self.sync()
        start = self.mark()
        out = fn()
        end = self.mark()
        self.sync()
        return self.ms(start, end), out


class StepClock(Clock):
    """A Clock that keeps its marks: intervals_ms() gives the time between consecutive marks."""

    def __init__(self, device: torch.device):
        super().__init__(device)
        self.marks: list = []

    def mark(self):
        self.marks.append(super().mark())

    def intervals_ms(self) -> list[float]:
        self.sync()
        return [self.ms(a, b) for a, b in zip(self.marks, self.marks[1:])]


def reset_peak_memory(device: torch.device) -> None:
    """Before a measured run: return cached blocks first, so that the reserved peak is this run's own."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def peak_memory_gb(device: torch.device) -> tuple[float | None, float | None]:
    """(max allocated, max reserved) since the last reset, in GB; (None, None) off the GPU."""
    if device.type != "cuda":
        return None, None
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / GB, torch.cuda.max_memory_reserved(device) / GB


def time_calls(run, warmup: int, repeats: int, device: torch.device):
    """Median wall ms of run() over repeats after warmup calls; -> (ms, last result, peak alloc GB)."""
    for _ in range(warmup):
        run()
    times, out = [], None
    reset_peak_memory(device)
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        out = run()
        synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    peak_alloc, _ = peak_memory_gb(device)
    return statistics.median(times), out, peak_alloc


def time_eager(fn, warmup: int, repeats: int, clock: Clock) -> tuple[list[float], object]:
    """warmup untimed calls, then the device time of each of repeats calls; (times, last call's output)."""
    for _ in range(warmup):
        fn()
    times, out = [], None
    for _ in range(repeats):
        out = None  # free the previous output before the next call
        ms, out = clock.timed(fn)
        times.append(ms)
    return times, out


def time_graph(fn, warmup: int, repeats: int, clock: Clock) -> list[float]:
    """fn captured once in a CUDA graph (warmed up on a side stream first, as in the PyTorch docs), then warmup
    untimed replays and the device time of each of repeats replays: the call's GPU time without its launches."""
    caller_stream = torch.cuda.current_stream()
    side = torch.cuda.Stream()
    side.wait_stream(caller_stream)
    with torch.cuda.stream(side):
        for _ in range(max(warmup, 1)):
            fn()
    caller_stream.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            out = fn()  # lives in the graph's memory pool; replays rewrite it
    finally:
        # a failed capture_end leaves torch.cuda.graph's capture stream current
        torch.cuda.set_stream(caller_stream)
    for _ in range(warmup):
        graph.replay()
    times = [clock.timed(graph.replay)[0] for _ in range(repeats)]
    del out, graph
    return times


def first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200] if lines else ''}"


def graph_failure(exc: BaseException) -> str:
    """The capture's own error: a failed capture often surfaces as capture_end's error about an earlier one."""
    root = exc
    while root.__context__ is not None and root.__context__ is not root:
        root = root.__context__
    reason = f"CUDA graph capture failed: {first_line(root)}"
    return reason if root is exc else f"{reason} (then {first_line(exc)})"


def checked_device_type(value: str | None, name: str = "device_type") -> str:
    """"cuda" or "cpu" (None: cuda when there is a GPU); ValueError naming the field for anything else."""
    if value is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if value not in ("cuda", "cpu"):
        raise ValueError(f"{name} must be cuda or cpu, got {value!r}")
    if value == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name} cuda: no CUDA GPU is available (use {name} cpu)")
    return value
