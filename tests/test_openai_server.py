"""The OpenAI-compatible server on 127.0.0.1 with llama "micro", driven by the real `openai` client: completions
and chat (streaming or not) equal to the offline engine, stop strings, logprobs, usage, a 400 per bad parameter,
32 concurrent streaming clients, disconnecting clients whose pages return, /metrics, 429 at the queue bound,
and `fms bench serve` against it. Every loop is bounded; every wait has a timeout."""

import asyncio
import json
import socket
import threading
import time

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from fms.entrypoints.chat import find_chat_template  # noqa: E402
from fms.entrypoints.openai.server import build_app, create_server, make_state  # noqa: E402
from fms.serving import LLMEngine, SamplingParams  # noqa: E402
from fms.utils.tokenizers import DEFAULT_TOKENIZER_PATH, get_tokenizer  # noqa: E402

MODEL = "llama-micro"
PROMPT = "The cache keeps every page"
MAX_TOKENS = 10
CLIENTS = 32
TIMEOUT_S = 60


@pytest.fixture(scope="module")
def model():
    from fms.models import get_model

    return get_model("llama", "micro", seed=0, init_std=0.5)  # larger weights: varied greedy text


@pytest.fixture(scope="module")
def tokenizer():
    return get_tokenizer()


def _engine(model, tokenizer, **options):
    return LLMEngine(model, tokenizer, max_decode_steps=4, **options)


@pytest.fixture(scope="module")
def offline(model, tokenizer):
    """The offline engine's greedy outputs (run before the server starts, so nothing else is on the model)."""
    engine = _engine(model, tokenizer)
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=3)
    prompts = {"main": PROMPT, "chat": [1] + tokenizer.encode("<|user|>\nHello there\n<|assistant|>\n", add_bos=False),
               **{f"client{i}": f"Client {i} asks about pages" for i in range(CLIENTS)}}
    outs = engine.generate(list(prompts.values()), params, use_tqdm=False)
    result = dict(zip(prompts, outs))
    assert len(set(result["main"].token_ids)) >= 6, result["main"].token_ids  # diverse tokens
    assert len({o.text for o in outs}) > CLIENTS // 2
    return result


@pytest.fixture(scope="module")
def server(model, tokenizer, offline):
    engine = _engine(model, tokenizer)
    state = make_state(engine, MODEL, find_chat_template(DEFAULT_TOKENIZER_PATH), max_waiting=256)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = create_server(state, "127.0.0.1", port, log_level="warning", shutdown_timeout_s=1)
    state.async_engine.start()
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + TIMEOUT_S
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    yield type("Server", (), {"url": f"http://127.0.0.1:{port}", "port": port, "state": state, "engine": engine})
    srv.should_exit = True
    thread.join(timeout=15)
    state.async_engine.shutdown(timeout_s=5)


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT_S) as c:
        yield c


