"""FMS_STEP_TRACE: the engine's timeline of adds and steps, and its per-run summary."""

import pytest

from fms.models import get_model
from fms.serving import LLMEngine, SamplingParams
from fms.serving import trace as step_trace


def test_engine_writes_adds_and_steps_when_the_variable_is_set(tmp_path, monkeypatch):
    path = tmp_path / "trace.txt"
    monkeypatch.setenv(step_trace.ENV, str(path))
    engine = LLMEngine(get_model("llama", "nano"), num_pages=16, max_num_batched_tokens=16, max_decode_steps=1)
    outs = engine.generate([[5] * 20, [7] * 3], SamplingParams(max_new_tokens=3), use_tqdm=False)
    assert [len(o.token_ids) for o in outs] == [3, 3]
    events = step_trace.read(str(path))
    assert len(events["add"]) == 2 and events["recv"] == []
    steps = events["step"]
    assert len(steps) == engine.num_steps
    assert sum(n for _, _, n, _ in steps) == engine.num_batched_tokens
    # 23 prompt tokens in chunks of at most 16, then one token per request per decode step (the first output
    # token comes from the last prefill chunk): 23 + 2 * 2
    assert sum(n for _, _, n, _ in steps) == 27
    assert all(t0 <= t1 for t0, t1, _, _ in steps)
    assert all(a[0] <= t0 for a in events["add"] for t0, _, _, _ in steps)  # generate() adds both, then steps
    assert [s[0] for s in steps] == sorted(s[0] for s in steps)


def test_engine_has_no_trace_by_default(monkeypatch):
    monkeypatch.delenv(step_trace.ENV, raising=False)
    assert LLMEngine(get_model("llama", "nano"), num_pages=4).trace is None


def test_summary_of_one_run_by_hand(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text(
        "step 0.500000 0.600000 10 1\n"  # an earlier run: left out
        "recv 1.010000 3\n" "add 1.011000\n" "add 1.012000\n" "add 1.013000\n"
        "step 1.020000 1.050000 300 1\n"
        "recv 1.055000 1\n" "add 1.060000\n"
        "step 1.070000 1.100000 200 1\n"  # 20 ms idle before it
        "step 1.100000 1.300000 64 16\n"
    )
    s = step_trace.summarize(step_trace.read(str(path)), start=1.0, end=1.310)
    expected = {"num_steps": 3, "num_adds": 4, "first_add_ms": 11.0, "last_add_ms": 60.0,
                "first_step_start_ms": 20.0, "last_step_end_ms": 300.0, "busy_ms": 260.0,
                "idle_between_steps_ms": 20.0, "tail_ms": 10.0, "duration_ms": 310.0, "steps_before_last_add": 1,
                "first_recv_ms": 10.0, "last_recv_ms": 55.0, "num_recv_messages": 2, "recv_sizes": [3, 1]}
    assert s.keys() == expected.keys()
    for key, value in expected.items():
        assert s[key] == pytest.approx(value, abs=1e-6), key


def test_bad_trace_lines_and_empty_windows_are_named(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("add 1.0\nbogus 2.0\n")
    with pytest.raises(ValueError, match=r"t.txt:2: unknown event 'bogus'"):
        step_trace.read(str(path))
    path.write_text("add 1.0\n")
    with pytest.raises(ValueError, match="no engine step between"):
        step_trace.summarize(step_trace.read(str(path)), 0.0, 2.0)
