"""Scheduler: exact chunks, page ids and counts for chunked prefill, decode priority and preemption."""

import pytest

from fms.serving.request import FinishReason, RequestState
from tests.serving.helpers import check_pages, make_scheduler, request, run_step


def _chunks(out):
    return [(c.request_id, len(c.token_ids), c.start_position, c.sample) for c in out.chunks]


def test_chunked_prefill_then_admission_exact_pages():
    s = make_scheduler(num_pages=8, budget=32)
    a, b = request(0, 40), request(1, 20)
    s.add(a), s.add(b)

    out, res = run_step(s)
    assert _chunks(out) == [(0, 32, 0, False)]  # budget spent on A's first chunk; B waits
    assert res == [(0, [], False)]
    assert s.kv.block_table(0) == [0, 1] and a.num_computed_tokens == 32
    assert [r.request_id for r in s.waiting] == [1]

    out, res = run_step(s, token=5)
    assert _chunks(out) == [(0, 8, 32, True), (1, 20, 0, True)]
    assert out.chunks[0].token_ids == a.prompt_token_ids[32:]
    assert s.kv.block_table(0) == [0, 1, 2] and s.kv.block_table(1) == [3, 4]
    assert res == [(0, [5], False), (1, [5], False)]

    out, _ = run_step(s)
    assert _chunks(out) == [(0, 1, 40, True), (1, 1, 20, True)]
    assert out.is_decode_only and out.num_batched_tokens == 2
    assert s.kv.allocator.num_free == 3
    check_pages(s)


def test_decodes_go_first_and_prefill_takes_the_rest_of_the_budget():
    s = make_scheduler(num_pages=16, budget=10)
    s.add(request(0, 4, max_new_tokens=8))
    run_step(s)  # A prefilled, now decoding
    s.add(request(1, 50))
    out, _ = run_step(s)
    assert _chunks(out) == [(0, 1, 4, True), (1, 9, 0, False)]
    out, _ = run_step(s)
    assert _chunks(out) == [(0, 1, 5, True), (1, 9, 9, False)]
    check_pages(s)


def test_preempts_most_recent_and_recomputes_prompt_plus_outputs():
    s = make_scheduler(num_pages=4, budget=64)
    a, b = request(0, 30, max_new_tokens=10), request(1, 30, max_new_tokens=10)
    s.add(a), s.add(b)
    out, _ = run_step(s, token=7)
    assert _chunks(out) == [(0, 30, 0, True), (1, 30, 0, True)]
    assert s.kv.block_table(0) == [0, 1] and s.kv.block_table(1) == [2, 3]
    run_step(s, token=7)  # positions 30
    run_step(s, token=7)  # position 31: both pages full now
    out, _ = run_step(s, token=7)  # position 32 needs a third page each: B (newest) is preempted
    assert out.preempted_ids == [1]
    assert _chunks(out) == [(0, 1, 32, True)]
    assert s.kv.block_table(0) == [0, 1, 2] and 1 not in s.kv
    assert b.state is RequestState.PREEMPTED and b.num_computed_tokens == 0 and b.num_preemptions == 1
    assert b.output_token_ids == [7, 7, 7] and s.num_preemptions == 1
    assert list(s.waiting) == [b]
    check_pages(s)
    while not a.is_finished:
        out, _ = run_step(s, token=7)
        assert [c.request_id for c in out.chunks] == [0]  # B needs 3 pages, only 1 free
    out, _ = run_step(s, token=7)  # B comes back: recomputes 30 prompt + 3 output tokens, samples its 4th
    assert _chunks(out) == [(1, 33, 0, True)]
    assert out.chunks[0].token_ids == b.prompt_token_ids + [7, 7, 7]
    assert b.output_token_ids == [7, 7, 7, 7] and out.finished_ids == [0]
    while s.has_unfinished():
        run_step(s, token=7)
    assert b.finish_reason is FinishReason.LENGTH and len(b.output_token_ids) == 10
    assert s.kv.allocator.num_free == 4


