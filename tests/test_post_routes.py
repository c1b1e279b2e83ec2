"""The POST endpoints as plain ASGI (fms.entrypoints.openai.server._PostRoutes), driven without a socket by an ASGI
receive/send pair over a stub engine client: a body in several chunks, a client gone before or during the
response (its engine requests aborted), 405 and 500 in OpenAI's error shape, and other paths left to FastAPI."""

import asyncio
import json

import pytest

pytest.importorskip("fastapi")

from fms.entrypoints.async_engine import Delta, RequestStream  # noqa: E402
from fms.entrypoints.openai.server import build_app, make_client_state  # noqa: E402
from fms.utils.tokenizers import get_tokenizer  # noqa: E402


class StubEngine:
    """Accepts every request; a test pushes deltas into its streams. Records aborts."""

    tokenizer = None
    vocab_size = 1000
    max_model_len = 256
    is_accepting = True
    failure = None
    stats = {}

    def __init__(self, fail=None):
        self.streams, self.aborted, self.fail = [], [], fail

    def submit(self, ids, params):
        if self.fail is not None:
            raise self.fail
        stream = RequestStream(len(self.streams), len(ids), self)
        self.streams.append(stream)
        return stream

    def abort(self, request_id):
        self.aborted.append(request_id)


def _scope(path="/v1/completions", method="POST"):
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
            "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
            "headers": [(b"content-type", b"application/json")], "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 8000)}


class Conversation:
    """One request: the body in the given chunks, then (if disconnect_after is set) a disconnect once that many
    response messages went out; sent messages are kept."""

    def __init__(self, chunks, disconnect_after=None):
        self.inbox = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
                      for i, c in enumerate(chunks)]
        self.sent, self.disconnect_after, self.gone = [], disconnect_after, asyncio.Event()

    async def receive(self):
        if self.inbox:
            return self.inbox.pop(0)
        await self.gone.wait()  # nothing more from the client until it goes away
        return {"type": "http.disconnect"}

    async def send(self, message):
        self.sent.append(message)
        if self.disconnect_after is not None and len(self.sent) >= self.disconnect_after:
            self.gone.set()

    @property
    def status(self):
        return self.sent[0]["status"]

    def body(self):
        return b"".join(m.get("body", b"") for m in self.sent[1:])


def _run(app, conversation, scope=None, engine=None, deltas=()):
    """Serve one request; push deltas into the first stream once it exists."""
    async def main():
        task = asyncio.ensure_future(app(scope or _scope(), conversation.receive, conversation.send))
        for delta in deltas:
            for _ in range(200):  # bounded: the request reaches the engine within a few loop turns
                if engine.streams:
                    break
                await asyncio.sleep(0.001)
            engine.streams[0]._queue.put_nowait(delta)
        await asyncio.wait_for(task, timeout=10)

    asyncio.run(main())


def _app(engine):
    return build_app(make_client_state(engine, None, "m"))


def test_a_body_in_chunks_is_read_whole_and_answered_as_json():
    engine = StubEngine()
    body = json.dumps({"model": "m", "prompt": [5, 6, 7], "max_tokens": 2}).encode()
    talk = Conversation([body[:7], body[7:20], body[20:]])
    _run(_app(engine), talk, engine=engine,
         deltas=[Delta([11], None), Delta([12], None, finished=True, finish_reason="length", num_prompt_tokens=3,
                                           num_output_tokens=2)])
    assert talk.status == 200 and (b"content-type", b"application/json") in talk.sent[0]["headers"]
    answer = json.loads(talk.body())
    assert answer["object"] == "text_completion" and answer["choices"][0]["finish_reason"] == "length"
    assert answer["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


def test_streaming_sends_events_and_a_client_gone_mid_stream_aborts_its_request():
    engine = StubEngine()
    body = json.dumps({"model": "m", "prompt": [5, 6, 7], "max_tokens": 50, "stream": True}).encode()
    talk = Conversation([body], disconnect_after=3)  # the start, two events, then the client goes away
    _run(_app(engine), talk, engine=engine, deltas=[Delta([11], None), Delta([12], None)])
    assert talk.status == 200 and talk.sent[0]["headers"][0] == (b"content-type", b"text/event-stream; charset=utf-8")
    events = [line for line in talk.body().decode().split("\n\n") if line]
    assert len(events) == 2 and all(e.startswith("data: {") for e in events)
    assert engine.aborted == [0]  # the engine request was given up, its pages freed


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": [5, 6, 7]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
])
def test_a_stream_ends_in_one_write_holding_the_last_chunk_the_usage_and_done(path, body):
    """Each delta goes out as it comes; the finishing one, the usage and [DONE] go in one write that closes the body
    (three fewer writes per request than one per event plus an empty close)."""
    engine = StubEngine()
    request = json.dumps({"model": "m", **body, "max_tokens": 3, "stream": True,
                          "stream_options": {"include_usage": True}}).encode()
    talk = Conversation([request])
    tokenizer = get_tokenizer(None) if "chat" in path else None  # chat encodes its rendered text
    _run(build_app(make_client_state(engine, tokenizer, "m", chat_template="{{ messages[0].content }}")), talk,
         scope=_scope(path), engine=engine,
         deltas=[Delta([11], "a"), Delta([12], "b"),
                 Delta([13], "c", finished=True, finish_reason="length", num_prompt_tokens=3, num_output_tokens=3)])
    writes = talk.sent[1:]
    assert [w["more_body"] for w in writes[:-1]] == [True] * (len(writes) - 1) and not writes[-1].get("more_body")
    last = [json.loads(e[6:]) if e != "data: [DONE]" else e for e in writes[-1]["body"].decode().split("\n\n") if e]
    assert last[0]["choices"][0]["finish_reason"] == "length" and last[1]["usage"]["completion_tokens"] == 3
    assert last[2] == "data: [DONE]" and len(last) == 3
    texts = [json.loads(w["body"].decode()[6:])["choices"][0] for w in writes[:-1]]
    key = "delta" if "chat" in path else "text"
    got = [c[key].get("content") if "chat" in path else c[key] for c in texts]
    assert got[-2:] == ["a", "b"]  # the deltas before the last, one write each, as they came
    assert (last[0]["choices"][0]["delta"]["content"] if "chat" in path else last[0]["choices"][0]["text"]) == "c"


def test_a_client_gone_before_its_body_ends_gets_nothing_and_submits_nothing():
    engine = StubEngine()
    talk = Conversation([b'{"model": "m", "prompt": [5'])
    talk.inbox[0]["more_body"] = True
    talk.gone.set()
    _run(_app(engine), talk)
    assert talk.sent == [] and engine.streams == []


def test_405_and_500_are_openai_errors_and_other_paths_go_to_fastapi():
    engine = StubEngine()
    talk = Conversation([b""])
    _run(_app(engine), talk, scope=_scope(method="GET"))
    assert talk.status == 405 and (b"allow", b"POST") in talk.sent[0]["headers"]
    assert json.loads(talk.body())["error"]["code"] == 405
    failing = StubEngine(fail=RuntimeError("boom"))
    talk = Conversation([json.dumps({"model": "m", "prompt": [1, 2]}).encode()])
    _run(_app(failing), talk)
    error = json.loads(talk.body())["error"]
    assert talk.status == 500 and error["type"] == "server_error" and set(error) == {"message", "type", "param",
                                                                                     "code"}
    talk = Conversation([b""])
    _run(_app(engine), talk, scope=_scope("/v1/models", "GET"))
    assert talk.status == 200 and json.loads(talk.body())["data"][0]["id"] == "m"
