"""`fms generate` and `fms serve` with --tensor-parallel-size N > 1: the command starts N ranks itself
(fms.distributed.launch), every rank builds its shard of the model and the same engine, and rank 0 prints or
serves.

    fms serve -tp 2 (parent)       rank 0                                  rank 1 .. N-1
    launch(serve_rank, N)  ----->  HTTP server, AsyncEngine thread:        follow(engine):
                                     take new requests and aborts
                                     broadcast them (gloo)  ----------->     apply the same events
                                     engine.step()  <== all-reduces ==>      engine.step()
    SIGTERM / Ctrl-C  --SIGTERM-->   drain, then broadcast stop  ------->    return
    exit 0 once every rank returned

Every rank runs the same deterministic scheduler on the same inputs (docs/tensor_parallel.md), so the only
thing rank 0 sends is what the HTTP side did to its engine since the last step, in order: a request added
(rank 0's request id, its token ids, its SamplingParams with the seed it drew), an abort, and at the end a stop.
While idle, rank 0 sends an empty list at least every HEARTBEAT_S, so a follower's broadcast never waits long.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from datetime import timedelta

import torch

from fms.distributed import DEFAULT_TIMEOUT_S, TensorParallel, current_tensor_parallel, launch
from fms.entrypoints.model_loading import resolve_model_once

logger = logging.getLogger(__name__)

HEARTBEAT_S = 0.5  # an idle rank 0 still broadcasts this often (followers block in the broadcast meanwhile)
PARENT_POLL_S = 1.0  # how often a rank checks that the fms command that started it is alive


# -- the parent: start the ranks ------------------------------------------------------------------------------
def _launch_options(args) -> dict:
    """Where the ranks run: NCCL and cuda:rank on CUDA, gloo on CPU, with the CPU threads shared out."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        kind = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device must be cuda or cpu, got {device!r}") from None
    if kind.type not in ("cuda", "cpu"):
        raise ValueError(f"--tensor-parallel-size runs on cuda (NCCL) or cpu (gloo), not --device {device}")
    if kind.index is not None:
        raise ValueError(f"--device {device} names one GPU, but rank r of --tensor-parallel-size uses cuda:r; "
                         "give --device cuda (and CUDA_VISIBLE_DEVICES to choose the GPUs)")
    if kind.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but this machine has no CUDA device; give --device cpu (gloo)")
    args.device = kind.type  # every rank the same, whatever each one would guess
    if kind.type == "cuda":
        return dict(backend="nccl")
    threads = max(1, torch.get_num_threads() // args.tensor_parallel_size)
    return dict(backend="gloo", num_threads=threads)


def launch_generate(args) -> tuple[list[str], list]:
    """`fms generate` on N ranks: every rank runs the same generate() call; rank 0's texts and outputs."""
    options = _launch_options(args)
    resolve_model_once(args)
    return launch(generate_rank, args.tensor_parallel_size, (args,), **options)[0]


def launch_serve(args) -> int:
    """`fms serve` on N ranks until SIGTERM / Ctrl-C (forwarded to rank 0, which drains and stops the others)."""
    from fms.entrypoints.openai.server import check_port_free

    options = _launch_options(args)
    check_port_free(args.host, args.port)
    resolve_model_once(args)
    # rank 0's pid, set once it takes signals itself (before that, a signal here stops the start-up)
    rank0_pid = torch.multiprocessing.get_context("spawn").Value("q", 0, lock=False)
    with _forward_signals(rank0_pid):
        try:
            launch(serve_rank, args.tensor_parallel_size, (args, rank0_pid, os.getpid()), **options)
        except _Interrupted as e:  # before rank 0 could take the signal: the ranks were stopped
            print(f"stopped by signal {e.signum} while the {args.tensor_parallel_size} ranks were starting",
                  flush=True)
            return 128 + e.signum
    return 0


class _Interrupted(Exception):
    def __init__(self, signum: int):
        super().__init__(f"signal {signum}")
        self.signum = signum


class _forward_signals:
    """While the ranks run: the first SIGTERM / SIGINT to this process becomes a SIGTERM to rank 0 (a drained
    shutdown), a second one a SIGINT (uvicorn's forced exit). The ranks are in process groups of their own,
    so a terminal's Ctrl-C reaches only this process, and rank 0 gets one signal, not two."""

    def __init__(self, rank0_pid):
        self.rank0_pid, self.num_signals, self.previous = rank0_pid, 0, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame):
        pid = self.rank0_pid.value
        if pid == 0:
            raise _Interrupted(signum)  # launch() stops the ranks on the way out
        self.num_signals += 1
        try:
            os.kill(pid, signal.SIGTERM if self.num_signals == 1 else signal.SIGINT)
        except ProcessLookupError:  # rank 0 has exited already; launch() reports how
            pass


# -- the ranks ------------------------------------------------------------------------------------------------
def generate_rank(args):
    from fms.entrypoints.commands import generate_outputs

    is_first = current_tensor_parallel().rank == 0
    texts, outputs = generate_outputs(args, show_note=is_first)
    return (texts, outputs) if is_first else None  # every rank has the same; only rank 0's travels back


