"""AsyncEngine delivers a step's tokens while the device runs the next step (LLMEngine.step's while_waiting), once
per step; the runner calls that host work once in every kind of step; an error in a delivery is raised after the
step, which stands (no rollback)."""

import asyncio
import logging

import pytest

from fms.entrypoints.async_engine import AsyncEngine
from fms.models import get_model
from fms.serving import LLMEngine, SamplingParams
from fms.utils.generation import generate


@pytest.fixture(scope="module")
def model():
    return get_model("llama", "nano")


def _collect(async_engine, prompts, max_tokens):
    async def go():
        streams = [async_engine.submit(p, SamplingParams(max_tokens=max_tokens)) for p in prompts]
        out = []
        for stream in streams:
            deltas = [d async for d in stream]
            out.append(deltas)
        return out

    return asyncio.run(go())


def test_each_step_delivers_the_one_before_it_while_it_runs(model):
    engine = LLMEngine(model, num_pages=16, max_decode_steps=1)
    calls = []
    real_step = engine.step

    def step(while_waiting=None):
        calls.append("step with delivery" if while_waiting else "step")
        return real_step(while_waiting)

    engine.step = step
    real_deliver = AsyncEngine._deliver_results
    async_engine = AsyncEngine(engine)
    delivered_in_step = []

    def deliver(self, results):  # called inside a step when that step got the delivery, else between steps
        delivered_in_step.append((len(calls), [r.new_token_ids for r in results]))
        return real_deliver(self, results)

    async_engine._deliver_results = deliver.__get__(async_engine)
    async_engine.start()
    try:
        prompt = list(range(3, 13))
        (deltas,) = _collect(async_engine, [prompt], 4)
    finally:
        async_engine.shutdown(timeout_s=5)
    expected = generate(model, [prompt], 4, attn_name="sdpa")[0]
    assert [t for d in deltas for t in d.token_ids] == expected
    assert deltas[-1].finished and deltas[-1].finish_reason == "length"
    # one prefill step and three one-token steps; steps 2-4 each delivered the step before them
    assert calls == ["step", "step with delivery", "step with delivery", "step with delivery"]
    # step k's token is delivered during step k + 1 (the count of steps begun is k + 1); the last step's once the
    # loop finds nothing to step
    assert [(n, tokens) for n, tokens in delivered_in_step if tokens] == [
        (2, [[expected[0]]]), (3, [[expected[1]]]), (4, [[expected[2]]]), (4, [[expected[3]]])]


@pytest.mark.parametrize("options, prompt_len", [
    (dict(max_decode_steps=4), 9),  # a prefill step, then decode windows
    (dict(max_decode_steps=1, max_num_batched_tokens=16), 40),  # chunks in the prompt's middle sample nothing
])
def test_the_runner_calls_the_host_work_once_per_step(model, options, prompt_len):
    engine = LLMEngine(model, num_pages=16, **options)
    engine.add_request(list(range(5, 5 + prompt_len)), SamplingParams(max_tokens=6))
    calls_per_step = []
    while engine.has_unfinished_requests():
        calls = []
        engine.step(while_waiting=lambda: calls.append(1))
        calls_per_step.append(len(calls))
    assert len(calls_per_step) >= 3 and set(calls_per_step) == {1}


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the loop's error, on purpose
def test_a_delivery_error_is_raised_after_the_step_which_stands(model, caplog):
    engine = LLMEngine(model, num_pages=16, max_decode_steps=1)
    async_engine = AsyncEngine(engine)
    real_deliver = async_engine._deliver
    seen = []

    def deliver(request_id, finished):
        seen.append(request_id)
        if len(seen) == 2:
            raise RuntimeError("delivery broke")
        return real_deliver(request_id, finished)

    async_engine._deliver = deliver
    caplog.set_level(logging.ERROR)

    async def go():
        stream = async_engine.submit(list(range(3, 13)), SamplingParams(max_tokens=6))
        return [d async for d in stream]

    async_engine.start()
    try:
        deltas = asyncio.run(go())
    finally:
        async_engine.shutdown(timeout_s=5)
    # the loop ended on the error: the request ends as the shutdown of a dead loop ends it, after its first token
    assert deltas[0].token_ids and deltas[-1].finished and deltas[-1].finish_reason == "abort"
    assert async_engine.num_step_failures == 0  # no step failed or rolled back because of the delivery
    # the second delivery (step 2's token) ran inside step 3 and failed there; step 3 ran whole all the same
    assert engine.num_steps == 3