def test_preempting_a_request_already_planned_this_step_refunds_it():
    s = make_scheduler(num_pages=4, budget=64)
    a, b = request(0, 16, max_new_tokens=30), request(1, 60, max_new_tokens=2)
    s.add(a)
    run_step(s)  # A: 16 tokens in page 0, now decoding
    s.add(b)
    s.max_num_batched_tokens = 17
    out, _ = run_step(s)  # A decodes at 16 -> page 1; B's first chunk of 16 -> page 2
    assert _chunks(out) == [(0, 1, 16, True), (1, 16, 0, False)]
    assert s.kv.block_table(0) == [0, 1] and s.kv.block_table(1) == [2]
    # Make the decoding A the most recently admitted: it is planned first (decodes go first), then
    # B's chunk needs a page, and the victim is A, whose planned token and pages are given back.
    s.running.reverse()
    out, _ = run_step(s)  # B 16..32 takes the last page (3)
    assert _chunks(out) == [(0, 1, 17, True), (1, 16, 16, False)] and s.kv.allocator.num_free == 0
    out, _ = run_step(s)
    assert out.preempted_ids == [0] and _chunks(out) == [(1, 16, 32, False)]
    assert s.kv.block_table(1) == [2, 3, 0] and a.state is RequestState.PREEMPTED
    check_pages(s)


def test_stop_token_and_eos_finish_with_stop():
    s = make_scheduler(num_pages=8)
    a = request(0, 5, max_new_tokens=10, eos=(3,))
    b = request(1, 5, max_new_tokens=10, stop_token_ids=(9,))
    c = request(2, 5, max_new_tokens=10, eos=(3,), ignore_eos=True)
    for r in (a, b, c):
        s.add(r)
    run_step(s, token=lambda chunk: {0: 3, 1: 9, 2: 3}[chunk.request_id])
    assert a.finish_reason is FinishReason.STOP and b.finish_reason is FinishReason.STOP
    assert not c.is_finished
    assert s.schedule().finished_ids == [0, 1]


def test_never_fitting_requests_are_rejected_with_a_reason():
    s = make_scheduler(num_pages=4, max_seq_len=100)
    too_long = request(0, 90, max_new_tokens=20)
    too_big = make_scheduler(num_pages=2)
    big = request(1, 30, max_new_tokens=10)  # 39 tokens -> 3 pages > 2
    assert not s.add(too_long) and too_long.finish_reason is FinishReason.REJECTED
    assert "exceeds the model length of 100" in too_long.error
    assert not too_big.add(big) and "whole pool has 2" in big.error
    exact = request(2, 30, max_new_tokens=3)  # 32 tokens held at most: fits 2 pages exactly
    assert too_big.add(exact)
    while too_big.has_unfinished():
        run_step(too_big)
    assert exact.finish_reason is FinishReason.LENGTH


def test_max_num_seqs_caps_running():
    s = make_scheduler(num_pages=16, max_num_seqs=2)
    for i in range(3):
        s.add(request(i, 4))
    out, _ = run_step(s)
    assert [c.request_id for c in out.chunks] == [0, 1] and len(s.waiting) == 1


def test_scheduler_validates_limits():
    from fms.cache.kv_manager import KVManager
    from fms.serving.scheduler import Scheduler

    with pytest.raises(ValueError, match="max_num_seqs"):
        Scheduler(KVManager(4, 16, 4), 0, 16, 100)
    with pytest.raises(ValueError, match="KV manager's 2 sequences"):
        Scheduler(KVManager(4, 16, 2), 3, 16, 100)


