"""The OpenAI-compatible HTTP server: FastAPI routes over one engine client, run by uvicorn. The client is an
AsyncEngine (the engine loop in a thread of this process) or an EngineProcessClient (the loop in an engine
process of its own, `fms serve`'s default: fms.entrypoints.engine_process); the routes use what both offer.

The two POST endpoints are plain ASGI (_PostRoutes, the outermost layer of the app): each request of a burst is
parsed on the one event loop before any is admitted, and FastAPI's routing, dependency solving and streaming
response were three quarters of that time on the CPU (0.48 against 0.13 ms a request,
final_project/results/session18/cpu/admit_probe.txt). The rest (GET routes, /docs, errors of other paths) is
FastAPI; the POST endpoints' schemas are added to its OpenAPI document.

    GET  /health, /v1/models, /metrics (Prometheus text)
    POST /v1/completions       prompt: text, token ids, or a list of either (one choice per prompt)
    POST /v1/chat/completions  messages rendered by the chat template

SIGTERM (or Ctrl-C): new requests are refused (503), those in flight finish (or are aborted after
--shutdown-timeout seconds), and the process exits 0. If the engine process dies, the requests in flight end
with an error, /health answers 503, and the server stops with exit status 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Union

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError

from fms.entrypoints.async_engine import (AsyncEngine, Delta, EngineFollowers, EngineOverloaded, EngineStopped,
                                          RequestStream)
from fms.entrypoints.chat import ChatTemplateError, render_chat, special_token_texts
from fms.entrypoints.heap import frozen_heap
from fms.entrypoints.metrics import CONTENT_TYPE, ServerMetrics
from fms.entrypoints.openai.protocol import ApiError, ChatCompletionRequest, CompletionRequest
from fms.runtime.sampler import TokenLogprobs
from fms.serving.engine import LLMEngine

logger = logging.getLogger(__name__)

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
RETRY_AFTER_S = 1
SWITCH_INTERVAL_S = 0.0005
SWITCH_INTERVAL_ENV = "FMS_GIL_SWITCH_INTERVAL_MS"  # overrides SWITCH_INTERVAL_S, to measure other values


@dataclass
class ServerState:
    """What the routes need: the engine client, the tokenizer, the served name and the chat template.
    async_engine: an AsyncEngine or an engine_process.EngineProcessClient (same surface: submit, num_pending,
    is_accepting, failure, stop_intake, start, shutdown, stats, vocab_size, max_model_len)."""

    async_engine: AsyncEngine
    tokenizer: object
    model_name: str
    chat_template: str | None = None
    metrics: ServerMetrics | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def engine(self) -> LLMEngine:
        """The engine itself, when it runs in this process (AsyncEngine); tests and Python users read it."""
        return self.async_engine.engine


def make_state(engine: LLMEngine, model_name: str, chat_template: str | None = None,
               max_waiting: int | None = None, followers: EngineFollowers | None = None,
               burst_wait_s: float = 0.0) -> ServerState:
    """The engine loop (not started) with metrics attached; followers: the other tensor-parallel ranks."""
    holder: dict = {}
    metrics = ServerMetrics(model_name, lambda: holder["engine"].stats)
    async_engine = AsyncEngine(engine, max_waiting=max_waiting, on_finish=metrics.on_finish, followers=followers,
                               burst_wait_s=burst_wait_s)
    holder["engine"] = async_engine
    return ServerState(async_engine, engine.tokenizer, model_name, chat_template, metrics)


def make_client_state(client, tokenizer, model_name: str, chat_template: str | None = None) -> ServerState:
    """The state for an engine client of another process (engine_process.EngineProcessClient, not started):
    metrics read its stats snapshot and record the finished requests it reports."""
    metrics = ServerMetrics(model_name, lambda: client.stats)
    client.on_finish = metrics.record
    return ServerState(client, tokenizer, model_name, chat_template, metrics)


# -- helpers ------------------------------------------------------------------------------------------
def _check_model(state: ServerState, name: str | None) -> None:
    if name is not None and name != state.model_name:
        raise ApiError(404, f"The model `{name}` does not exist; this server serves `{state.model_name}`", "model",
                       "not_found_error")


def _encode(state: ServerState, prompt: Union[str, list[int]], add_bos: bool | None = None) -> list[int]:
    vocab_size = state.async_engine.vocab_size
    if isinstance(prompt, str):
        if state.tokenizer is None:
            raise ApiError(400, "this server has no tokenizer: send token ids", "prompt")
        ids = state.tokenizer.encode(prompt, add_bos=add_bos)
    else:
        ids = prompt
    if not ids:
        raise ApiError(400, "the prompt is empty (no tokens)", "prompt")
    # in C (map, set, min, max), not a Python loop per id: this runs for every request on the event loop
    if set(map(type, ids)) != {int} or min(ids) < 0 or max(ids) >= vocab_size:
        bad = [t for t in ids if type(t) is not int or not 0 <= t < vocab_size]
        raise ApiError(400, f"prompt token ids must be ints in [0, {vocab_size}), got {bad[:5]}", "prompt")
    return list(ids)


def _max_tokens(state: ServerState, num_prompt: int, requested: int | None, default: int | None) -> int:
    max_len = state.async_engine.max_model_len
    room = max_len - num_prompt
    if room < 1:
        raise ApiError(400, f"This model's maximum context length is {max_len} tokens. However, your prompt has "
                            f"{num_prompt} tokens: shorten it", "prompt")
    if requested is None:
        return min(default, room) if default is not None else room
    if requested < 1:
        raise ApiError(400, f"max_tokens must be an int >= 1, got {requested}", "max_tokens")
    if num_prompt + requested > max_len:
        raise ApiError(400, f"This model's maximum context length is {max_len} tokens. However, you requested "
                            f"{num_prompt + requested} tokens ({num_prompt} in the prompt, {requested} for the "
                            "completion): lower max_tokens or shorten the prompt", "max_tokens")
    return requested


def _submit_all(state: ServerState, prompts: list[list[int]], params: list) -> list[RequestStream]:
    streams: list[RequestStream] = []
    try:
        for ids, p in zip(prompts, params):
            streams.append(state.async_engine.submit(ids, p))
    except EngineOverloaded as e:
        for s in streams:
            s.abort()
        raise ApiError(429, str(e), headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    except EngineStopped as e:
        for s in streams:
            s.abort()
        raise ApiError(503, str(e), headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    return streams


async def _merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, Delta | BaseException]]:
    """Deltas of several streams as they come, tagged with the stream's index."""
    if len(streams) == 1:
        try:
            async for delta in streams[0]:
                yield 0, delta
        except Exception as e:
            yield 0, e
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i, stream):
        try:
            async for delta in stream:
                await queue.put((i, delta))
        except Exception as e:
            await queue.put((i, e))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(streams)
    try:
        while remaining:
            i, delta = await queue.get()
            if isinstance(delta, BaseException) or delta.finished:
                remaining -= 1
            yield i, delta
    finally:
        for task in tasks:
            task.cancel()