def _first_step_requests(model, monkeypatch, burst_wait_s, prompts_at, lengths=None):
    """Requests submitted from another thread at the given times (s) to an idle AsyncEngine; -> how many prompts its
    first step ran (from the step's batched tokens) and the hold's long waits (timeouts > 1 s)."""
    import threading
    import time

    from fms.entrypoints import async_engine as module

    monkeypatch.setattr(module, "BURST_FIRST_GAP_S", 0.3)  # generous gaps: the test does not race the clock
    monkeypatch.setattr(module, "BURST_GAP_S", 0.3)
    engine = LLMEngine(model, num_pages=64, max_num_batched_tokens=64, max_decode_steps=1)
    lengths = lengths or [8] * len(prompts_at)
    first_step = []
    real_step = engine.step

    def step(while_waiting=None):
        if not first_step:
            first_step.append(sum(len(r.prompt_token_ids) for r in engine.scheduler.waiting))
        return real_step(while_waiting)

    engine.step = step
    async_engine = AsyncEngine(engine, burst_wait_s=burst_wait_s)

    async def go():
        loop = asyncio.get_running_loop()
        streams = []

        def submit_all():
            start = time.monotonic()
            for at, n in zip(prompts_at, lengths):
                time.sleep(max(0.0, start + at - time.monotonic()))
                future = asyncio.run_coroutine_threadsafe(_submit(async_engine, n, streams), loop)
                future.result()

        thread = threading.Thread(target=submit_all)
        thread.start()
        while thread.is_alive():
            await asyncio.sleep(0.01)
        for stream in streams:
            assert [d async for d in stream][-1].finished

    async_engine.start()
    try:
        asyncio.run(go())
    finally:
        async_engine.shutdown(timeout_s=5)
    return first_step[0]


async def _submit(async_engine, n, streams):
    streams.append(async_engine.submit(list(range(5, 5 + n)), SamplingParams(max_tokens=2)))


def test_an_idle_engine_holds_its_first_step_while_a_burst_arrives(model, monkeypatch):
    # four requests 50 ms apart: held, the first step runs all four (32 prompt tokens of a 64-token budget)
    assert _first_step_requests(model, monkeypatch, 0.9, [0.0, 0.05, 0.10, 0.15]) == 32
    # not held (burst_wait_s 0, fms serve --burst-wait-ms 0): the first step runs the first request alone
    assert _first_step_requests(model, monkeypatch, 0.0, [0.0, 0.05, 0.10, 0.15]) == 8


def test_the_hold_ends_once_the_waiting_prompts_fill_a_step(model, monkeypatch):
    # two 40-token prompts fill the 64-token budget: the third, 0.2 s later, is not waited for
    assert _first_step_requests(model, monkeypatch, 0.9, [0.0, 0.01, 0.2], lengths=[40, 40, 8]) == 80


def test_the_hold_is_bounded_by_burst_wait(model, monkeypatch):
    # arrivals keep coming 50 ms apart, but the hold lasts at most 0.12 s: the first step has what came by then
    first = _first_step_requests(model, monkeypatch, 0.12, [0.0, 0.05, 0.10, 0.25, 0.30])
    assert first in (16, 24)  # 2 or 3 of them (0.10 s against 0.12 s leaves the third to the scheduler's clock)


def test_burst_wait_is_checked():
    engine = object.__new__(LLMEngine)
    for bad in (-0.1, 2, True, "1"):
        with pytest.raises(ValueError, match="burst_wait_s must be in"):
            AsyncEngine.__init__(object.__new__(AsyncEngine), engine, burst_wait_s=bad)
