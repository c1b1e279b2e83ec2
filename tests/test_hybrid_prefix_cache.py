"""Prefix caching for Granite-4.0-H-shaped hybrids: Mamba-state checkpoints at page boundaries.

A request resumes a cached prefix only at a page whose state was checkpointed, and its greedy tokens
must equal the engine's with caching off and per-request SDPA generate(). The references have diverse
tokens (asserted), so a wrong state would change them. The checkpoint policy of this model at page
size 16 (fms.cache.kv_manager): a checkpoint takes 2 pages, periodic ones every 2 pages, plus one
where a prompt's K/V matched deeper than any checkpoint.
"""

import inspect

import pytest
import torch

from fms.cache.kv_manager import CheckpointPolicy, KVManager
from fms.cache.prefix_cache import chain_hashes
from fms.cache.state import CheckpointLayout, CheckpointStore, MambaStatePool
from fms.models import get_model
from fms.serving import LLMEngine, SamplingParams
from fms.serving.scheduler import Scheduler
from fms.utils.generation import generate

PAGE = 16
NEW = 6
GREEDY = SamplingParams(max_new_tokens=NEW, ignore_eos=True)  # generate() has no EOS here either


@pytest.fixture(scope="module")
def model():
    return get_model("granite_hybrid", "h-nano", seed=5, embedding_multiplier=1.0, init_std=0.3)


@pytest.fixture(scope="module")
def base():
    g = torch.Generator().manual_seed(7)
    return torch.randint(1, 512, (4 * PAGE + 8,), generator=g).tolist()  # pages 0-3 full, 8 tokens on page 4


def reference(model, prompts):
    out = [generate(model, [p], NEW, attn_name="sdpa")[0] for p in prompts]
    assert all(len(set(o)) >= 4 for o in out), out  # diverse: a wrong state would show
    return out


def engine(model, **options):
    return LLMEngine(model, page_size=PAGE, **{"num_pages": 64, **options})


def serve_one_by_one(engine, prompts):
    """Each prompt in its own generate() call, so every later prompt sees the earlier ones' pages."""
    return [engine.generate([p], GREEDY, use_tqdm=False)[0] for p in prompts]


def assert_no_leaks(engine):
    kv = engine.kv
    kv.check_invariants()
    assert kv.num_seqs == 0 and sorted(kv._free_slots) == list(range(kv.max_num_seqs))
    kv.prefix_cache.clear()
    kv.check_invariants()
    assert kv.allocator.num_free == kv.num_pages and kv.prefix_cache.num_checkpoints == 0


def test_policy_of_the_tiny_hybrid(model):
    e = engine(model)
    layout = CheckpointLayout.for_spec(model.cache_spec(), PAGE)
    # 2 Mamba layers x (conv 96 x 3 + ssm 4 x 16 x 16 fp32) = 10.5 kB in pages of 8 KiB (2 attention layers)
    assert layout.page_bytes == 2 * 2 * 2 * PAGE * 16 * 4 and layout.num_pages == 2
    assert e.kv.checkpoints == CheckpointPolicy(num_pages=2, interval=2, bytes=2 * layout.page_bytes)
    assert e.stats()["prefix_caching"] and e.stats()["checkpoint_interval_pages"] == 2


@pytest.mark.parametrize("shared", [PAGE - 5, 2 * PAGE, 2 * PAGE + 3])  # < a page, k pages, k pages + a few
def test_shared_prefixes_of_every_alignment(model, base, shared):
    g = torch.Generator().manual_seed(shared)
    prompts = [base[:shared] + torch.randint(1, 512, (n,), generator=g).tolist() for n in (5, 9, 20)]
    expected = reference(model, prompts)
    on, off = engine(model), engine(model, enable_prefix_caching=False)
    outs_on, outs_off = serve_one_by_one(on, prompts), serve_one_by_one(off, prompts)
    assert [o.token_ids for o in outs_on] == [o.token_ids for o in outs_off] == expected
    hit = shared // (2 * PAGE) * 2 * PAGE  # whole pages up to the last periodic checkpoint in the shared part
    assert [o.num_cached_tokens for o in outs_on] == [0, hit, hit]
    stats = on.stats()
    assert stats["prefix_cache_hit_tokens"] == 2 * hit and (stats["num_cached_checkpoints"] > 0) == (hit > 0)
    assert stats["checkpoint_bytes"] == stats["checkpoint_pages"] // 2 * on.kv.checkpoints.bytes
    assert_no_leaks(on)


