"""`fms generate` and `fms serve` with --tensor-parallel-size 2 on the CPU (gloo, 2 spawned ranks): the same text as
--tensor-parallel-size 1, a client that goes away, and SIGTERM that drains and exits 0 with both ranks gone. First,
in one process, rank 0's engine events replayed on a follower's engine give the follower the same tokens (a drawn
seed travels with its request). The references are the plain one-process engine; every wait has a timeout."""

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from fms.entrypoints.async_engine import AsyncEngine
from fms.entrypoints.cli import main, serve_parser
from fms.entrypoints.engine_args import build_engine
from fms.entrypoints.tensor_parallel import apply_events, step_follower
from fms.serving import LLMEngine, SamplingParams
from tests.streaming import stream_in_background

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 90
# on the CPU on every machine (gloo, fp32), references included
MODEL_FLAGS = ["--architecture", "llama", "--variant", "micro", "--max-decode-steps", "2", "--device", "cpu"]
PROMPTS = ["The cache keeps every page", "Hello world, said the"]


# -- the event protocol, in one process ---------------------------------------------------------------------
class _Follower:
    """What a follower rank does with rank 0's events (fms.entrypoints.tensor_parallel.follow), called in line."""

    def __init__(self, engine):
        self.engine, self.events, self.tokens, self.mismatches, self.stopped = engine, [], {}, [], False
        step = engine.step

        def recording_step():
            results = step()
            for request_id, tokens, _ in results:
                self.tokens.setdefault(request_id, []).extend(tokens)
            return results

        engine.step = recording_step

    def send(self, events, will_step):
        self.events += events
        assert apply_events(self.engine, events)
        if self.engine.has_unfinished_requests() != will_step:
            self.mismatches.append((list(events), will_step))
        if will_step:
            step_follower(self.engine)

    def stop(self):
        self.stopped = not apply_events(self.engine, [("stop",)])


def test_events_replicate_rank0s_engine_on_a_follower():
    from fms.models import get_model
    from fms.utils.tokenizers import get_tokenizer

    model, tokenizer = get_model("llama", "micro", seed=0), get_tokenizer()
    follower = _Follower(LLMEngine(model, tokenizer, max_decode_steps=2))
    leader = AsyncEngine(LLMEngine(model, tokenizer, max_decode_steps=2), followers=follower)
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    kinds = {"greedy": SamplingParams(max_tokens=8, ignore_eos=True),
             "seeded": SamplingParams(max_tokens=8, ignore_eos=True, temperature=1.0, seed=11),
             "unseeded": SamplingParams(max_tokens=8, ignore_eos=True, temperature=1.0)}

    async def run():
        streams = {name: leader.submit(prompts[i % 2], p) for i, (name, p) in enumerate(kinds.items())}
        gone = leader.submit(prompts[0], SamplingParams(max_tokens=200, ignore_eos=True))
        async for delta in gone:  # one delta, then the client goes away
            assert delta.token_ids
            gone.abort()
            break
        tokens = {}
        for name, stream in streams.items():
            tokens[name] = [t async for delta in stream for t in delta.token_ids]
        return {streams[name].request_id: t for name, t in tokens.items()}, gone.request_id

    leader.start()
    try:
        leader_tokens, gone_id = asyncio.run(asyncio.wait_for(run(), TIMEOUT_S))
    finally:
        leader.shutdown(timeout_s=5)
    adds = [e for e in follower.events if e[0] == "add"]
    assert [e[1] for e in adds] == [*leader_tokens, gone_id] and all(e[3].seed is not None for e in adds)
    assert adds[1][3].seed == 11 and ("abort", gone_id) in follower.events and follower.stopped
    assert not follower.mismatches  # the follower stepped exactly when rank 0 did
    assert all(len(t) == 8 for t in leader_tokens.values()) and len(set(sum(leader_tokens.values(), []))) >= 8
    assert {rid: follower.tokens[rid] for rid in leader_tokens} == leader_tokens  # the unseeded one too
    stats = follower.engine.stats()
    assert not follower.engine.requests and stats["num_used_pages"] == 0 and stats["num_running_requests"] == 0


# -- fms generate -tp 2 -------------------------------------------------------------------------------------
def _generate_json(capsys, *extra):
    argv = ["generate", *MODEL_FLAGS, "--max-tokens", "12", "--ignore-eos", "--json", "--logprobs", "2", *extra]
    for p in PROMPTS:
        argv += ["--prompt", p]
    assert main(argv) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_generate_tp2_equals_tp1(capsys):
    reference = _generate_json(capsys)
    assert all(len(set(r["token_ids"])) >= 8 for r in reference), reference  # varied text to compare
    start = time.monotonic()
    split = _generate_json(capsys, "--tensor-parallel-size", "2")
    assert time.monotonic() - start < TIMEOUT_S
    assert [(r["prompt"], r["token_ids"], r["text"]) for r in split] == \
        [(r["prompt"], r["token_ids"], r["text"]) for r in reference]
    for got, want in zip(split, reference):  # fp32: the all-reduced sums round differently in the last bits
        assert got["logprobs"][5]["top"][0][0] == want["logprobs"][5]["top"][0][0]
        assert [lp["logprob"] for lp in got["logprobs"]] == pytest.approx([lp["logprob"] for lp in want["logprobs"]],
                                                                          abs=1e-4)