def _wait_idle(server, timeout_s=TIMEOUT_S):
    """Until the engine holds no request and no page (the engine thread's snapshot), or fail."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = server.state.async_engine.stats
        if stats["num_running_requests"] == 0 and stats["num_waiting_requests"] == 0 and stats["num_used_pages"] == 0:
            return stats
        assert time.monotonic() < deadline, f"engine still busy: {stats}"
        time.sleep(0.05)


EXTRA = {"ignore_eos": True}


def test_health_and_models(server, client):
    assert httpx.get(server.url + "/health", timeout=10).json() == {"status": "ok"}
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_completion_equals_the_offline_engine(client, offline, tokenizer):
    ref = offline["main"]
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                    extra_body=EXTRA)
    assert out.choices[0].text == ref.text and out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == len(tokenizer.encode(PROMPT)) and out.usage.completion_tokens == MAX_TOKENS
    assert out.usage.total_tokens == out.usage.prompt_tokens + MAX_TOKENS


def test_streamed_completion_with_usage(client, offline):
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                            stream=True, stream_options={"include_usage": True}, extra_body=EXTRA))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == offline["main"].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == MAX_TOKENS


def test_token_id_prompts_and_lists_of_prompts(client, offline, tokenizer):
    ids = tokenizer.encode(PROMPT)
    out = client.completions.create(model=MODEL, prompt=ids, max_tokens=MAX_TOKENS, temperature=0, extra_body=EXTRA)
    assert out.choices[0].text == offline["main"].text
    prompts = [PROMPT, "Client 3 asks about pages"]
    out = client.completions.create(model=MODEL, prompt=prompts, max_tokens=MAX_TOKENS, temperature=0,
                                    extra_body=EXTRA)
    assert [c.index for c in out.choices] == [0, 1]
    assert [c.text for c in out.choices] == [offline["main"].text, offline["client3"].text]
    assert out.usage.completion_tokens == 2 * MAX_TOKENS


def test_chat_streaming_and_not(client, offline):
    messages = [{"role": "user", "content": "Hello there"}]
    ref = offline["chat"]  # the shipped template: "<s><|user|>\nHello there\n<|assistant|>\n"
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=MAX_TOKENS, temperature=0,
                                         extra_body=EXTRA)
    assert out.choices[0].message.role == "assistant" and out.choices[0].message.content == ref.text
    assert out.usage.prompt_tokens == len(ref.prompt_token_ids) and out.usage.completion_tokens == MAX_TOKENS
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=MAX_TOKENS,
                                                 temperature=0, stream=True, stream_options={"include_usage": True},
                                                 extra_body=EXTRA))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text
    assert chunks[-1].usage.total_tokens == len(ref.prompt_token_ids) + MAX_TOKENS


def test_stop_strings(client, offline):
    text = offline["main"].text
    stop = text[8:12]
    assert text.find(stop) == 8 and "\ufffd" not in stop
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, stop=[stop],
                                    extra_body=EXTRA)
    assert out.choices[0].text == text[:8] and out.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                            stop=stop, stream=True, extra_body=EXTRA))
    assert "".join(c.choices[0].text for c in chunks) == text[:8]  # nothing of the stop string leaks out


def test_logprobs(client, offline, tokenizer):
    ref = offline["main"]
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, logprobs=3,
                                    extra_body=EXTRA)
    lp = out.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx([t.logprob for t in ref.logprobs], abs=1e-4)
    assert lp.tokens == [tokenizer.decode([t], skip_special_tokens=False) for t in ref.token_ids]
    assert all(len(top) == 3 for top in lp.top_logprobs)  # the sampled token is the greedy top-1
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello there"}],
                                          max_tokens=MAX_TOKENS, temperature=0, logprobs=True, top_logprobs=2,
                                          extra_body=EXTRA)
    content = chat.choices[0].logprobs.content
    assert [c.logprob for c in content] == pytest.approx([t.logprob for t in offline["chat"].logprobs], abs=1e-4)
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].token == c.token for c in content)


@pytest.mark.parametrize("kwargs, param", [
    (dict(n=2), "n"),
    (dict(temperature=-1), "temperature"),
    (dict(top_p=1.5), "top_p"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=100_000), "max_tokens"),
    (dict(logprobs=21), "logprobs"),
    (dict(stop=[""]), "stop"),
    (dict(seed="x"), "seed"),
    (dict(presence_penalty=0.5), "presence_penalty"),
    (dict(extra_body={"top_k": -5}), "top_k"),
    (dict(extra_body={"min_tokens": 50}), "min_tokens"),
    (dict(prompt=[5, 99999]), "prompt"),
    (dict(prompt=[]), "prompt"),
])
def test_bad_completion_parameters_are_400(client, kwargs, param):
    kwargs = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, **kwargs}
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(**kwargs)
    error = e.value.body
    assert e.value.status_code == 400 and error["param"] == param and error["message"], error


@pytest.mark.parametrize("kwargs", [
    dict(messages=[]),
    dict(top_logprobs=3),  # without logprobs=true
    dict(tools=[{"type": "function", "function": {"name": "f"}}]),
    dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
])
def test_bad_chat_parameters_are_400(client, kwargs):
    kwargs = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **kwargs}
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(**kwargs)


def test_unknown_model_is_404_in_openai_shape(server, client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt=PROMPT, max_tokens=2)
    response = httpx.post(server.url + "/v1/completions", json={"model": "nope", "prompt": "x"}, timeout=10)
    assert response.status_code == 404
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("path, content, param", [
    ("/v1/completions", b'{"model": "llama-micro", "prompt": [1, 2', None),  # cut-off JSON
    ("/v1/completions", b"not json at all", None),
    ("/v1/completions", b'{"model": "llama-micro"}', "prompt"),  # the one required field is missing
    ("/v1/completions", b'{"prompt": [1, -3]}', "prompt"),  # a negative token id
    ("/v1/completions", b'{"prompt": [1, "a"]}', "prompt"),  # ids and text mixed in one prompt
    ("/v1/chat/completions", b'{"messages": "hi"}', "messages"),
    ("/v1/chat/completions", b"[]", None),
])
def test_malformed_bodies_are_400_in_openai_shape(server, path, content, param):
    """The body is parsed straight from its bytes (not through FastAPI's typed parameter): a bad one is still a 400
    in OpenAI's shape that names the field, never a 422 or a 500."""
    response = httpx.post(server.url + path, content=content, headers={"content-type": "application/json"},
                          timeout=10)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == 400 and error["message"]
    if param is not None:
        assert error["param"] is not None and error["param"].split(".")[0] == param, error


def test_openapi_schema_documents_the_request_bodies(server):
    schema = httpx.get(server.url + "/openapi.json", timeout=10).json()
    for path, field in (("/v1/completions", "prompt"), ("/v1/chat/completions", "messages")):
        body = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert field in body["properties"] and field in body["required"], (path, body)


def test_32_concurrent_streaming_clients(server, offline):
    async def one(aclient, i):
        chunks = []
        stream = await aclient.completions.create(model=MODEL, prompt=f"Client {i} asks about pages",
                                                  max_tokens=MAX_TOKENS, temperature=0, stream=True,
                                                  stream_options={"include_usage": True}, extra_body=EXTRA)
        async for chunk in stream:
            chunks.append(chunk)
        return chunks

    async def main():
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                                     timeout=TIMEOUT_S)
        return await asyncio.wait_for(asyncio.gather(*(one(aclient, i) for i in range(CLIENTS))), TIMEOUT_S * 2)

    num_steps = server.engine.num_steps
    results = asyncio.run(main())
    for i, chunks in enumerate(results):
        assert "".join(c.choices[0].text for c in chunks if c.choices) == offline[f"client{i}"].text, i
        assert chunks[-1].usage.completion_tokens == MAX_TOKENS  # every token delivered
    # clients shared steps: far fewer steps than 32 requests run one after another would need
    assert server.engine.num_steps - num_steps < CLIENTS * 3
    _wait_idle(server)