def test_decode_window_runs_several_steps_and_drops_tokens_after_a_stop():
    s = make_scheduler(num_pages=16, max_decode_steps=4)
    a = request(0, 5, max_new_tokens=10, eos=(3,))
    b = request(1, 20, max_new_tokens=3)
    s.add(a)
    s.add(b)
    out, _ = run_step(s, token=1)  # prefill both: a plain step
    assert out.num_decode_steps == 1
    s.window_ramp = 4  # past the ramp after the prefill (test_decode_windows_ramp_up_after_each_prefill)
    out = s.schedule()
    assert [(c.request_id, c.num_steps, c.token_ids) for c in out.chunks] == [(0, 4, [1]), (1, 2, [1])]
    # the schedule reserved room for every step of the window: 5 + 4 and 20 + 2 tokens
    assert s.kv.length(0) == 9 and s.kv.length(1) == 22
    results = s.update(out, [[5, 3, 7, 8], [9, 9]])
    assert results == [(0, [5, 3], True), (1, [9, 9], True)]
    assert a.output_token_ids == [1, 5, 3] and a.finish_reason is FinishReason.STOP
    assert b.output_token_ids == [1, 9, 9] and b.finish_reason is FinishReason.LENGTH
    assert s.kv.sequences == [] and s.kv.allocator.num_free == 16
    check_pages(s)


def test_decode_windows_ramp_up_after_each_prefill():
    """After a step that prefilled, windows run 1, 2, 4, ... steps up to max_decode_steps, so a request that arrives
    meanwhile waits a few steps, not a full window; a new admission starts the ramp again, and a rolled-back window
    leaves the ramp as it was."""
    s = make_scheduler(num_pages=64, max_num_seqs=4, max_decode_steps=8)
    s.add(request(0, 5, max_new_tokens=100))
    windows = [run_step(s)[0].num_decode_steps for _ in range(7)]
    assert windows == [1, 1, 2, 4, 8, 8, 8]  # the prefill step, then the ramp
    s.add(request(1, 5, max_new_tokens=100))
    windows = [run_step(s)[0].num_decode_steps for _ in range(2)]
    assert windows == [1, 1]  # the admission (with request 0's decode), then the ramp from 1
    assert s.schedule().num_decode_steps == 2 and s.window_ramp == 4
    s.rollback()  # the failed window leaves the ramp as it was: the retry runs the same 2 steps
    assert s.window_ramp == 2 and s.schedule().num_decode_steps == 2
    s.rollback()
    s.add(request(2, 5, max_new_tokens=100))
    s.schedule()  # admits request 2: the ramp restarts, unless the step is rolled back
    assert s.window_ramp == 1
    s.rollback()
    assert s.window_ramp == 2
    windows = [run_step(s)[0].num_decode_steps for _ in range(4)]
    assert windows == [1, 1, 2, 4]  # request 2 admitted, then the ramp
    s.add(request(3, 5, max_new_tokens=100))
    windows = [run_step(s)[0].num_decode_steps for _ in range(3)]
    assert windows == [1, 8, 8]  # the batch is full (max_num_seqs 4): no one else could join, full windows
    check_pages(s)


def test_decode_window_continues_with_exact_positions():
    s = make_scheduler(num_pages=16, max_decode_steps=4)
    a = request(0, 14, max_new_tokens=20)
    s.add(a)
    run_step(s, token=1)
    s.window_ramp = 4
    out, _ = run_step(s, token=2)  # positions 14..17: crosses into the second page
    assert out.num_decode_steps == 4 and a.num_computed_tokens == 18 == s.kv.length(0)
    assert a.output_token_ids == [1, 2, 2, 2, 2] and len(s.kv.block_table(0)) == 2
    out = s.schedule()
    assert out.chunks[0].start_position == 18 and out.chunks[0].token_ids == [2]
    check_pages(s)


def test_no_decode_window_while_a_request_could_be_admitted_or_pages_are_short():
    s = make_scheduler(num_pages=16, max_num_seqs=4, max_decode_steps=8)
    s.add(request(0, 5, max_new_tokens=10))
    run_step(s)
    s.add(request(1, 5, max_new_tokens=10))
    out, _ = run_step(s)
    assert out.num_decode_steps == 1  # admitted the waiting request instead
    s.window_ramp = 8
    out, _ = run_step(s)
    assert out.num_decode_steps == 8
    tight = make_scheduler(num_pages=3, max_decode_steps=8)
    for i in range(2):
        tight.add(request(i, 15, max_new_tokens=10))
    run_step(tight)  # 15 tokens each: one page each, one page free
    out, _ = run_step(tight)  # a window would need a second page for both
    assert out.num_decode_steps == 1 and not out.preempted_ids
    check_pages(tight)