# -- fms serve -tp 2 ----------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gauges(httpx, url) -> dict[str, float]:
    values = {}
    for line in httpx.get(url + "/metrics", timeout=5).text.splitlines():
        match = re.match(r"(fms:\w+)\{[^}]*\} (\S+)$", line)
        if match:
            values[match[1]] = float(match[2])
    return values


def _wait(predicate, what: str, proc):
    deadline = time.monotonic() + TIMEOUT_S
    while not predicate():
        assert proc.poll() is None, f"the server exited with {proc.returncode} while waiting for {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_serve_tp2_answers_like_tp1_and_exits_on_sigterm():
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")
    # the one-process references (before the ranks start: CPU threads of both would contend)
    engine, _ = build_engine(serve_parser().parse_args(MODEL_FLAGS))
    greedy = SamplingParams(max_tokens=12, ignore_eos=True)
    seeded = SamplingParams(max_tokens=12, ignore_eos=True, temperature=0.9, seed=7)
    outputs = {"greedy": engine.generate(PROMPTS[:1], greedy, use_tqdm=False)[0],
               "stream": engine.generate(PROMPTS[1:], greedy, use_tqdm=False)[0],
               "seeded": engine.generate(PROMPTS[1:], seeded, use_tqdm=False)[0]}
    assert all(len(set(o.token_ids)) >= 8 for o in outputs.values()), outputs  # varied text to compare
    want = {name: o.text for name, o in outputs.items()}
    assert len(set(want.values())) == 3, want

    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "fms.entrypoints.cli", "serve", *MODEL_FLAGS, "--port", str(port),
                             "--log-level", "warning", "--tensor-parallel-size", "2"],
                            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
    reader.start()
    url, rank_pids = f"http://127.0.0.1:{port}", []
    try:
        def healthy():
            try:
                return httpx.get(url + "/health", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        _wait(healthy, "the server to come up", proc)
        banner = next(line for line in output if line.startswith("serving "))
        rank_pids = [int(p) for p in re.search(r"pids (\d+) (\d+)", banner).groups()]
        assert proc.pid not in rank_pids and all(_alive(p) for p in rank_pids), banner

        def completion(prompt, **body):
            body = {"prompt": prompt, "max_tokens": 12, "ignore_eos": True, "temperature": 0, **body}
            return httpx.post(url + "/v1/completions", json=body, timeout=TIMEOUT_S).json()

        def complete(prompt, **body):
            return completion(prompt, **body)["choices"][0]["text"]

        def stream(prompt):
            body = {"prompt": prompt, "max_tokens": 12, "ignore_eos": True, "temperature": 0, "stream": True}
            text = ""
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=TIMEOUT_S) as response:
                for line in response.iter_lines():
                    if line.startswith("data: {"):
                        text += json.loads(line[6:])["choices"][0]["text"]
            return text

        with ThreadPoolExecutor(4) as pool:  # arriving together: they share steps, on both ranks
            got = {"greedy": pool.submit(complete, PROMPTS[0]), "stream": pool.submit(stream, PROMPTS[1]),
                   "seeded": pool.submit(complete, PROMPTS[1], temperature=0.9, seed=7),
                   "unseeded": pool.submit(complete, PROMPTS[0], temperature=0.9)}
            got = {name: future.result(TIMEOUT_S) for name, future in got.items()}
        assert got.pop("unseeded") and got == want

        # a streaming client that goes away: its request is aborted on both ranks, then the ranks still agree
        body = {"prompt": PROMPTS[0], "max_tokens": 4000, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=TIMEOUT_S) as response:
            lines = response.iter_lines()  # kept: a dropped iterator would close the connection at once
            assert next(lines).startswith("data:")
            _wait(lambda: _gauges(httpx, url)["fms:num_requests_running"] == 1, "the request to show as running",
                  proc)  # /metrics is a snapshot the engine thread refreshes every 50 ms
        _wait(lambda: _gauges(httpx, url)["fms:num_requests_running"] == 0
              and _gauges(httpx, url)["fms:kv_cache_used_pages"] == 0, "the aborted request's pages", proc)
        assert complete(PROMPTS[0]) == want["greedy"]

        # SIGTERM with a request in flight (its first tokens came): it finishes, both ranks leave, the command exits 0
        body = {"prompt": PROMPTS[0], "max_tokens": 48, "ignore_eos": True, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        thread, chunks, started = stream_in_background(url, body, TIMEOUT_S)
        assert started.wait(TIMEOUT_S), "the in-flight request sent nothing"
        proc.send_signal(signal.SIGTERM)
        thread.join(TIMEOUT_S)
        assert chunks[-1]["usage"]["completion_tokens"] == 48  # finished, not cut off
        assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
        assert proc.wait(timeout=TIMEOUT_S) == 0, "".join(output)
        assert not [p for p in rank_pids if _alive(p)]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        for pid in rank_pids:  # only if the test failed before they were gone
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
