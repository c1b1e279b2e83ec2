"""The engine in a process of its own (as vLLM's EngineCore), so that the engine loop and the HTTP work no longer
share one GIL: `fms serve`'s HTTP process keeps the routes, tokenizing, detokenizing and SSE; the engine process
builds the model and runs AsyncEngine's loop (the only process that touches CUDA).

    HTTP process                                       engine process (spawned)
    EngineProcessClient.launch(args)  -- spawn ---->   build_engine(args)
        waits for  <------------------------------     ("ready", info)  or  ("error", ...) and exit 1
    submit() -> RequestStream, abort()
        one message per event-loop turn ---------->    main thread: AsyncEngine.add / abort
        ("requests", [("add", id, ids, params), ("abort", id), ...])
    reader thread  <-- one message per step -------    AsyncEngine thread: step, then _PipeSink.publish:
        ("step", deltas, stats, finished, n_received, n_pending)
        call_soon_threadsafe(the step's deltas, one call per event loop)
    shutdown()  -- ("stop", timeout_s) ----------->    AsyncEngine.shutdown; ("stopped",); exit 0

Deltas travel as plain tuples (token ids, text where the engine built it for stop strings, logprobs, finish
information); text the engine did not build is decoded by the RequestStream in the HTTP process. If the engine
process dies, the reader sees the pipe close: every request in flight ends with an error and `failure` says why
(the server then answers /health with 503 and exits 1). The engine process ignores SIGINT and SIGTERM (the HTTP
process drains and then stops it) and exits by itself when the HTTP process is gone.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import os
import signal
import threading
import time
import traceback
from typing import Hashable

from fms.entrypoints.async_engine import AsyncEngine, Delta, EngineOverloaded, EngineStopped, RequestStream, post_deltas
from fms.entrypoints.heap import freeze_startup_heap
from fms.entrypoints.metrics import FinishedRequest
from fms.runtime.sampler import TokenLogprobs
from fms.serving.detokenizer import INITIAL_CONTEXT_TOKENS
from fms.serving.request import SamplingParams

logger = logging.getLogger(__name__)

PARENT_POLL_S = 1.0  # how often the engine process checks that the HTTP process is alive
READY_POLL_S = 0.2
STOP_GRACE_S = 10.0  # after the engine's own drain: how long it gets to exit before it is terminated
USER_ERRORS = (ValueError, FileNotFoundError)  # reported as `error: ...` with exit status 2, as without the process


class EngineProcessError(RuntimeError):
    """The engine process failed to start (or died while starting); the message says how."""


class StartInterrupted(Exception):
    """SIGINT / SIGTERM arrived while the engine process was starting; it was stopped."""

    def __init__(self, signum: int):
        super().__init__(f"signal {signum}")
        self.signum = signum


# -- wire format: plain tuples, cheap to pickle ----------------------------------------------------------------
def _encode(request_id: Hashable, delta: Delta | Exception) -> tuple:
    if isinstance(delta, Exception):
        return (request_id, f"{type(delta).__name__}: {delta}")
    logprobs = None if delta.logprobs is None else [tuple(lp) for lp in delta.logprobs]
    if not delta.finished:
        return (request_id, delta.token_ids, delta.text, logprobs, delta.num_output_tokens)
    return (request_id, delta.token_ids, delta.text, logprobs, delta.num_output_tokens, delta.finish_reason,
            delta.stop_reason, delta.error, delta.num_prompt_tokens)


def _decode(item: tuple, num_prompt_tokens: int) -> Delta | Exception:
    if len(item) == 2:
        return RuntimeError(item[1])
    logprobs = None if item[3] is None else [TokenLogprobs(*lp) for lp in item[3]]
    if len(item) == 5:
        return Delta(item[1], item[2], logprobs, num_prompt_tokens=num_prompt_tokens, num_output_tokens=item[4])
    return Delta(item[1], item[2], logprobs, finished=True, finish_reason=item[5], stop_reason=item[6],
                 error=item[7], num_prompt_tokens=item[8], num_output_tokens=item[4])


# -- the engine process ----------------------------------------------------------------------------------------
class _PipeSink:
    """AsyncEngine's sink in the engine process: one message per step to the HTTP process."""

    def __init__(self, conn, lock: threading.Lock):
        self.conn, self.lock = conn, lock
        self.finished: list[tuple] = []  # FinishedRequest tuples since the last message
        self.num_received = 0  # adds the main thread handed to the engine loop
        self.async_engine: AsyncEngine | None = None

    def on_finish(self, output) -> None:
        self.finished.append(tuple(FinishedRequest.of(output)))

    def publish(self, deltas, stats) -> None:
        finished, self.finished = self.finished, []
        message = ("step", [_encode(request_id, delta) for request_id, delta in deltas], stats, finished,
                   self.num_received, self.async_engine.num_pending)
        with self.lock:
            self.conn.send(message)