def test_a_disconnecting_client_frees_its_pages(server):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=TIMEOUT_S) as http:
        with http.stream("POST", server.url + "/v1/completions", json=body) as response:
            for line in response.iter_lines():
                if line.startswith("data:"):
                    break  # one token came; then the client goes away
        assert server.state.async_engine.stats["num_used_pages"] > 0 or server.engine.requests
    stats = _wait_idle(server)
    assert stats["num_free_pages"] + stats["num_cached_pages"] == stats["num_pages"]
    # a non-streaming client that gives up (read timeout) is aborted too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json={**body, "stream": False}, timeout=1.0)
    _wait_idle(server)
    assert not server.engine.requests


def test_metrics_parse_with_prometheus_client(server, client):
    from prometheus_client.parser import text_string_to_metric_families

    client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0, extra_body=EXTRA)
    time.sleep(0.2)  # the gauges come from the engine thread's snapshot (every 50 ms)
    text = httpx.get(server.url + "/metrics", timeout=10).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("fms:num_requests_running", "fms:num_requests_waiting", "fms:kv_cache_used_pages",
                 "fms:kv_cache_free_pages", "fms:kv_cache_cached_pages", "fms:prefix_cache_hit_rate",
                 "fms:time_to_first_token_seconds", "fms:time_per_output_token_seconds",
                 "fms:e2e_request_latency_seconds", "fms:prompt_tokens", "fms:generation_tokens",
                 "fms:request_success"):
        assert name in families, name
    value = {s.name: s.value for f in families.values() for s in f.samples if not s.labels.get("le")}
    assert value["fms:generation_tokens_total"] >= 3 and value["fms:prompt_tokens_total"] > 0
    assert value["fms:time_to_first_token_seconds_count"] >= 1
    assert value["fms:kv_cache_free_pages"] + value["fms:kv_cache_cached_pages"] == value["fms:kv_cache_total_pages"]
    # the engine's totals, as counters: they agree with the engine's own stats() and only grow
    stats = server.engine.stats()
    assert value["fms:engine_steps_total"] == stats["num_steps"] >= 2
    assert value["fms:engine_batched_tokens_total"] == stats["num_batched_tokens"] > 0
    phases = {s.labels["phase"]: s.value for s in families["fms:engine_time_seconds"].samples}
    assert set(phases) == set(stats["time_s"]) and phases["execute"] > 0
    client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0, extra_body=EXTRA)
    time.sleep(0.2)
    later = {s.name: s.value for f in text_string_to_metric_families(httpx.get(server.url + "/metrics", timeout=10).text)
             for s in f.samples if s.name.startswith("fms:engine_steps")}
    assert later["fms:engine_steps_total"] > value["fms:engine_steps_total"]


