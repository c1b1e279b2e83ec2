"""A failed step harms no request: faults injected into the model's forward (the k-th call raises),
into update() and as interrupts. After each fault the engine steps on; every request's output equals
the fault-free run's, and no page, slot or refcount leaks. A request that fails by itself finishes
with finish_reason "error" while the others go on."""

import contextlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fms.serving import LLMEngine, SamplingParams
from fms.utils.generation import Generator, generate
from tests.serving.helpers import check_pages

pytestmark = pytest.mark.paged

VOCAB = 512  # llama "nano"


class InjectedFault(RuntimeError):
    pass


@contextlib.contextmanager
def faulty_forward(model, fail_on=(), exc=InjectedFault, when=None):
    """model.forward raises exc on the calls numbered in fail_on (1-based), or when when(tokens) is true."""
    original = model.forward
    calls = [0]

    def forward(x, *args, **kwargs):
        calls[0] += 1
        if calls[0] in fail_on or (when is not None and when(x)):
            raise exc(f"injected fault at forward call {calls[0]}")
        return original(x, *args, **kwargs)

    model.forward = forward
    try:
        yield calls
    finally:
        del model.forward  # the class's forward again


@pytest.fixture(scope="module")
def model(llama_nano):
    return llama_nano


def workload(seed: int, n: int, shared: bool):
    """n prompts of 3..40 tokens (with shared: half start with one 20-token prefix); every third
    request samples with its own seed, the rest are greedy."""
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(1, VOCAB, (20,), generator=g).tolist()
    prompts, params = [], []
    for i in range(n):
        length = int(torch.randint(3, 41, (1,), generator=g))
        prompt = torch.randint(1, VOCAB, (length,), generator=g).tolist()
        if shared and i % 2 == 0:
            prompt = prefix + prompt[:8]
        prompts.append(prompt)
        new = int(torch.randint(4, 25, (1,), generator=g))
        params.append(SamplingParams(max_new_tokens=new, temperature=0.9, seed=1000 + i) if i % 3 == 2
                      else SamplingParams(max_new_tokens=new))
    return prompts, params


def make_engine(model, prefix: bool, window: int, num_pages: int = 6):
    # 6 pages of 16 tokens for up to 6 requests of up to 64 tokens: preemption and prefix eviction
    return LLMEngine(model, page_size=16, num_pages=num_pages, max_num_seqs=6, max_num_batched_tokens=48,
                     enable_prefix_caching=prefix, max_decode_steps=window)


def run(engine, prompts, params):
    """Drive the step API to the end, stepping on after every failure; -> (outputs by request, failures)."""
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    failures = 0
    streamed = {rid: [] for rid in ids}  # what step() reported, token by token
    for _ in range(2000):  # bounded
        if not engine.has_unfinished_requests():
            break
        try:
            for rid, tokens, _ in engine.step():
                streamed[rid] += tokens
        except (InjectedFault, KeyboardInterrupt):
            failures += 1
    else:
        pytest.fail("the engine did not finish the workload in 2000 steps")
    outs = [engine.pop_output(rid) for rid in ids]
    for rid, out in zip(ids, outs):  # every token was reported once, by the step that made it
        assert streamed[rid] == out.token_ids, rid
    return [(o.token_ids, o.finish_reason) for o in outs], failures


def assert_no_leaks(engine):
    kv = engine.kv
    assert kv.num_seqs == 0 and not engine.requests
    assert engine.scheduler.suspects == [] and not engine.scheduler.running and not engine.scheduler.waiting
    check_pages(engine.scheduler)  # refcount of every page = its holders; none held by a sequence now
    stats = engine.stats()
    assert stats["num_used_pages"] == 0
    assert stats["num_free_pages"] + stats["num_cached_pages"] == stats["num_pages"]


CONFIGS = [(False, 1), (True, 1), (False, 4), (True, 4)]  # (prefix caching, decode window)


@pytest.fixture(scope="module")
def references(model):
    """The fault-free outputs per config (and the number of forwards each run takes)."""
    refs = {}
    prompts, params = workload(0, 7, shared=True)
    for prefix, window in CONFIGS:
        engine = make_engine(model, prefix, window)
        with faulty_forward(model) as calls:
            outs, failures = run(engine, prompts, params)
        stats = engine.stats()
        assert failures == 0 and stats["num_preemptions"] > 0  # under page pressure
        assert (stats["prefix_cache_hit_tokens"] > 0) == prefix and (stats["num_decode_windows"] > 0) == (window > 1)
        refs[prefix, window] = outs, calls[0]
    outs = refs[False, 1][0]
    assert len({t for tokens, _ in outs for t in tokens}) >= 12  # diverse tokens: a mix-up would show
    return prompts, params, refs