def _watch_parent(parent_pid: int) -> None:
    """If the HTTP process dies (even SIGKILL, even while the model loads), the engine process leaves too."""

    def watch():
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="fms-engine-parent-watch", daemon=True).start()


def run_engine_process(args, conn, parent_pid: int) -> None:
    """The engine process's main: build the engine from the parsed `fms serve` arguments, report ready (or the
    error), then apply the HTTP process's requests until it says stop or goes away."""
    from fms.entrypoints.commands import LOG_FORMAT
    from fms.entrypoints.engine_args import build_engine

    for signum in (signal.SIGINT, signal.SIGTERM):  # the HTTP process drains first, then stops this one
        signal.signal(signum, signal.SIG_IGN)
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT)
    _watch_parent(parent_pid)
    lock = threading.Lock()
    try:
        engine, loaded = build_engine(args)
    except BaseException as e:  # noqa: BLE001  (reported to the HTTP process, which reports it to the user)
        with lock:
            conn.send(("error", isinstance(e, USER_ERRORS), f"{type(e).__name__}: {e}" if not isinstance(
                e, USER_ERRORS) else str(e), traceback.format_exc()))
        conn.close()
        os._exit(1)
    sink = _PipeSink(conn, lock)
    async_engine = AsyncEngine(engine, on_finish=sink.on_finish, sink=sink,
                               burst_wait_s=args.burst_wait_ms / 1e3)
    sink.async_engine = async_engine
    info = {"vocab_size": engine.model.config.vocab_size, "max_model_len": engine.max_model_len,
            "name": loaded.name, "random_weights": loaded.checkpoint is None, "pid": os.getpid(),
            "stats": async_engine.stats}
    freeze_startup_heap()  # the engine, model and graphs stay until exit: out of the collector's full scans
    with lock:
        conn.send(("ready", info))
    async_engine.start()
    trace = engine.trace  # FMS_STEP_TRACE: when each message of adds came off the pipe
    timeout_s = 0.0
    try:
        while True:
            if not conn.poll(0.5):
                if not async_engine._thread.is_alive():  # the loop died of an unexpected error (logged)
                    os._exit(1)
                continue
            message = conn.recv()
            if message[0] == "stop":
                timeout_s = message[1]
                break
            if trace is not None:
                trace.recv(time.perf_counter(), sum(event[0] == "add" for event in message[1]))
            for event in message[1]:
                if event[0] == "add":
                    sink.num_received += 1
                    async_engine.add(event[1], event[2], event[3])
                else:
                    async_engine.abort(event[1])
    except (EOFError, OSError):
        logger.warning("the HTTP process went away; stopping the engine")
    async_engine.shutdown(timeout_s=timeout_s)
    try:
        with lock:
            conn.send(("stopped",))
        conn.close()
    except OSError:
        pass


# -- the HTTP process ------------------------------------------------------------------------------------------
class _signals_interrupt:
    """While the engine process starts: SIGINT / SIGTERM raise StartInterrupted here (main thread only)."""

    def __enter__(self):
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self._raise)
        return self

    @staticmethod
    def _raise(signum, frame):
        raise StartInterrupted(signum)

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


