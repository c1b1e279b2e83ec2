"""`fms serve`'s engine process (fms.entrypoints.engine_process) on 127.0.0.1 with llama "micro" on the CPU: one
engine process serves the whole module (spawning one costs seconds). Greedy completions, streamed or not, with
logprobs and a stop string, equal the offline engine's; a client that goes away frees its pages; --max-waiting
answers 429; a killed engine process ends the request in flight with an error, turns /health to 503 and stops
the server with status 1; a model that fails to load in the engine process gives the same error as without it.
Every wait has a timeout."""

import asyncio
import json
import os
import signal
import socket
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from fms.entrypoints.cli import main, serve_parser  # noqa: E402
from fms.entrypoints.engine_args import build_engine  # noqa: E402
from fms.entrypoints.engine_process import EngineProcessClient, start_server_state  # noqa: E402
from fms.entrypoints.openai.server import build_app, run_server  # noqa: E402
from fms.serving import SamplingParams  # noqa: E402
from tests.streaming import stream_in_background  # noqa: E402

TIMEOUT_S = 30
MODEL_FLAGS = ["--architecture", "llama", "--variant", "micro", "--device", "cpu", "--max-decode-steps", "2"]
# two sequences per step and two waiting at most: the 429 test fills both
SERVER_FLAGS = [*MODEL_FLAGS, "--max-num-seqs", "2", "--max-waiting", "2", "--log-level", "warning",
                "--shutdown-timeout", "2"]
PROMPTS = ["The cache keeps every page", "Hello world, said the"]
MAX_TOKENS = 12


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def offline():
    """The offline engine's outputs in this process (built before the engine process starts)."""
    engine, _ = build_engine(serve_parser().parse_args(MODEL_FLAGS))
    greedy = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=2)
    outs = dict(zip(PROMPTS, engine.generate(PROMPTS, greedy, use_tqdm=False)))
    assert all(len(set(o.token_ids)) >= 6 for o in outs.values()), outs  # varied text to compare
    text = outs[PROMPTS[0]].text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    stopped = engine.generate(PROMPTS[:1], SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, stop=[stop]),
                              use_tqdm=False)[0]
    assert stopped.finish_reason == "stop" and len(stopped.text) < len(text), (text, stop, stopped)
    return {"greedy": outs, "stop": stop, "stopped": stopped}


@pytest.fixture(scope="module")
def server(offline):
    port = _free_port()
    args = serve_parser().parse_args([*SERVER_FLAGS, "--port", str(port)])
    start = time.monotonic()
    state = start_server_state(args)
    assert time.monotonic() - start < TIMEOUT_S
    client = state.async_engine
    assert isinstance(client, EngineProcessClient) and client.process.is_alive() and client.pid != os.getpid()
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("rc", run_server(
        state, "127.0.0.1", port, "warning", args.shutdown_timeout)), daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.05)
    yield type("Server", (), {"url": url, "state": state, "client": client, "thread": thread, "result": result})
    if thread.is_alive() and client.process.is_alive():  # the last test did not run: stop it as that test does
        os.kill(client.pid, signal.SIGKILL)
    thread.join(timeout=TIMEOUT_S)
    client.shutdown(timeout_s=0)
    assert not client.process.is_alive()


def _wait(predicate, what: str, client=None):
    deadline = time.monotonic() + TIMEOUT_S
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}" + (
            f": {client.stats}, {len(client._streams)} streams" if client is not None else "")
        time.sleep(0.05)


def _idle(client) -> bool:
    stats = client.stats
    return (stats["num_running_requests"] == 0 and stats["num_waiting_requests"] == 0
            and stats["num_used_pages"] == 0 and not client._streams and client.num_pending == 0)


def _stream_events(url, body) -> list[dict]:
    events = []
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=TIMEOUT_S) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                events.append(json.loads(line[6:]))
    return events