def _finish_error(delta: Delta) -> ApiError | None:
    if delta.finish_reason == "rejected":
        return ApiError(400, delta.error or "the request can never fit this server", "max_tokens")
    if delta.finish_reason == "error":
        return ApiError(500, f"the request failed: {delta.error}", type_="server_error")
    if delta.finish_reason in ("abort", "aborted") and delta.error:
        return ApiError(503, delta.error)
    return None


def _finish_reason(reason: str | None) -> str | None:
    return {"aborted": "abort"}.get(reason, reason)


def _usage(num_prompt: int, num_completion: int) -> dict:
    return {"prompt_tokens": num_prompt, "completion_tokens": num_completion,
            "total_tokens": num_prompt + num_completion}


class _TokenText:
    """Token id -> its text for logprobs (cached: the same ids come back often)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, token_id: int) -> str:
        text = self.cache.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False) if self.tokenizer else str(token_id)
            self.cache[token_id] = text
        return text


def _completion_logprobs(token_ids: list[int], logprobs: list[TokenLogprobs], text_of, offset: int) -> dict:
    """The legacy completions shape: tokens, token_logprobs, top_logprobs (text -> logprob), text_offset."""
    tokens, token_logprobs, tops, offsets = [], [], [], []
    for token, lp in zip(token_ids, logprobs):
        text = text_of(token)
        tokens.append(text)
        token_logprobs.append(lp.logprob)
        top = {text_of(t): v for t, v in lp.top}
        top.setdefault(text, lp.logprob)  # the sampled token is always listed, as vLLM does
        tops.append(top)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}


def _chat_logprobs(token_ids: list[int], logprobs: list[TokenLogprobs], text_of) -> list[dict]:
    def entry(token, value):
        text = text_of(token)
        return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}

    return [{**entry(token, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
            for token, lp in zip(token_ids, logprobs)]


def _invalid_body(errors: list, skip: int = 0) -> ApiError:
    """A 400 naming the first bad field; skip: leading location parts to drop (FastAPI's "body")."""
    first = errors[0] if errors else {}
    param = ".".join(str(p) for p in first.get("loc", ())[skip:]) or None
    message = "; ".join(f"{'.'.join(str(p) for p in err.get('loc', ())[skip:]) or 'body'}: {err.get('msg')}"
                        for err in errors[:5])
    return ApiError(400, message or "invalid request body", param)


def _parse_body(body: bytes, model: type[BaseModel]) -> BaseModel:
    """The JSON body straight into the request model by pydantic-core (one pass over the bytes), rather than
    json.loads, then dict validation: this runs on the event loop for every request, and a burst of 128 spent
    ~0.7 ms each there on the H200's host (session 11's trace)."""
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        raise _invalid_body(e.errors()) from None


def _json_body(model: type[BaseModel]) -> dict:
    """The request body's schema for /docs, as FastAPI would have written it for a typed body parameter."""
    return {"requestBody": {"required": True,
                            "content": {"application/json": {"schema": model.model_json_schema()}}}}


_JSON_HEADERS = [(b"content-type", b"application/json")]
_SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]