class EngineProcessClient:
    """The HTTP process's side of the engine process, with AsyncEngine's client surface (submit, abort,
    num_pending, is_accepting, failure, stop_intake, start, shutdown, stats, vocab_size, max_model_len).

    max_waiting: most requests queued but not yet running (None: no bound); counted here as the engine's last
    report plus what was sent since. on_finish(FinishedRequest): called on the reader thread (metrics)."""

    def __init__(self, process, conn, info: dict, max_waiting: int | None = None, on_finish=None):
        if max_waiting is not None and max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0 or None, got {max_waiting}")
        self.process, self.conn, self.info = process, conn, info
        self.max_waiting = max_waiting
        self.on_finish = on_finish
        self.tokenizer = None  # set by the caller: the HTTP process loads its own (RequestStream decodes with it)
        self._engine_stats = dict(info["stats"])
        self._lock = threading.Lock()  # _streams, _failure
        self._streams: dict[int, tuple[RequestStream, asyncio.AbstractEventLoop]] = {}
        self._ids = itertools.count()
        self._num_sent = 0
        self._engine_num_received = 0
        self._engine_num_pending = 0
        self._outgoing: list[tuple] = []
        self._outgoing_scheduled = False
        self._out_lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._accepting = True
        self._failure: str | None = None
        self._stopped = False  # the engine process said it stopped
        self._reader: threading.Thread | None = None
        self._is_shut_down = False

    @classmethod
    def launch(cls, args, max_waiting: int | None = None) -> "EngineProcessClient":
        """Spawn the engine process for the parsed `fms serve` arguments and wait until it is ready. Raises
        ValueError for a bad model (as loading it here would), EngineProcessError for any other start-up failure,
        StartInterrupted on SIGINT / SIGTERM; the process is gone in every one of those cases."""
        ctx = multiprocessing.get_context("spawn")  # CUDA is initialized in the engine process only
        conn, child_conn = ctx.Pipe()
        process = ctx.Process(target=run_engine_process, args=(args, child_conn, os.getpid()), name="fms-engine")
        try:
            with _signals_interrupt():
                process.start()
                child_conn.close()  # so that the engine process's death closes the pipe here
                message = cls._wait_ready(process, conn)
        except BaseException:
            conn.close()
            _reap(process, grace_s=0.0)
            raise
        return cls(process, conn, message[1], max_waiting)

    @staticmethod
    def _wait_ready(process, conn) -> tuple:
        while True:
            if conn.poll(READY_POLL_S):
                try:
                    message = conn.recv()
                except (EOFError, OSError):
                    message = None
                if message is not None and message[0] == "ready":
                    return message
                process.join(timeout=5.0)
                if message is None:
                    raise EngineProcessError(f"the engine process exited with code {process.exitcode} before it "
                                             "was ready (killed by a signal, or out of memory?)")
                _, is_user_error, text, details = message
                if is_user_error:
                    raise ValueError(text)
                raise EngineProcessError(f"the engine process failed while starting: {text}\n{details}")
            if not process.is_alive() and not conn.poll(0):
                raise EngineProcessError(f"the engine process exited with code {process.exitcode} before it was "
                                         "ready (killed by a signal, or out of memory?)")

    # -- what the routes use ------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.info["vocab_size"]

    @property
    def max_model_len(self) -> int:
        return self.info["max_model_len"]

    @property
    def pid(self) -> int:
        return self.info["pid"]

    @property
    def num_pending(self) -> int:
        return max(0, self._num_sent - self._engine_num_received) + self._engine_num_pending

    @property
    def stats(self) -> dict:
        """The engine's last statistics snapshot (it sends one when they change, at most every 50 ms)."""
        return {**self._engine_stats, "num_pending_requests": self.num_pending}

    @property
    def is_accepting(self) -> bool:
        return self._accepting and self._failure is None

    @property
    def failure(self) -> str | None:
        """Why the engine can no longer serve (its process died), or None."""
        return self._failure

    def submit(self, prompt_token_ids: list[int], params: SamplingParams) -> RequestStream:
        """Queue a prompt (already tokenized and checked); raises EngineOverloaded / EngineStopped."""
        if self._failure is not None:
            raise EngineStopped(f"the engine has failed: {self._failure}")
        if not self._accepting:
            raise EngineStopped("the server is shutting down and takes no new requests")
        num_pending = self.num_pending
        if self.max_waiting is not None and num_pending >= self.max_waiting:
            raise EngineOverloaded(f"{num_pending} requests are already waiting (--max-waiting "
                                   f"{self.max_waiting}); retry later")
        request_id = next(self._ids)
        stream = RequestStream(request_id, len(prompt_token_ids), self, prompt_token_ids[-INITIAL_CONTEXT_TOKENS:])
        with self._lock:
            if self._failure is not None:
                raise EngineStopped(f"the engine has failed: {self._failure}")
            self._streams[request_id] = (stream, asyncio.get_running_loop())
        self._num_sent += 1
        self._send_soon(("add", request_id, prompt_token_ids, params))
        return stream

    def abort(self, request_id: Hashable) -> None:
        """A RequestStream's client went away: the engine aborts the request and frees its pages."""
        with self._lock:
            known = self._streams.pop(request_id, None) is not None
        if known:
            self._send_soon(("abort", request_id))

    # -- sending ------------------------------------------------------------------------------------------------
    def _send_soon(self, event: tuple) -> None:
        """Adds and aborts of one event-loop turn go out as one message, sent once the turn's handlers ran. A burst of
        requests is parsed in one turn (every connection's data arrives together), so the engine gets the burst whole
        and prefills it in full steps. Sending each add at once was tried (session 11, H200, 128 requests at t=0):
        the engine then started on the first few and ran many small mixed steps while the rest were parsed, and the
        last first token came 36 ms later (190 against 154 ms), the server at 0.846 and 0.880 of the offline engine
        against 0.942 (final_project/results/session11/{b,e})."""
        with self._out_lock:
            self._outgoing.append(event)
            if self._outgoing_scheduled:
                return
            self._outgoing_scheduled = True
        try:
            asyncio.get_running_loop().call_soon(self._send_outgoing)
        except RuntimeError:  # not on an event loop: now
            self._send_outgoing()

    def _send_outgoing(self) -> None:
        with self._out_lock:
            events, self._outgoing, self._outgoing_scheduled = self._outgoing, [], False
        if events:
            self._send(("requests", events))

    def _send(self, message: tuple) -> None:
        try:
            with self._send_lock:
                self.conn.send(message)
        except (OSError, ValueError):  # the engine process is gone; the reader reports it
            logger.debug("could not send to the engine process", exc_info=True)

    # -- receiving (reader thread) -------------------------------------------------------------------------------
    def _read(self) -> None:
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                break
            if message[0] == "step":
                self._dispatch(message)
            elif message[0] == "stopped":
                self._stopped = True
        if not self._stopped:
            self.process.join(timeout=2.0)
            code = self.process.exitcode
            self._fail(f"the engine process (pid {self.pid}) exited unexpectedly"
                       + (f" with code {code}" if code is not None else "")
                       + (" (killed by a signal, or out of memory?)" if code is None or code < 0 else ""))

    def _dispatch(self, message: tuple) -> None:
        _, deltas, stats, finished, num_received, num_pending = message
        if stats is not None:
            self._engine_stats = stats
        items = []
        with self._lock:
            for item in deltas:
                entry = self._streams.get(item[0])
                if entry is None:  # its client went away
                    continue
                stream, loop = entry
                delta = _decode(item, stream.num_prompt_tokens)
                if isinstance(delta, Exception) or delta.finished:
                    del self._streams[item[0]]
                items.append((stream, loop, delta))
        self._engine_num_received, self._engine_num_pending = num_received, num_pending
        post_deltas(items)
        if self.on_finish is not None:
            for record in finished:
                self.on_finish(FinishedRequest(*record))

    def _fail(self, reason: str) -> None:
        """The engine process is gone: every request in flight ends with an error; no new ones are taken."""
        with self._lock:
            self._failure = reason
            streams, self._streams = list(self._streams.values()), {}
        self._accepting = False
        logger.error("%s; %d request(s) in flight end with an error", reason, len(streams))
        post_deltas((stream, loop, Delta([], None, finished=True, finish_reason="error", error=reason,
                                         num_prompt_tokens=stream.num_prompt_tokens)) for stream, loop in streams)

    # -- lifecycle ----------------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._reader is not None:
            raise RuntimeError("the engine process's reader is already running")
        self._reader = threading.Thread(target=self._read, name="fms-engine-reader", daemon=True)
        self._reader.start()

    def stop_intake(self) -> None:
        """Refuse new requests from now on; the ones in flight keep running."""
        self._accepting = False

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stop intake, let in-flight requests finish for up to timeout_s, then stop the engine process (it
        aborts what is left) and reap it: terminated, then killed, if it does not exit in time. Idempotent."""
        if self._is_shut_down:
            return
        self._is_shut_down = True
        self.stop_intake()
        deadline = time.monotonic() + timeout_s
        while self._streams and self._failure is None and self._reader is not None and self._reader.is_alive():
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)
        if self.process.is_alive():
            self._send_outgoing()
            self._send(("stop", max(0.0, deadline - time.monotonic())))
        _reap(self.process, grace_s=max(0.0, deadline - time.monotonic()) + STOP_GRACE_S)
        if self._reader is not None:
            self._reader.join(timeout=5.0)
        self.conn.close()


def _reap(process, grace_s: float) -> None:
    """Wait up to grace_s for the process to exit, then terminate it, then kill it: it never outlives us."""
    if process.pid is None:  # never started
        return
    process.join(timeout=grace_s)
    if process.is_alive():
        if grace_s > 0:
            logger.warning("the engine process (pid %d) did not exit in %.0f s; terminating it", process.pid, grace_s)
        process.terminate()  # SIGTERM is ignored there once it runs; SIGKILL next
        process.join(timeout=2.0)
    if process.is_alive():
        process.kill()
        process.join(timeout=5.0)


def start_server_state(args, chat_template: str | None = None):
    """Start the engine process for the parsed `fms serve` arguments (its start-up phases show as it loads) and
    build the HTTP process's ServerState over it: the tokenizer and chat template load here, the model does
    not. The client is not started (run_server starts it). Raises as EngineProcessClient.launch does."""
    from fms.entrypoints.chat import load_chat_template
    from fms.entrypoints.model_loading import load_tokenizer, resolve_model_once
    from fms.entrypoints.openai.server import make_client_state

    resolve_model_once(args)  # a hub id is fetched once, here; the engine process gets the folder
    client = EngineProcessClient.launch(args, args.max_waiting)
    try:
        info = client.info
        tokenizer, tokenizer_folder = load_tokenizer(args.model, args.tokenizer, info["vocab_size"])
        client.tokenizer = tokenizer
        if chat_template is None:
            chat_template = load_chat_template(None, tokenizer_folder)
        return make_client_state(client, tokenizer, args.served_model_name or info["name"], chat_template)
    except BaseException:
        client.shutdown(timeout_s=0.0)
        raise


def serve_with_engine_process(args, chat_template: str | None) -> int:
    """`fms serve` with the engine in a process of its own: serve until SIGTERM / Ctrl-C (0), or until the
    engine process dies (1); the engine process is reaped on every way out."""
    from fms.entrypoints.openai.server import check_port_free, run_server

    check_port_free(args.host, args.port)
    try:
        state = start_server_state(args, chat_template)
    except StartInterrupted as e:
        print(f"stopped by signal {e.signum} while the engine process was starting", flush=True)
        return 128 + e.signum
    client = state.async_engine
    try:
        if client.info["random_weights"]:
            logging.getLogger("fms").warning("%s has random weights: the text will be gibberish", client.info["name"])
        print(f"serving {state.model_name} on http://{args.host}:{args.port} (OpenAI API under /v1); "
              f"engine process pid {client.pid}", flush=True)
        return run_server(state, args.host, args.port, args.log_level, args.shutdown_timeout)
    finally:
        client.shutdown(timeout_s=0.0)  # run_server shut it down already, unless something failed before