def test_completions_equal_the_offline_engine(server, offline):
    body = {"prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True, "logprobs": 2}
    want = offline["greedy"][PROMPTS[0]]
    out = httpx.post(server.url + "/v1/completions", json=body, timeout=TIMEOUT_S).json()
    choice = out["choices"][0]
    assert choice["text"] == want.text and choice["finish_reason"] == "length"
    assert out["usage"]["completion_tokens"] == MAX_TOKENS
    assert choice["logprobs"]["token_logprobs"] == pytest.approx([lp.logprob for lp in want.logprobs], abs=1e-5)

    # streamed, both prompts at once (they share steps), token-id prompts as the offline engine got them
    tokenizer = server.state.tokenizer
    results = {}

    def one(prompt):
        events = _stream_events(server.url, {**body, "prompt": tokenizer.encode(prompt)})
        results[prompt] = events

    threads = [threading.Thread(target=one, args=(p,)) for p in PROMPTS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT_S)
    for prompt in PROMPTS:
        events, want = results[prompt], offline["greedy"][prompt]
        assert "".join(e["choices"][0]["text"] for e in events) == want.text
        logprobs = [v for e in events for v in e["choices"][0]["logprobs"]["token_logprobs"]]
        assert logprobs == pytest.approx([lp.logprob for lp in want.logprobs], abs=1e-5)
        assert events[-1]["choices"][0]["finish_reason"] == "length"

    # a stop string: the engine process builds the text, the deltas carry it
    stopped = offline["stopped"]
    for stream in (False, True):
        request = {**body, "stop": [offline["stop"]], "logprobs": None}
        if stream:
            events = _stream_events(server.url, request)
            text, last = "".join(e["choices"][0]["text"] for e in events), events[-1]["choices"][0]
        else:
            last = httpx.post(server.url + "/v1/completions", json=request, timeout=TIMEOUT_S).json()["choices"][0]
            text = last["text"]
        assert (text, last["finish_reason"], last["stop_reason"]) == (stopped.text, "stop", offline["stop"])
    _wait(lambda: _idle(server.client), "the engine to go idle", server.client)
    metrics = httpx.get(server.url + "/metrics", timeout=5).text  # finished requests came back for the histograms
    assert 'fms:request_success_total{finished_reason="length",model_name="llama-micro"} 3.0' in metrics


def test_a_client_that_goes_away_frees_its_request(server):
    body = {"prompt": PROMPTS[1], "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=TIMEOUT_S) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data:")
        _wait(lambda: server.client.stats["num_running_requests"] == 1, "the request to run")
    _wait(lambda: _idle(server.client), "the aborted request's pages", server.client)
    stats = server.client.stats
    assert stats["num_free_pages"] + stats["num_cached_pages"] == stats["num_pages"]


def test_max_waiting_answers_429(server):
    """Two run and two wait at most (--max-num-seqs 2 --max-waiting 2): of six long requests sent at once at
    least two are refused with 429 and Retry-After."""
    body = {"prompt": PROMPTS[0], "max_tokens": 1000, "ignore_eos": True, "stream": True}

    async def run():
        async with httpx.AsyncClient(timeout=TIMEOUT_S) as http:
            async def one():
                async with http.stream("POST", server.url + "/v1/completions", json=body) as response:
                    return response.status_code, response.headers.get("Retry-After")

            return await asyncio.wait_for(asyncio.gather(*(one() for _ in range(6))), TIMEOUT_S)

    answers = asyncio.run(run())
    refused = [a for a in answers if a[0] == 429]
    assert len(refused) >= 2 and all(retry == "1" for _, retry in refused), answers
    assert all(status in (200, 429) for status, _ in answers), answers
    # the accepted ones were aborted when their connections closed
    _wait(lambda: _idle(server.client), "the engine to go idle", server.client)


def test_tensor_parallel_refuses_engine_process(capsys):
    assert main(["serve", *MODEL_FLAGS, "-tp", "2", "--engine-process"]) == 2
    assert "--engine-process is not supported with --tensor-parallel-size 2" in capsys.readouterr().err


def test_a_model_load_error_in_the_engine_process_is_reported_like_in_process(tmp_path, capfd):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 64}))
    errors = {}
    for mode in ("--no-engine-process", "--engine-process"):
        start = time.monotonic()
        rc = main(["serve", str(tmp_path), "--device", "cpu", "--port", str(_free_port()), mode])
        errors[mode] = (rc, [line for line in capfd.readouterr().err.splitlines() if line.startswith("error:")])
        assert time.monotonic() - start < TIMEOUT_S
    assert errors["--engine-process"] == errors["--no-engine-process"]
    rc, lines = errors["--engine-process"]
    assert rc == 2 and lines == [f"error: {tmp_path / 'config.json'}: required key 'hidden_size' is missing"], errors