async def _send_json(send, status: int, data: dict, headers: dict | None = None) -> None:
    body = json.dumps(data, ensure_ascii=False).encode()
    extra = [(k.lower().encode(), str(v).encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status,
                "headers": [*_JSON_HEADERS, (b"content-length", str(len(body)).encode()), *extra]})
    await send({"type": "http.response.body", "body": body})


class _PostRoutes:
    """The POST endpoints as plain ASGI in front of an app (FastAPI) that serves every other request.

    routes: path -> async function(body bytes) returning a JSON dict, or an async iterator of SSE strings; it
    raises ApiError for a client error. The request runs in a task that a watcher cancels when the client
    disconnects (receive() gives http.disconnect), so the route's `finally` blocks abort its engine requests.
    """

    def __init__(self, app, routes: dict):
        self.app, self.routes = app, routes

    async def __call__(self, scope, receive, send):
        route = self.routes.get(scope.get("path")) if scope["type"] == "http" else None
        if route is None:
            return await self.app(scope, receive, send)
        if scope["method"] != "POST":
            return await _send_json(send, 405, ApiError(405, f"{scope['method']} is not allowed here: use POST",
                                                        type_="invalid_request_error").body(), {"Allow": "POST"})
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        task = asyncio.ensure_future(self._respond(route, b"".join(chunks), send))
        watcher = asyncio.ensure_future(self._until_disconnect(receive))
        try:
            await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (task, watcher):
                t.cancel()
            # a cancelled request finishes its cleanup (its engine requests aborted) before this returns
            await asyncio.gather(task, watcher, return_exceptions=True)
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()  # an error while streaming: uvicorn logs it and closes the connection

    @staticmethod
    async def _until_disconnect(receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    @staticmethod
    async def _respond(route, body: bytes, send) -> None:
        try:
            result = await route(body)
        except ApiError as e:
            return await _send_json(send, e.status, e.body(), e.headers)
        except Exception:
            logger.exception("request failed")
            return await _send_json(send, 500, ApiError(500, "internal server error").body())
        if isinstance(result, dict):
            return await _send_json(send, 200, result)
        await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
        closed = False
        try:
            async for event in result:
                # [DONE] ends every stream: its write closes the body too (one write, not two)
                closed = event.endswith(_SSE_DONE)
                await send({"type": "http.response.body", "body": event.encode(), "more_body": not closed})
        finally:
            await result.aclose()  # its finally aborts the engine requests left when the client went away
        if not closed:
            await send({"type": "http.response.body", "body": b""})


_SSE_DONE = "data: [DONE]\n\n"


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


# -- the app ------------------------------------------------------------------------------------------
def build_app(state: ServerState) -> "_PostRoutes":
    """The ASGI app: the POST endpoints in front of a FastAPI app (`.app`) with everything else."""
    app = FastAPI(title="fms OpenAI-compatible server")
    app.state.fms = state
    text_of = _TokenText(state.tokenizer)
    chat_tokens = special_token_texts(state.tokenizer)  # the tokenizer is fixed: decoded once, not per request

    @app.exception_handler(ApiError)
    async def _api_error(_, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_, e: RequestValidationError):
        return JSONResponse(_invalid_body(e.errors(), skip=1).body(), status_code=400)

    @app.get("/health")
    async def health():
        failure = state.async_engine.failure
        if failure is not None:
            return JSONResponse({"status": "engine failed", "error": failure}, status_code=503)
        if not state.async_engine.is_accepting:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": state.model_name, "object": "model", "created": state.created, "owned_by": "fms",
            "root": state.model_name, "max_model_len": state.async_engine.max_model_len}]}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    async def completions(raw: bytes):
        body = _parse_body(raw, CompletionRequest)
        body.check_supported()
        _check_model(state, body.model)
        prompts = [_encode(state, p) for p in body.prompts()]
        params = [body.sampling_params(_max_tokens(state, len(p), body.max_tokens, DEFAULT_COMPLETION_MAX_TOKENS),
                                       body.logprobs) for p in prompts]
        streams = _submit_all(state, prompts, params)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        if body.stream:
            return _stream_completion(request_id, body, streams)
        return await _complete(request_id, body, streams, chat=False)

    async def chat_completions(raw: bytes):
        body = _parse_body(raw, ChatCompletionRequest)
        body.check_supported()
        _check_model(state, body.model)
        try:
            text = render_chat(state.chat_template, [m.as_template_dict() for m in body.messages],
                               add_generation_prompt=body.add_generation_prompt, **chat_tokens,
                               **(body.chat_template_kwargs or {}))
        except ChatTemplateError as e:
            raise ApiError(400, str(e), "messages") from None
        prompt = _encode(state, text, add_bos=False)  # the template places BOS itself
        params = body.sampling_params(_max_tokens(state, len(prompt), body.requested_max_tokens, None),
                                      body.requested_logprobs)
        streams = _submit_all(state, [prompt], [params])
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        if body.stream:
            return _stream_chat(request_id, body, streams[0])
        return await _complete(request_id, body, streams, chat=True)

    async def _complete(request_id: str, body, streams: list[RequestStream], chat: bool):
        texts = [""] * len(streams)
        token_ids: list[list[int]] = [[] for _ in streams]
        logprobs: list[list[TokenLogprobs]] = [[] for _ in streams]
        last: list[Delta | None] = [None] * len(streams)
        try:
            async for i, delta in _merge(streams):
                if isinstance(delta, BaseException):
                    raise ApiError(400, str(delta))
                texts[i] += delta.text
                token_ids[i] += delta.token_ids
                if delta.logprobs:
                    logprobs[i] += delta.logprobs
                last[i] = delta
                if delta.finished:
                    error = _finish_error(delta)
                    if error is not None:
                        raise error
        finally:
            for s in streams:
                s.abort()  # no-op for finished ones; frees the rest when this handler is cancelled
        usage = _usage(sum(d.num_prompt_tokens for d in last), sum(d.num_output_tokens for d in last))
        created = int(time.time())
        if chat:
            d = last[0]
            choice = {"index": 0, "message": {"role": "assistant", "content": texts[0]},
                      "logprobs": {"content": _chat_logprobs(token_ids[0], logprobs[0], text_of)}
                      if body.logprobs else None,
                      "finish_reason": _finish_reason(d.finish_reason), "stop_reason": d.stop_reason}
            return {"id": request_id, "object": "chat.completion", "created": created, "model": state.model_name,
                    "choices": [choice], "usage": usage}
        choices = []
        for i, d in enumerate(last):
            lp = _completion_logprobs(token_ids[i], logprobs[i], text_of, 0) if body.logprobs is not None else None
            choices.append({"index": i, "text": texts[i], "logprobs": lp,
                            "finish_reason": _finish_reason(d.finish_reason), "stop_reason": d.stop_reason})
        return {"id": request_id, "object": "text_completion", "created": created, "model": state.model_name,
                "choices": choices, "usage": usage}

    async def _stream_completion(request_id: str, body: CompletionRequest, streams: list[RequestStream]):
        created = int(time.time())
        offsets = [0] * len(streams)
        num_prompt, num_out = [s.num_prompt_tokens for s in streams], [0] * len(streams)
        unfinished = len(streams)
        tail = ""  # the last stream's finishing chunk goes out with the usage and [DONE]: one write, not three
        try:
            async for i, delta in _merge(streams):
                if isinstance(delta, BaseException):
                    yield _sse(ApiError(400, str(delta)).body())
                    break
                unfinished -= delta.finished
                if delta.finished and _finish_error(delta) is not None:
                    yield _sse(_finish_error(delta).body())
                    continue
                num_out[i] = delta.num_output_tokens
                if not (delta.text or delta.token_ids or delta.finished):
                    continue
                lp = None
                if body.logprobs is not None and delta.logprobs:
                    lp = _completion_logprobs(delta.token_ids, delta.logprobs, text_of, offsets[i])
                offsets[i] += len(delta.text)
                chunk = {"id": request_id, "object": "text_completion", "created": created,
                         "model": state.model_name,
                         "choices": [{"index": i, "text": delta.text, "logprobs": lp,
                                      "finish_reason": _finish_reason(delta.finish_reason) if delta.finished else None,
                                      "stop_reason": delta.stop_reason}]}
                if body.include_usage:
                    chunk["usage"] = None
                if unfinished:
                    yield _sse(chunk)
                else:
                    tail = _sse(chunk)
            if body.include_usage:
                tail += _sse({"id": request_id, "object": "text_completion", "created": created,
                              "model": state.model_name, "choices": [],
                              "usage": _usage(sum(num_prompt), sum(num_out))})
            yield tail + _SSE_DONE
        finally:
            for s in streams:
                s.abort()  # the client went away mid-stream: free its pages

    async def _stream_chat(request_id: str, body: ChatCompletionRequest, stream: RequestStream):
        created = int(time.time())
        num_out = 0
        tail = ""

        def chunk(delta: dict, finish_reason=None, logprobs=None, stop_reason=None):
            data = {"id": request_id, "object": "chat.completion.chunk", "created": created,
                    "model": state.model_name,
                    "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason,
                                 **({"stop_reason": stop_reason} if finish_reason else {})}]}
            if body.include_usage:
                data["usage"] = None
            return _sse(data)

        try:
            yield chunk({"role": "assistant", "content": ""})
            async for _, delta in _merge([stream]):
                if isinstance(delta, BaseException):
                    yield _sse(ApiError(400, str(delta)).body())
                    break
                if delta.finished and _finish_error(delta) is not None:
                    yield _sse(_finish_error(delta).body())
                    break
                num_out = delta.num_output_tokens
                if not (delta.text or delta.token_ids or delta.finished):
                    continue
                lp = None
                if body.logprobs and delta.logprobs:
                    lp = {"content": _chat_logprobs(delta.token_ids, delta.logprobs, text_of)}
                content = {"content": delta.text} if delta.text or not delta.finished else {}
                event = chunk(content, _finish_reason(delta.finish_reason) if delta.finished else None, lp,
                              delta.stop_reason)
                if not delta.finished:
                    yield event
                else:  # the finishing chunk goes out with the usage and [DONE]: one write, not three
                    tail = event
            if body.include_usage:
                tail += _sse({"id": request_id, "object": "chat.completion.chunk", "created": created,
                              "model": state.model_name, "choices": [],
                              "usage": _usage(stream.num_prompt_tokens, num_out)})
            yield tail + _SSE_DONE
        finally:
            stream.abort()

    posts = {"/v1/completions": (completions, CompletionRequest, "Completions"),
             "/v1/chat/completions": (chat_completions, ChatCompletionRequest, "Chat Completions")}

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for path, (_, model, summary) in posts.items():
                schema["paths"][path] = {"post": {"summary": summary, **_json_body(model), "responses": {
                    "200": {"description": "a JSON response, or server-sent events with stream=true"}}}}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    return _PostRoutes(app, {path: route for path, (route, _, _) in posts.items()})