@pytest.mark.parametrize("prefix,window", CONFIGS, ids=["plain", "prefix", "window", "prefix+window"])
def test_a_fault_at_every_forward_leaves_outputs_exact(model, references, prefix, window):
    prompts, params, refs = references
    expected, num_forwards = refs[prefix, window]
    assert num_forwards >= 40
    for k in range(1 + window % 3, num_forwards + 1, 3):  # every third forward (CI time), offset per config
        engine = make_engine(model, prefix, window)
        with faulty_forward(model, fail_on={k}):
            outs, failures = run(engine, prompts, params)
        assert failures == 1, k
        assert outs == expected, f"fault at forward {k}"
        assert engine.scheduler.num_failed_steps == 1
        assert_no_leaks(engine)


def test_interrupts_and_repeated_faults_roll_back_too(model, references):
    prompts, params, refs = references
    expected, num_forwards = refs[True, 4]
    engine = make_engine(model, True, 4)
    with faulty_forward(model, fail_on={2, 3, 7}, exc=KeyboardInterrupt):
        outs, failures = run(engine, prompts, params)
    assert failures == 3 and outs == expected
    assert_no_leaks(engine)
    # two faults in a row hit the isolated requests of the first: still no request is harmed
    engine = make_engine(model, False, 1)
    with faulty_forward(model, fail_on={5, 6}):
        outs, failures = run(engine, prompts, params)
    assert failures == 2 and outs == refs[False, 1][0]
    assert_no_leaks(engine)


@pytest.mark.parametrize("fail_on", [1, 2, 5, 9])
def test_a_fault_inside_update_is_rolled_back(model, references, fail_on):
    """The KV manager raising in the middle of update(), after some requests got their tokens."""
    prompts, params, refs = references
    expected, _ = refs[True, 1]
    engine = make_engine(model, True, 1)
    commit, calls = engine.kv.commit_computed, [0]

    def commit_computed(*args, **kwargs):
        calls[0] += 1
        if calls[0] == fail_on:
            raise InjectedFault("injected fault in update()")
        return commit(*args, **kwargs)

    engine.kv.commit_computed = commit_computed
    outs, failures = run(engine, prompts, params)
    assert failures == 1 and outs == expected
    assert_no_leaks(engine)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10_000), faults=st.sets(st.integers(1, 40), max_size=2),
       prefix=st.booleans(), window=st.sampled_from([1, 3]), num_pages=st.integers(6, 12))
def test_property_faults_anywhere(model, seed, faults, prefix, window, num_pages):
    prompts, params = workload(seed, 5, shared=seed % 2 == 0)
    params = [SamplingParams(max_new_tokens=p.max_new_tokens) for p in params]  # greedy
    clean = make_engine(model, prefix, window, num_pages)
    expected, _ = run(clean, prompts, params)
    engine = make_engine(model, prefix, window, num_pages)
    with faulty_forward(model, fail_on=faults):
        outs, failures = run(engine, prompts, params)
    assert failures == engine.scheduler.num_failed_steps <= len(faults)
    assert outs == expected
    assert_no_leaks(engine)


POISON = 7  # a token id the faulty model cannot take


def test_a_request_that_fails_alone_errors_and_the_others_go_on(model):
    g = torch.Generator().manual_seed(5)
    good = [torch.randint(8, VOCAB, (n,), generator=g).tolist() for n in (5, 12, 30)]
    bad = [9, 10, POISON, 11]
    params = SamplingParams(max_new_tokens=6)
    expected = generate(model, good, 6, attn_name="sdpa")
    assert len({t for seq in expected for t in seq}) >= 8
    engine = make_engine(model, True, 4, num_pages=16)
    with faulty_forward(model, when=lambda x: bool((x == POISON).any())) as calls:
        original = model.forward

        def bounded(*args, **kwargs):  # a broken isolation would loop forever: stop it
            if calls[0] > 200:
                raise KeyboardInterrupt("over 200 forwards: the poisoned request was never isolated")
            return original(*args, **kwargs)

        model.forward = bounded
        outs = engine.generate(good[:2] + [bad] + good[2:], params, use_tqdm=False)
        model.forward = original
    assert engine.scheduler.num_failed_steps == 3  # in the batch, then twice alone
    assert [o.token_ids for o in outs[:2] + outs[3:]] == expected
    assert all(o.finish_reason != "error" for o in outs[:2] + outs[3:])
    assert outs[2].finish_reason == "error" and outs[2].token_ids == []
    assert "injected fault" in outs[2].error and "alone" in outs[2].error
    assert_no_leaks(engine)