def _changed_at(prompt, index):
    out = list(prompt)
    out[index] = out[index] % 511 + 1
    return out


def test_prompts_differing_at_page_edges_never_reuse_that_page_or_its_state(model):
    """Changed at the last token of page 0, the first of page 1, the last of page 1, the first of page 2,
    the last prompt token; served in that order after the base prompt."""
    g = torch.Generator().manual_seed(13)  # a prompt this tiny model answers differently to most changes
    base = torch.randint(1, 512, (4 * PAGE + 8,), generator=g).tolist()
    changes = [PAGE - 1, PAGE, 2 * PAGE - 1, 2 * PAGE, len(base) - 1]
    prompts = [base] + [_changed_at(base, i) for i in changes]
    expected = reference(model, prompts)
    assert len({tuple(o) for o in expected}) >= 4  # a wrong page or state would likely change the tokens
    e = engine(model)
    outs = serve_one_by_one(e, prompts)
    assert [o.token_ids for o in outs] == expected
    cached = [o.num_cached_tokens for o in outs]
    assert all(n <= i // PAGE * PAGE for n, i in zip(cached[1:], changes))  # never the differing page
    # base checkpoints after pages 2 and 4 (periodic); the prompt changed at 16 matched page 0's K/V but
    # no state, so it checkpointed page 0's end (divergence), which the one changed at 31 then resumes from
    assert cached == [0, 0, 0, PAGE, 2 * PAGE, 4 * PAGE]
    assert_no_leaks(e)


@pytest.mark.parametrize("budget, max_decode_steps, hits", [
    (16, 16, [0, 64, 64]),  # chunks end on the boundaries: the scan's final state is the checkpoint
    (21, 1, [0, 64, 64]),  # boundaries inside chunks (emitted by the scan); the prompt's last token alone, run
                           # as a one-step decode row: captured from its slot after the step
    (21, 16, None),  # ... in a 16-step decode window: see below
])
def test_chunked_prefill_and_decode_windows_keep_checkpoints(model, base, budget, max_decode_steps, hits):
    if hits is None:
        # a scheduler that caps the row's window at KVManager.decode_steps_until_checkpoint (1 here) keeps the
        # checkpoint; otherwise the state after the window's first step is gone, and the next request resumes
        # at 32 and checkpoints 64 (where its K/V match ended)
        caps = "decode_steps_until_checkpoint" in inspect.getsource(Scheduler._plan_decode_window)
        hits = [0, 64, 64] if caps else [0, 32, 64]
    prompts = [base[:4 * PAGE], base[:4 * PAGE] + [7, 8, 9], base[:4 * PAGE] + [9, 9]]
    expected = reference(model, prompts)
    e = engine(model, max_num_batched_tokens=budget, max_decode_steps=max_decode_steps)
    outs = serve_one_by_one(e, prompts)
    assert [o.token_ids for o in outs] == expected
    assert [o.num_cached_tokens for o in outs] == hits
    assert_no_leaks(e)


def test_caching_on_equals_off_under_page_pressure_with_preemption(model, base):
    g = torch.Generator().manual_seed(3)
    prompts = [base[:40] + torch.randint(1, 512, (n,), generator=g).tolist() for n in (3, 11, 17, 24)]
    new = 16  # decodes that cross pages, so running requests need pages and get preempted
    expected = [generate(model, [p], new, attn_name="sdpa")[0] for p in prompts]
    assert all(len(set(o)) >= 8 for o in expected)
    params = SamplingParams(max_new_tokens=new, ignore_eos=True)
    outs = {}
    for name, caching in (("on", True), ("off", False)):
        e = engine(model, num_pages=7, max_num_batched_tokens=32, enable_prefix_caching=caching)
        head = e.generate(prompts[:1], params, use_tqdm=False)
        outs[name] = head + e.generate(prompts[1:], params, use_tqdm=False)
        assert e.stats()["num_preemptions"] > 0
        if caching:
            assert e.stats()["prefix_cache_hit_tokens"] > 0
            assert_no_leaks(e)
    assert [o.token_ids for o in outs["on"]] == [o.token_ids for o in outs["off"]] == expected


def test_abort_mid_prefill_frees_pages_checkpoints_and_slot(model, base):
    e = engine(model, max_num_batched_tokens=20)
    e.generate([base], GREEDY, use_tqdm=False)  # cache its pages and checkpoints
    rid = e.add_request(base[:48] + [1, 2, 3, 4, 5], GREEDY)
    e.step()  # resumed at the checkpoint after page 2, computing on (holding new checkpoints' pages)
    e.abort(rid)
    assert_no_leaks(e)


class InjectedFault(RuntimeError):
    pass


def test_a_step_failing_mid_forward_leaves_no_partial_checkpoint(model, base):
    """The last Mamba layer raises once, after the first one wrote its part of the step's checkpoints: the
    engine rolls the step back (its requests recompute), nothing half-written is ever cached, outputs equal
    the references and nothing leaks."""
    from fms.modules.mamba_layer import MambaLayer

    g = torch.Generator().manual_seed(5)
    prompts = [base[:50] + torch.randint(1, 512, (n,), generator=g).tolist() for n in (4, 20, 9)]
    expected = reference(model, prompts)
    e = engine(model, max_num_batched_tokens=24)
    e.generate(prompts[:1], GREEDY, use_tqdm=False)  # cache the shared pages and checkpoints
    layer = [m for m in model.modules() if isinstance(m, MambaLayer)][-1]
    original, calls = layer.forward, [0]

    def forward(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:
            assert kwargs["meta"].checkpoints is not None  # the failing step computes checkpoints
            raise InjectedFault("injected")
        return original(*args, **kwargs)

    layer.forward = forward
    try:
        ids = [e.add_request(p, GREEDY) for p in prompts[1:]]
        faults = 0
        while e.has_unfinished_requests():
            try:
                e.step()
            except InjectedFault:
                faults += 1
                e.kv.check_invariants()
    finally:
        del layer.forward
    assert faults == 1
    assert [e.pop_output(i).token_ids for i in ids] == expected[1:]
    assert_no_leaks(e)


def test_hit_rate_is_at_least_90_percent_of_attention_only(model):
    """Two system prompts (one 4 pages long: a whole number of checkpoint intervals; one of 50 tokens: not),
    each followed by a question; requests arrive in waves. Hits: tokens served from cache over prompt tokens."""
    attention = get_model("granite_hybrid", "h-nano", seed=5, embedding_multiplier=1.0, init_std=0.3,
                          layer_types=("attention",) * 4)
    g = torch.Generator().manual_seed(11)
    systems = [torch.randint(1, 512, (n,), generator=g).tolist() for n in (64, 50)]
    waves = [[s + torch.randint(1, 512, (int(n),), generator=g).tolist() for s in systems
              for n in torch.randint(3, 30, (count,), generator=g)] for count in (1, 3, 3)]
    rates = {}
    for name, m in (("hybrid", model), ("attention", attention)):
        e = engine(m, num_pages=128)
        for wave in waves:
            e.generate(wave, SamplingParams(max_new_tokens=2, ignore_eos=True), use_tqdm=False)
        stats = e.stats()
        rates[name] = stats["prefix_cache_hit_tokens"] / stats["prefix_cache_queried_tokens"]
    assert rates["attention"] > 0.5
    assert rates["hybrid"] >= 0.9 * rates["attention"], rates


# -- the manager and the store, without a model ----------------------------------------------------------


def test_free_and_undo_release_everything_a_step_took():
    """The engine's failed step re-queues its requests and frees them: every page, slot and checkpoint
    (being computed, or resumed from) must come back; undo() takes back one reservation exactly."""
    kv = KVManager(40, 4, 3, enable_prefix_caching=True, checkpoints=CheckpointPolicy(num_pages=2, interval=2))
    tokens = list(range(1, 20))
    hashes = []
    kv.add("a", kv.match_prefix(tokens, hashes), 0, num_query_tokens=len(tokens))
    grants = kv.reserve(["a"], [19])
    assert [b for b, _ in grants[0].captures] == [8, 16]
    kv.commit_computed("a", tokens, 19, hashes)
    kv.free("a")
    other = tokens[:12] + [90, 91, 92]
    prefix = kv.match_prefix(other, hashes_b := [])
    assert len(prefix) == 2  # resumes at the checkpoint after 8 tokens
    _, grant = kv.add("b", prefix, 8, num_query_tokens=len(other))
    assert grant.restore and kv.prefix_cache.checkpoint_after_page(prefix[-1]).holders == 1
    before = kv.stats()
    grants = kv.reserve(["b"], [7])
    assert [b for b, _ in grants[0].captures] == [12]  # where its K/V match (3 pages) ran past the checkpoint
    kv.undo(grants)
    assert kv.stats() == before and kv.length("b") == 8
    kv.reserve(["b"], [7])
    kv.free("b")  # a failed step: never committed
    kv.check_invariants()
    kv.prefix_cache.clear()
    assert kv.allocator.num_free == 40 and kv.num_seqs == 0 and kv.prefix_cache.num_checkpoints == 0
    assert len(hashes_b) == 3


def test_store_round_trip_and_scrub():
    spec = get_model("granite_hybrid", "h-nano", seed=5, init_std=0.3).cache_spec()
    layout = CheckpointLayout.for_spec(spec, PAGE)
    num_pages = 6
    g = torch.Generator().manual_seed(0)
    kv = [torch.randn(spec.num_kv_heads, (num_pages + 1) * PAGE, spec.head_dim, generator=g)
          for _ in range(layout.num_tensors)]
    kept = [t.clone() for t in kv]
    pool = MambaStatePool(spec.state_spec, 3, "cpu")
    for conv, ssm in zip(pool.conv, pool.ssm):
        conv.copy_(torch.randn(conv.shape, generator=g))
        ssm.copy_(torch.randn(ssm.shape, generator=g))
    store = CheckpointStore(layout, kv, pool)
    store.capture([2, 0], [(4, 1), (5, 3)])
    for t, k in zip(kv, kept):  # only pages 1, 3, 4, 5 were written
        for page in (0, 2, 6):
            assert torch.equal(t[:, page * PAGE:(page + 1) * PAGE], k[:, page * PAGE:(page + 1) * PAGE])
    expected = [(c[[2, 0]].clone(), s[[2, 0]].clone()) for c, s in zip(pool.conv, pool.ssm)]
    for conv, ssm in zip(pool.conv, pool.ssm):
        conv.zero_()
        ssm.zero_()
    store.restore([1, 2], [(4, 1), (5, 3)])
    for (conv, ssm), (c, s) in zip(zip(pool.conv, pool.ssm), expected):
        assert torch.equal(conv[[1, 2]], c) and torch.equal(ssm[[1, 2]], s)  # bit for bit
    store.scrub([4, 1])
    for t in kv:
        assert not t[:, 4 * PAGE:5 * PAGE].any() and not t[:, PAGE:2 * PAGE].any() and t[:, 3 * PAGE:4 * PAGE].any()


def test_pages_a_checkpoint_gave_back_are_zeroed_at_the_next_apply(model):
    """Checkpoint bytes read as K/V may be NaN (0 * NaN is NaN even where attention masks them out): pages a
    checkpoint gives back (here: a failed step's capture, freed by the rollback) are zeroed by the device's next
    apply, before any step writes or reads them."""
    from fms.modules.attention import get_attention_op

    spec = model.cache_spec()
    kv = KVManager(8, PAGE, 2, enable_prefix_caching=True, checkpoints=CheckpointLayout.for_spec(spec, PAGE).policy())
    cache = get_attention_op("paged").create_cache(spec, max_batch_size=2, max_seq_len=128, manager=kv)
    for t in (*cache.keys, *cache.values):
        t.fill_(float("nan"))
    kv.add("a", [], 0, num_query_tokens=40)
    grants = kv.reserve(["a"], [40])
    (boundary, pages), = grants[0].captures
    assert boundary == 2 * PAGE
    cache.apply(grants)
    kv.free("a")  # the step failed before it was committed
    cache.apply([])
    for t in (*cache.keys, *cache.values):
        for page in pages:
            assert not t[:, page * PAGE:(page + 1) * PAGE].any()
        assert t[:, grants[0].pages[0] * PAGE].isnan().all()  # K/V pages are not touched
    assert kv.take_pages_to_scrub() == []


def test_decode_window_limit_stops_at_a_wanted_checkpoint():
    """A prompt whose last token is left alone by chunked prefill, at a boundary it checkpoints: a decode
    window that stops after that token lets the device capture it (the scheduler caps its window with this)."""
    kv = KVManager(20, 4, 2, enable_prefix_caching=True, checkpoints=CheckpointPolicy(num_pages=1, interval=2))
    kv.add("a", [], 0, num_query_tokens=16)  # boundaries 8 and 16 wanted
    kv.reserve(["a"], [15])
    assert kv.decode_steps_until_checkpoint("a") == 1
    kv.reserve(["a"], [1])
    assert kv.decode_steps_until_checkpoint("a") > 10**9  # past the prompt: nothing left to checkpoint
    kv.add("b", [], 0, num_query_tokens=13)  # boundary 8 only
    kv.reserve(["b"], [12])
    assert kv.decode_steps_until_checkpoint("b") > 10**9
    kv.free("a")
    kv.free("b")


def test_hashes_key_checkpoints_like_pages():
    kv = KVManager(20, 4, 2, enable_prefix_caching=True, checkpoints=CheckpointPolicy(num_pages=1, interval=1))
    tokens = list(range(1, 14))
    hashes = []
    kv.add("a", [], 0, num_query_tokens=len(tokens))
    kv.reserve(["a"], [13])
    kv.commit_computed("a", tokens, 13, hashes)
    keys = chain_hashes(tokens, 4, 3, [])
    assert all(kv.prefix_cache.checkpoint_at(k) is not None for k in keys)
    kv.free("a")


# -- property: random shared-prefix workloads with evictions, failed steps and aborts -----------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fms.cache.allocator import OutOfPagesError  # noqa: E402


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_random_workloads_leak_no_slot_checkpoint_or_page(data):
    """A host-only scheduler over the KV manager: requests share a few prefixes, run in random chunks, and
    finish, abort, fail a step (undo, or free as the engine's rollback does) or get preempted when pages run
    out. After every operation the manager's invariants hold; a resumed request's checkpoint always holds the
    state of exactly its prefix (each capture is tagged with the tokens it covers, as the device would write
    them); at the end every page, slot and checkpoint is back."""
    ps = 4
    num_pages = data.draw(st.integers(8, 20), "num_pages")
    policy = CheckpointPolicy(num_pages=data.draw(st.integers(1, 3), "c"), interval=data.draw(st.integers(1, 3), "k"))
    kv = KVManager(num_pages, ps, 3, enable_prefix_caching=True, checkpoints=policy)
    prefixes = [[p * 100 + i for i in range(data.draw(st.integers(0, 20), "prefix"))] for p in range(3)]
    written: dict[tuple[int, ...], tuple[int, ...]] = {}  # checkpoint pages -> the tokens its state covers
    running: dict[int, dict] = {}
    next_id = 0
    for _ in range(data.draw(st.integers(10, 60), "ops")):
        op = data.draw(st.sampled_from(["admit", "step", "step", "step", "finish", "abort"]), "op")
        if op == "admit" and kv.num_seqs < 3:
            tokens = data.draw(st.sampled_from(prefixes), "p") + [next_id * 1000 + i for i in range(
                data.draw(st.integers(1, 9), "tail"))]
            hashes: list[int] = []
            prefix = kv.match_prefix(tokens, hashes)
            _, grant = kv.add(next_id, prefix, len(prefix) * ps, num_query_tokens=len(tokens))
            if grant is not None:
                assert written[grant.restore] == tuple(tokens[:len(prefix) * ps])  # its very prefix's state
            running[next_id] = dict(tokens=tokens, hashes=hashes, done=len(prefix) * ps)
            next_id += 1
        elif op == "step" and running:
            rid = data.draw(st.sampled_from(sorted(running)), "rid")
            r = running[rid]
            left = len(r["tokens"]) - r["done"]
            if left == 0:
                continue
            n = data.draw(st.integers(1, left), "n")
            try:
                grants = kv.reserve([rid], [n])
            except OutOfPagesError:
                victim = max(running)  # preempt the newest, as the scheduler does
                kv.free(victim)
                del running[victim]
                continue
            for grant in grants:
                for boundary, pages in grant.captures:
                    written[pages] = tuple(r["tokens"][:boundary])
            outcome = data.draw(st.sampled_from(["ok", "ok", "undo", "rollback"]), "outcome")
            if outcome == "undo":
                kv.undo(grants)
            elif outcome == "rollback":
                kv.free(rid)
                del running[rid]
            else:
                r["done"] += n
                kv.commit_computed(rid, r["tokens"], r["done"], r["hashes"])
        elif op in ("finish", "abort") and running:
            rid = data.draw(st.sampled_from(sorted(running)), "rid")
            kv.free(rid)
            del running[rid]
        kv.check_invariants()
    for rid in list(running):
        kv.free(rid)
    kv.check_invariants()
    kv.prefix_cache.clear()
    kv.check_invariants()
    assert kv.allocator.num_free == num_pages and kv.prefix_cache.num_checkpoints == 0
    assert sorted(kv._free_slots) == [0, 1, 2] and not kv._capturing and not kv._resumed_from and not kv._wanted