# -- running it ---------------------------------------------------------------------------------------
def create_server(state: ServerState, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
                  shutdown_timeout_s: float = 30.0):
    """A uvicorn server for the app whose exit (SIGTERM, Ctrl-C, should_exit) first stops the engine's intake;
    it also exits once the engine has failed (its process died)."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            state.async_engine.stop_intake()
            super().handle_exit(sig, frame)

        async def on_tick(self, counter: int) -> bool:
            if state.async_engine.failure is not None:
                return True
            return await super().on_tick(counter)

        @contextlib.contextmanager
        def capture_signals(self):
            # uvicorn re-raises a captured SIGTERM once it has shut down, which ends the process with
            # status -15; a drained shutdown is a success here, so the signals only start it (exit 0)
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    config = uvicorn.Config(build_app(state), host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=max(1, int(shutdown_timeout_s)), lifespan="off")
    return Server(config)


def switch_interval_s() -> float:
    """The GIL switch interval fms serve sets: SWITCH_INTERVAL_S, or $FMS_GIL_SWITCH_INTERVAL_MS (in ms, > 0).
    On the CPU, where the engine thread is busy in Python and torch's dispatcher rather than waiting for a
    GPU, 5 ms (Python's default) cost the engine thread less CPU than 0.5 ms in our runs (within the noise
    of a shared 2-core machine); the variable lets the H200 run compare them."""
    value = os.environ.get(SWITCH_INTERVAL_ENV)
    if value is None or value == "":
        return SWITCH_INTERVAL_S
    try:
        ms = float(value)
    except ValueError:
        ms = float("nan")
    if not ms > 0 or ms == float("inf"):
        raise ValueError(f"{SWITCH_INTERVAL_ENV} must be a number of milliseconds > 0, got {value!r}")
    return ms / 1000.0


def check_port_free(host: str, port: int) -> None:
    """Before the model loads (in another process): the address the server will listen on can be bound (as
    uvicorn binds it); ValueError naming the address otherwise."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ValueError(f"--host {host!r} is not an address of this machine ({e})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            raise ValueError(f"cannot listen on {host}:{port}: {e.strerror}; choose another --port") from None


def run_server(state: ServerState, host: str, port: int, log_level: str = "info",
               shutdown_timeout_s: float = 30.0) -> int:
    """Serve until SIGTERM / Ctrl-C; in-flight requests finish (up to shutdown_timeout_s); returns 0, or 1 when
    the server stopped because the engine failed (its process died)."""
    server = create_server(state, host, port, log_level, shutdown_timeout_s)
    # The engine thread gives up the GIL while it waits for the GPU; when that wait ends it must get the
    # GIL back from the event loop (HTTP, JSON, detokenizing) quickly, not after Python's default 5 ms.
    sys.setswitchinterval(switch_interval_s())
    state.async_engine.start()
    try:
        with frozen_heap():  # the app, tokenizer (and the engine, in this process) live while it serves
            server.run()
    finally:
        state.async_engine.shutdown(timeout_s=shutdown_timeout_s)
    failure = state.async_engine.failure
    if failure is not None:
        logger.error("server stopped: %s", failure)
        return 1
    logger.info("server stopped")
    return 0