def test_a_killed_engine_process_fails_requests_health_and_the_server(server):
    """Last: it ends the module's server."""
    from fastapi.testclient import TestClient

    client = server.client
    thread, events, started = stream_in_background(
        server.url, {"prompt": PROMPTS[0], "max_tokens": 1000, "ignore_eos": True, "stream": True}, TIMEOUT_S)
    assert started.wait(TIMEOUT_S), "the request sent nothing"
    os.kill(client.pid, signal.SIGKILL)
    thread.join(TIMEOUT_S)
    assert not thread.is_alive()
    error = events[-1]["error"]
    assert error["code"] == 500 and "engine process" in error["message"] and "exited unexpectedly" in error["message"]
    server.thread.join(TIMEOUT_S)  # the server stops by itself, with status 1
    assert server.result.get("rc") == 1
    assert client.process.exitcode == -signal.SIGKILL and client.failure is not None
    with TestClient(build_app(server.state)) as http:  # the routes of the stopped server, in this process
        health = http.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "engine failed"
        response = http.post("/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 2})
        assert response.status_code == 503 and "engine" in response.json()["error"]["message"]


class _RecordingConn:
    """A pipe end that records what is sent (no engine process behind it)."""

    def __init__(self):
        self.sent = []

    def send(self, message):
        self.sent.append(message)


def test_the_adds_and_aborts_of_one_loop_turn_go_to_the_engine_process_as_one_message_after_the_turn():
    """A burst of requests is parsed in one event-loop turn; the engine should get it whole (one message, after the
    turn's handlers) and prefill it in full steps. Sending each add at once made the server slower on the H200
    (session 11: the engine ran many small mixed steps while the burst was still being parsed)."""
    from fms.runtime.sampling_params import SamplingParams

    info = {"stats": {}, "vocab_size": 256, "max_model_len": 64, "pid": 0}
    conn = _RecordingConn()
    client = EngineProcessClient(process=None, conn=conn, info=info)
    params = SamplingParams(max_tokens=2)

    async def burst():
        client.submit([1, 2, 3], params)
        client.submit([4, 5], params)
        stream = client.submit([6], params)
        stream.abort()
        during_turn = list(conn.sent)  # no await yet: the handlers' turn is not over
        await asyncio.sleep(0)  # the loop runs the callback scheduled for the end of the turn
        after_turn = list(conn.sent)
        client.submit([7], params)  # a later turn: a message of its own
        await asyncio.sleep(0)
        return during_turn, after_turn

    during_turn, after_turn = asyncio.run(burst())
    assert during_turn == []
    assert len(after_turn) == 1 and after_turn[0][0] == "requests"
    events = after_turn[0][1]
    assert [e[0] for e in events] == ["add", "add", "add", "abort"]
    assert [e[2] for e in events[:3]] == [[1, 2, 3], [4, 5], [6]] and events[3][1] == events[2][1]
    assert len(conn.sent) == 2 and [e[2] for e in conn.sent[1][1]] == [[7]]