def test_a_full_queue_answers_429_with_retry_after(model, tokenizer):
    from fastapi.testclient import TestClient

    state = make_state(_engine(model, tokenizer, num_pages=8), MODEL, None, max_waiting=2)  # loop not started

    async def fill():
        return [state.async_engine.submit([1, 2, 3], SamplingParams(max_tokens=2)) for _ in range(2)]

    asyncio.run(fill())
    with TestClient(build_app(state)) as http:
        response = http.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 2})
        assert response.status_code == 429 and response.headers["Retry-After"] == "1"
        assert "--max-waiting 2" in response.json()["error"]["message"]
        state.async_engine.stop_intake()
        response = http.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 2})
        assert response.status_code == 503 and "Retry-After" in response.headers
        assert http.get("/health").status_code == 503
        response = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
        assert response.status_code in (400, 503)


def test_fms_bench_serve_against_the_server(server, tmp_path):
    from fms.entrypoints.cli import main

    rc = main(["bench", "serve", "--port", str(server.port), "--num-prompts", "8", "--random-input-len", "12",
               "--random-output-len", "4", "--no-progress", "--goodput", "ttft:60000", "--result-dir", str(tmp_path),
               "--plot"])
    report = json.loads((tmp_path / "bench_serve.json").read_text())
    assert rc == 0 and report["completed"] == 8 and report["failed"] == 0
    assert report["total_output_tokens"] == 32 and report["total_input_tokens"] == sum(
        r["prompt_len"] for r in report["per_request"])
    assert report["output_throughput"] > 0 and report["p99_ttft_ms"] >= report["median_ttft_ms"] > 0
    assert report["request_goodput"] == pytest.approx(report["request_throughput"])
    assert (tmp_path / "bench_serve.png").is_file()
    _wait_idle(server)


def test_gil_switch_interval_from_the_environment(monkeypatch):
    from fms.entrypoints.openai.server import SWITCH_INTERVAL_ENV, switch_interval_s

    monkeypatch.delenv(SWITCH_INTERVAL_ENV, raising=False)
    assert switch_interval_s() == 0.0005
    monkeypatch.setenv(SWITCH_INTERVAL_ENV, "5")
    assert switch_interval_s() == pytest.approx(0.005)
    for bad in ("0", "-1", "fast", "inf"):
        monkeypatch.setenv(SWITCH_INTERVAL_ENV, bad)
        with pytest.raises(ValueError, match=f"{SWITCH_INTERVAL_ENV} must be a number of milliseconds > 0, got '{bad}'"):
            switch_interval_s()
