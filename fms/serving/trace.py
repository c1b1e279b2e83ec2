"""An optional timeline of the engine's requests and steps, to find where a server run loses time against the
offline engine (which steps it waited for, how long the engine sat idle, when the first request reached it).

`FMS_STEP_TRACE=PATH` makes every LLMEngine built in the process append one line per event to PATH:

    recv T N        the engine process took a message of N adds off its pipe (fms serve's engine process only)
    add T           a request was added to the engine
    step T0 T1 N D  one step ran from T0 to T1 over N batched tokens, D decode steps (D > 1: a decode window)

Times are time.perf_counter() seconds: CLOCK_MONOTONIC on Linux, one clock for every process of the machine, so a
client's timestamps and the engine process's compare directly. Off (the default) it costs one attribute test per
event. Lines are written whole under a lock and flushed at once, so a reader sees complete lines while the
engine runs.
"""

from __future__ import annotations

import os
import threading

ENV = "FMS_STEP_TRACE"


class StepTrace:
    def __init__(self, path: str):
        self.path = path
        self._file = open(path, "a", buffering=1)  # line-buffered: each event is on disk when written
        self._lock = threading.Lock()  # the engine thread and the engine process's pipe reader both write

    def _write(self, line: str) -> None:
        with self._lock:
            self._file.write(line)

    def recv(self, t: float, num_adds: int) -> None:
        self._write(f"recv {t:.6f} {num_adds}\n")

    def add(self, t: float) -> None:
        self._write(f"add {t:.6f}\n")

    def step(self, t0: float, t1: float, num_tokens: int, num_decode_steps: int) -> None:
        self._write(f"step {t0:.6f} {t1:.6f} {num_tokens} {num_decode_steps}\n")

    def close(self) -> None:
        with self._lock:
            self._file.close()


def from_env() -> StepTrace | None:
    """The trace FMS_STEP_TRACE names, or None when it is unset or empty."""
    path = os.environ.get(ENV)
    return StepTrace(path) if path else None


def read(path: str) -> dict[str, list[tuple]]:
    """The events of a trace file by kind: {"recv": [(t, n)], "add": [(t,)], "step": [(t0, t1, n, d)]}."""
    events: dict[str, list[tuple]] = {"recv": [], "add": [], "step": []}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            kind, *fields = line.split()
            if kind not in events:
                raise ValueError(f"{path}:{number}: unknown event {kind!r} (one of {', '.join(events)})")
            events[kind].append(tuple(float(x) if "." in x else int(x) for x in fields))
    return events


def summarize(events: dict[str, list[tuple]], start: float, end: float) -> dict:
    """One run's timeline, in ms from its start (a client's time.perf_counter() before it sent anything) to its
    end: when requests reached the engine, when the first step began and the last ended, how long the engine
    stepped, how long it sat idle between its first step and its last, and the tail from its last step to the
    end. Events outside [start, end] belong to other runs and are left out."""
    def ms(t: float) -> float:
        return 1e3 * (t - start)

    steps = [s for s in events["step"] if start <= s[0] and s[1] <= end]
    adds = [a[0] for a in events["add"] if start <= a[0] <= end]
    recvs = [r for r in events["recv"] if start <= r[0] <= end]
    if not steps:
        raise ValueError(f"no engine step between {start:.6f} and {end:.6f}: is {ENV} set where the engine runs?")
    busy = sum(t1 - t0 for t0, t1, _, _ in steps)
    span = steps[-1][1] - steps[0][0]
    summary = {
        "num_steps": len(steps), "num_adds": len(adds),
        "first_add_ms": ms(adds[0]) if adds else None, "last_add_ms": ms(adds[-1]) if adds else None,
        "first_step_start_ms": ms(steps[0][0]), "last_step_end_ms": ms(steps[-1][1]),
        "busy_ms": 1e3 * busy, "idle_between_steps_ms": 1e3 * (span - busy),
        "tail_ms": 1e3 * (end - steps[-1][1]), "duration_ms": 1e3 * (end - start),
        # the steps before the last request was added: the engine started on part of the burst
        "steps_before_last_add": sum(1 for s in steps if adds and s[0] < adds[-1]),
    }
    if recvs:
        summary.update(first_recv_ms=ms(recvs[0][0]), last_recv_ms=ms(recvs[-1][0]),
                       num_recv_messages=len(recvs), recv_sizes=[r[1] for r in recvs])
    return summary