def serve_rank(args, rank0_pid, parent_pid: int) -> int:
    from fms.entrypoints.commands import LOG_FORMAT, serve_engine
    from fms.entrypoints.engine_args import build_engine
    from fms.entrypoints.heap import freeze_startup_heap

    os.setpgrp()  # a terminal's Ctrl-C goes to the fms command, which forwards it to rank 0 alone
    tp = current_tensor_parallel()
    stop_requested = threading.Event()
    if tp.rank == 0:  # a signal before the server runs stops it from starting; then uvicorn's handlers take over
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop_requested.set())
        rank0_pid.value = os.getpid()
    level = args.log_level.upper() if tp.rank == 0 else max(logging.WARNING, logging.getLevelName(
        args.log_level.upper()))
    logging.basicConfig(level=level, format=f"[rank {tp.rank}] {LOG_FORMAT}" if tp.rank else LOG_FORMAT)
    # host messages go over a gloo group of their own, beside the model's NCCL group on GPUs
    channel = TensorParallel(tp.rank, tp.world_size, torch.distributed.new_group(
        backend="gloo", timeout=timedelta(seconds=DEFAULT_TIMEOUT_S)))
    pids = [None] * tp.world_size
    torch.distributed.all_gather_object(pids, os.getpid(), group=channel.group)
    _watch_parent(parent_pid, tp.rank, args.shutdown_timeout)
    engine, loaded = build_engine(args)
    if tp.rank != 0:
        # a follower keeps its engine until it exits; a full collection there would stall every rank's collectives
        freeze_startup_heap()
        return follow(engine, channel)
    followers = EventBroadcast(channel)
    if stop_requested.is_set():
        followers.stop()
        return 0
    from fms.entrypoints.chat import load_chat_template

    note = f"; tensor parallel over {tp.world_size} processes, pids {' '.join(map(str, pids))}"
    return serve_engine(args, load_chat_template(args.chat_template, None), engine, loaded, followers, note)


def _watch_parent(parent_pid: int, rank: int, shutdown_timeout_s: float) -> None:
    """If the fms command dies without stopping the ranks (SIGKILL), rank 0 shuts the server down as on
    SIGTERM (which stops the followers); a follower still there long after that exits."""

    def watch():
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_S)
        if rank == 0:
            os.kill(os.getpid(), signal.SIGTERM)
            return
        time.sleep(shutdown_timeout_s + 30.0)
        os._exit(1)

    threading.Thread(target=watch, name="fms-tp-parent-watch", daemon=True).start()


class EventBroadcast:
    """Rank 0's AsyncEngine followers (fms.entrypoints.async_engine.EngineFollowers): each loop iteration's
    events go to the other ranks before the step, an empty list while idle at least every HEARTBEAT_S."""

    def __init__(self, channel: TensorParallel, heartbeat_s: float = HEARTBEAT_S):
        self.channel, self.heartbeat_s = channel, heartbeat_s
        self._last_sent = time.monotonic()
        self.num_broadcasts = 0

    def send(self, events: list[tuple], will_step: bool) -> None:
        now = time.monotonic()
        if events or will_step or now - self._last_sent >= self.heartbeat_s:
            self.channel.broadcast_object(events)
            self._last_sent = now
            self.num_broadcasts += 1

    def stop(self) -> None:
        try:
            self.channel.broadcast_object([("stop",)])
        except Exception:  # a follower is gone already; the launcher reports it
            logger.exception("could not tell the other tensor-parallel ranks to stop")


def apply_events(engine, events: list[tuple]) -> bool:
    """Apply rank 0's events to a follower's engine as rank 0's engine thread applied them; False after a stop.
    Finished requests are dropped at once, as rank 0 drops them once delivered."""
    for event in events:
        kind = event[0]
        if kind == "add":
            _, request_id, token_ids, params = event
            engine.add_request(token_ids, params, request_id=request_id)
            if engine.requests[request_id].is_finished:  # rejected on arrival, as on rank 0
                engine.pop_output(request_id)
        elif kind == "abort":
            request_id = event[1]
            if request_id in engine.requests:
                engine.abort(request_id)
                engine.pop_output(request_id)
        elif kind == "stop":
            return False
        else:
            raise ValueError(f"unknown tensor-parallel engine event {event!r}; expected add, abort or stop")
    return True


def step_follower(engine) -> None:
    """One engine step on a follower, as rank 0's engine thread runs it (a failed step is rolled back by the
    engine on every rank alike and the loop goes on); outputs are dropped once finished."""
    try:
        results = engine.step()
    except Exception as e:
        logger.warning("engine step failed: %s", e)
        return
    for request_id, _, finished in results:
        request = engine.requests.get(request_id)
        if request is not None and (finished or request.is_finished):
            engine.pop_output(request_id)


def follow(engine, channel: TensorParallel) -> int:
    """A follower rank's loop: rank 0's events, then the same step, until rank 0 says stop."""
    while apply_events(engine, channel.broadcast_object(None)):
        if engine.has_unfinished_requests():  # the same answer as on rank 0, which steps now too
            step_follower(engine)
    return 0
