"""Child processes of the benchmarks, read from Linux's /proc: who is whose child, CPU time per thread, and a
child run in a session of its own under a time limit (killed with everything below it when over).

The start-up benchmark, the targets table and the server-vs-offline benchmark all run children this way; each
function degrades to "nothing found" where /proc does not exist.
"""

from __future__ import annotations

import os
import signal
import subprocess
from typing import Callable


def _children_by_parent() -> dict[int, list[int]]:
    """Every process's children, from /proc/<pid>/stat (the field after the command name is the parent)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):  # gone meanwhile, or not a process entry
            continue
        children.setdefault(parent, []).append(int(entry))
    return children


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is pid."""
    return _children_by_parent().get(pid, [])


def descendant_pids(pid: int) -> list[int]:
    """Every process below pid, at any depth (children that started sessions of their own included)."""
    children = _children_by_parent()
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def thread_cpu_s(pid: int) -> dict[int, float] | None:
    """CPU seconds (user + system) of each thread of process pid (None where there is no such process)."""
    try:
        tick = os.sysconf("SC_CLK_TCK")
        out = {}
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            out[int(tid)] = (int(fields[11]) + int(fields[12])) / tick
        return out
    except (OSError, ValueError, IndexError):
        return None


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL proc's session and every process below it (children with sessions of their own included)."""
    for pid in descendant_pids(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_in_session(argv: list[str], timeout_s: float, *, stdout, stderr, env: dict | None = None, cwd=None,
                   before_kill: Callable[[subprocess.Popen], None] | None = None) -> tuple[str, int]:
    """Run argv in a session of its own and wait up to timeout_s: ("ok" | "failed", its exit code), or past the
    limit ("timed_out", the code it was killed with) after before_kill(proc) (e.g. ask it for a stack dump) and
    kill_tree: a timeout ends the child, its compile workers and anything else it started."""
    proc = subprocess.Popen(argv, stdout=stdout, stderr=stderr, env=env, cwd=cwd, start_new_session=True)
    try:
        returncode = proc.wait(timeout=timeout_s)
        return ("ok" if returncode == 0 else "failed"), returncode
    except subprocess.TimeoutExpired:
        if before_kill is not None:
            before_kill(proc)
        kill_tree(proc)
        return "timed_out", proc.wait()