def test_two_faults_in_a_row_spare_a_request_that_was_alone(model):
    """The request was alone in the first failed step and alone again in its retry (hypothesis found it:
    it used to count the first step as a failure alone and finish the request with an error)."""
    prompt = torch.randint(8, VOCAB, (10,), generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(max_new_tokens=14)
    expected = generate(model, [prompt], 14, attn_name="sdpa")
    engine = make_engine(model, False, 1)
    with faulty_forward(model, fail_on={4, 5}):
        outs, failures = run(engine, [prompt], [params])
    assert failures == 2
    assert outs == [(expected[0], "length")]
    assert_no_leaks(engine)


def test_a_fault_that_touches_no_request_is_raised_by_generate(model):
    engine = make_engine(model, False, 1)
    schedule = engine.scheduler.schedule
    engine.scheduler.schedule = lambda: (_ for _ in ()).throw(InjectedFault("the scheduler broke"))
    with pytest.raises(InjectedFault, match="the scheduler broke"):
        engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=2), use_tqdm=False)
    engine.scheduler.schedule = schedule
    assert_no_leaks(engine)  # generate() released its request on the way out


def test_an_interrupted_generate_leaves_nothing_and_the_next_call_is_exact(model):
    prompts, params = workload(3, 5, shared=False)
    engine = make_engine(model, True, 4)
    expected = [o.token_ids for o in engine.generate(prompts, params, use_tqdm=False)]
    with faulty_forward(model, fail_on={3}, exc=KeyboardInterrupt):
        with pytest.raises(KeyboardInterrupt):
            engine.generate(prompts, params, use_tqdm=False)
    assert_no_leaks(engine)
    assert [o.token_ids for o in engine.generate(prompts, params, use_tqdm=False)] == expected


@pytest.mark.parametrize("attn_name", ["sdpa", "paged"])
def test_static_generate_after_a_failed_call_is_exact(model, attn_name):
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in (4, 9, 17)]
    gen = Generator(model, attn_name, max_batch_size=3, max_seq_len=64, decode_window=2)
    expected = gen.generate(prompts, 6)
    for k in (1, 3):
        with faulty_forward(model, fail_on={k}):
            with pytest.raises(InjectedFault):
                gen.generate(prompts, 6)
        assert gen.kv.num_seqs == 0 and gen.kv.stats().num_used_pages == 0
        assert gen.generate(prompts, 6) == expected


def test_streamed_requests_are_released(model):
    """After 1,000 streamed requests the engine holds none of them."""
    engine = LLMEngine(model, page_size=16, num_pages=128, max_num_seqs=64, max_num_batched_tokens=512)
    prompts = [[1 + i % 500, 2 + i % 7] for i in range(1000)]
    finished = 0
    for _, tokens, done in engine.stream(prompts, SamplingParams(max_new_tokens=2)):
        finished += done
        assert len(engine.requests) == 1000 - finished  # a request is let go as its last tokens come out
        # finished but not yet yielded: at most one step's worth
        assert engine.stats()["num_finished_held_requests"] <= 64
    assert finished == 1000 and not engine.requests
    assert engine.kv.num_seqs == 0
    # a stream closed early aborts and releases what it had not finished
    stream = engine.stream(prompts[:10], SamplingParams(max_new_tokens=4))
    next(stream)
    stream.close()
    assert not engine.requests and engine.kv.num_seqs == 0


def test_text_stop_strings_and_logprobs_survive_faults():
    """Faults in the forward and in the text step (detokenizer) leave text, stop strings and logprobs as
    in the fault-free run: a rolled-back request's detokenizer and logprobs are rebuilt from the tokens
    it kept."""
    from fms.models import get_model
    from fms.serving.detokenizer import IncrementalDetokenizer
    from fms.utils.tokenizers import get_tokenizer

    model = get_model("llama", "micro", seed=0, init_std=0.5)  # the shipped tokenizer's vocabulary
    tokenizer = get_tokenizer()
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(5, 2000, (n,), generator=g).tolist() for n in (6, 13, 21, 30)]

    def params():
        return [SamplingParams(max_tokens=20, ignore_eos=True, stream_text=True),
                SamplingParams(max_tokens=20, ignore_eos=True, logprobs=3),
                SamplingParams(max_tokens=20, ignore_eos=True, temperature=0.8, seed=9, logprobs=0),
                SamplingParams(max_tokens=20, ignore_eos=True, stop=[stop])]

    def run_text(engine, faults=(), detok_faults=()):
        ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params())]
        add_tokens, calls = IncrementalDetokenizer.add_tokens, [0]

        def flaky_add_tokens(self, token_ids):
            calls[0] += 1
            if calls[0] in detok_faults:
                raise InjectedFault("injected fault in the detokenizer")
            return add_tokens(self, token_ids)

        IncrementalDetokenizer.add_tokens = flaky_add_tokens
        failures = 0
        try:
            with faulty_forward(model, fail_on=set(faults)):
                for _ in range(500):
                    if not engine.has_unfinished_requests():
                        break
                    try:
                        engine.step()
                    except InjectedFault:
                        failures += 1
        finally:
            IncrementalDetokenizer.add_tokens = add_tokens
        outs = [engine.pop_output(rid) for rid in ids]
        return [(o.token_ids, o.text, o.finish_reason, o.logprobs) for o in outs], failures

    def same(got, want) -> bool:
        """Tokens, text and finish reason exactly; logprobs to 1e-3 (a rolled-back request recomputes
        its K/V in a prefill, whose summation order differs from decode's)."""
        if [g[:3] for g in got] != [w[:3] for w in want]:
            return False
        for g, w in zip(got, want):
            if (g[3] is None) != (w[3] is None) or (g[3] is not None and len(g[3]) != len(w[3])):
                return False
            for a, b in zip(g[3] or (), w[3] or ()):
                if abs(a.logprob - b.logprob) > 1e-3 or [t for t, _ in a.top] != [t for t, _ in b.top] or any(
                        abs(x - y) > 1e-3 for (_, x), (_, y) in zip(a.top, b.top)):
                    return False
        return True

    def make():
        return LLMEngine(model, tokenizer, page_size=16, num_pages=8, max_num_seqs=4, max_decode_steps=4)

    stop = "x"  # replaced below by a string from the fault-free text of request 3
    probe, _ = run_text(make())
    text3 = probe[3][1]
    stop = text3[len(text3) // 2: len(text3) // 2 + 3]
    assert stop.strip()
    expected, failures = run_text(make())
    assert failures == 0 and expected[3][2] == "stop" and len(expected[3][0]) < 20
    assert len(expected[1][3]) == 20 and len(expected[2][3]) == 20 and expected[0][1]
    assert len({t for tokens, *_ in expected for t in tokens}) >= 12
    for faults, detok_faults in [((2,), ()), ((5, 9), ()), ((), (1,)), ((), (4, 7)), ((3,), (6,))]:
        outs, failures = run_text(make(), faults, detok_faults)
        assert failures == len(faults) + len(detok_faults)
        assert same(outs, expected), (faults, detok_faults)


def _state(engine):
    """Everything a step may change on the host: requests, queues, tables, refcounts, slots, prefix cache."""
    kv, sched = engine.kv, engine.scheduler
    pc = kv.prefix_cache
    return (
        {rid: (r.state, r.num_computed_tokens, list(r.output_token_ids), r.num_cached_tokens, r.finish_reason)
         for rid, r in engine.requests.items()},
        [r.request_id for r in sched.running], [r.request_id for r in sched.waiting],
        {s: (kv.block_table(s), kv.length(s), kv.slot_of(s)) for s in kv.sequences},
        list(kv.allocator._refcounts), sorted(kv.allocator._free_heap),
        None if pc is None else (dict(pc._page_of), list(pc._evictable)),
    )


@pytest.mark.parametrize("window", [1, 4])
def test_a_failed_step_of_an_attention_model_leaves_everything_as_before(model, window):
    """Without preemption (a roomy pool) a step that fails in the forward is undone exactly: requests,
    queues, page tables, refcounts, the free list, slots and the prefix cache equal their state before
    the step; the run then ends as the fault-free one."""
    prompts, params = workload(0, 7, shared=True)
    expected, _ = run(make_engine(model, True, window, num_pages=64), prompts, params)
    checked = 0
    for k in range(1, 40, 3):
        engine = make_engine(model, True, window, num_pages=64)
        ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
        with faulty_forward(model, fail_on={k}):
            for _ in range(500):
                if not engine.has_unfinished_requests():
                    break
                before = _state(engine)
                try:
                    engine.step()
                except InjectedFault:
                    assert _state(engine) == before, f"fault at forward {k}"
                    checked += 1
        assert engine.stats()["num_preemptions"] == 0
        assert [(o.token_ids, o.finish_reason) for o in (engine.pop_output(i) for i in ids)] == expected
        assert_no_leaks(engine)
    assert checked >= 10
