"""Attention variants (sliding window, ALiBi, softcap) through the ops' caches (sdpa, flex, paged) vs a dense reference.

Each test drives an op like a generation loop would: prepare -> attend -> release_out_of_window, with
rows of different lengths, for one-shot prefill, chunked prefill and decode. The reference is SDPA
with a float mask (causal, window, ALiBi) built here from logical positions, in float64.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from fms.modules.attention import get_attention_op
from fms.cache.spec import KVCacheSpec
from fms.modules.masks import AttentionVariant

FP32_ATOL = 2e-5
FP32_RTOL = 2e-5
PAGE_SIZE = 16
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 4, 2, 8  # GQA 2:1; a power of two so the ALiBi slopes are 2^(-8i/H)
SCALE = HEAD_DIM**-0.5

VARIANTS = {
    "causal": AttentionVariant(),
    "window5": AttentionVariant(sliding_window=5),  # smaller than a page
    "window16": AttentionVariant(sliding_window=PAGE_SIZE),  # one page
    "window20": AttentionVariant(sliding_window=20),  # larger than a page, spans up to 3 pages
    "alibi": AttentionVariant(alibi=True),
    "softcap": AttentionVariant(softcap=2.0),
    "window20_alibi_softcap": AttentionVariant(sliding_window=20, alibi=True, softcap=2.0),
}

# name -> (prompt lengths per row, prefill chunk size (None: one step), decode steps). Rows of one step
# mix prefill chunks and decode tokens, as continuous batching does; lengths cross page boundaries.
SCHEDULES = {
    "prefill": ([PAGE_SIZE - 1, PAGE_SIZE + 1, 1], None, 0),
    "chunked_prefill_and_decode": ([33, 17], 13, 2),
}


def reference(q, k, v, q_pos, variant):
    """q (H, Tq, D) at positions q_pos (Tq,); k, v (Hkv, L, D) at positions 0..L-1 -> (H, Tq, D)."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
    qp = q_pos[:, None].double()
    kp = torch.arange(k.shape[1], dtype=torch.float64)[None, :]
    visible = kp <= qp
    if variant.sliding_window is not None:
        visible &= qp - kp < variant.sliding_window
    mask = torch.zeros(visible.shape, dtype=torch.float64).masked_fill(~visible, float("-inf"))[None]  # (1, Tq, L)
    if variant.alibi:
        slopes = torch.tensor([2.0 ** (-8.0 * i / NUM_HEADS) for i in range(1, NUM_HEADS + 1)], dtype=torch.float64)
        mask = mask + slopes[:, None, None] * (kp - qp)[None]  # (H, Tq, L)
    if variant.softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=SCALE)
    scores = q @ k.transpose(-1, -2) * SCALE
    scores = variant.softcap * torch.tanh(scores / variant.softcap) + mask
    return scores.softmax(-1) @ v


def check_block_lists(meta, cache, rows, counts, starts, variant):
    """What a compiled FlexAttention kernel would see: only the listed pages, mask_mod on partial ones only.

    Eager FlexAttention (CPU) evaluates mask_mod on every pool slot and ignores the block lists, so
    the lists are checked here: per real query, listed pages are distinct, full pages are entirely
    visible, and the positions they cover are exactly the window (q - W, q].
    """
    bm, ps = meta.get_block_mask(), meta.page_size
    q_block = bm.BLOCK_SIZE[0]
    assert bm.BLOCK_SIZE[1] == ps
    for r, (s, n, start) in enumerate(zip(rows, counts, starts)):
        logical_of = {page: j for j, page in enumerate(cache.block_table(s)) if page >= 0}
        for i in range(n):
            qb = i // q_block
            partial = bm.kv_indices[r, 0, qb, : bm.kv_num_blocks[r, 0, qb]].tolist()
            full = bm.full_kv_indices[r, 0, qb, : bm.full_kv_num_blocks[r, 0, qb]].tolist()
            assert len(set(partial + full)) == len(partial + full), f"row {r} query {i}: a page listed twice"
            seen = set()
            for page in full:
                seen |= {logical_of[page] * ps + o for o in range(ps)}
            for page in partial:
                slots = page * ps + torch.arange(ps)
                keep = bm.mask_mod(torch.tensor(r), torch.tensor(0), torch.tensor(i), slots)
                if page not in logical_of:
                    assert not keep.any(), f"row {r} query {i}: sees page {page} it does not hold"
                    continue
                seen |= {logical_of[page] * ps + o for o in range(ps) if keep[o]}
            q = start + i
            low = 0 if variant.sliding_window is None else max(0, q - variant.sliding_window + 1)
            assert seen == set(range(low, q + 1)), f"row {r} query at {q}: sees {sorted(seen)}"


def make_cache(op_name, variant, batch, max_seq_len, **options):
    spec = KVCacheSpec(num_layers=1, attention_layers=(0,), num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM,
                       dtype=torch.float32, device=torch.device("cpu"), max_position_embeddings=4096,
                       sliding_window=variant.sliding_window)
    if op_name == "paged":
        options.setdefault("page_size", PAGE_SIZE)
    return get_attention_op(op_name).create_cache(spec, max_batch_size=batch, max_seq_len=max_seq_len, **options)


def run_schedule(op_name, variant, prompt_lens, chunk, decode_steps, seed=0, on_step=None):
    """Drives one op through prefill (chunked if asked) and decode; asserts every real token's output."""
    gen = torch.Generator().manual_seed(seed)
    op = get_attention_op(op_name)
    batch = len(prompt_lens)
    targets = [n + decode_steps for n in prompt_lens]
    cache = make_cache(op_name, variant, batch, max(targets))
    keys = [torch.empty(NUM_KV_HEADS, 0, HEAD_DIM) for _ in range(batch)]
    values = [torch.empty(NUM_KV_HEADS, 0, HEAD_DIM) for _ in range(batch)]
    for s in range(batch):
        cache.add(s)
    done = [0] * batch
    while any(d < t for d, t in zip(done, targets)):
        rows = [s for s in range(batch) if done[s] < targets[s]]
        counts = [1 if done[s] >= prompt_lens[s] else min(chunk or prompt_lens[s], prompt_lens[s] - done[s])
                  for s in rows]
        meta = cache.prepare(rows, counts)
        t = max(counts)
        # larger scores so that the window, ALiBi and softcap all change the output
        q = 2 * torch.randn(len(rows), NUM_HEADS, t, HEAD_DIM, generator=gen)
        k = 2 * torch.randn(len(rows), NUM_KV_HEADS, t, HEAD_DIM, generator=gen)
        v = torch.randn(len(rows), NUM_KV_HEADS, t, HEAD_DIM, generator=gen)
        out = op.attend(q, k, v, layer_idx=0, scale=SCALE, variant=variant, cache=cache, meta=meta)
        assert out.shape == q.shape
        for r, (s, n) in enumerate(zip(rows, counts)):
            keys[s] = torch.cat([keys[s], k[r, :, :n]], dim=1)
            values[s] = torch.cat([values[s], v[r, :, :n]], dim=1)
            q_pos = torch.arange(done[s], done[s] + n)
            expected = reference(q[r, :, :n], keys[s], values[s], q_pos, variant)
            torch.testing.assert_close(out[r, :, :n].double(), expected, atol=FP32_ATOL, rtol=FP32_RTOL,
                                       msg=lambda m: f"row {s} positions {done[s]}..{done[s] + n - 1}: {m}")
            done[s] += n
        if op_name == "paged":
            check_block_lists(meta, cache, rows, counts, [done[s] - n for s, n in zip(rows, counts)], variant)
        for s in rows:
            cache.release_out_of_window(s)
        if on_step is not None:
            on_step(cache, rows)
    return cache


def _op_cases():
    for op_name in ("sdpa", "flex", "paged"):
        for name, variant in VARIANTS.items():
            if op_name == "sdpa" and variant.softcap is not None:
                continue  # no SDPA form: test_sdpa_rejects_softcap
            yield pytest.param(op_name, name, marks=[pytest.mark.paged] if op_name == "paged" else [],
                               id=f"{op_name}-{name}")


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("op_name,variant_name", list(_op_cases()))
def test_op_matches_dense_reference(op_name, variant_name, schedule):
    prompt_lens, chunk, decode_steps = SCHEDULES[schedule]
    run_schedule(op_name, VARIANTS[variant_name], prompt_lens, chunk, decode_steps)


@pytest.mark.parametrize("op_name", ["sdpa", "flex", "paged"])
@pytest.mark.parametrize("variant_name", ["window5", "alibi", "softcap"])
def test_no_cache_forward_matches_reference(op_name, variant_name):
    variant = VARIANTS[variant_name]
    op = get_attention_op(op_name)
    gen = torch.Generator().manual_seed(1)
    q = 2 * torch.randn(2, NUM_HEADS, 19, HEAD_DIM, generator=gen)
    k = 2 * torch.randn(2, NUM_KV_HEADS, 19, HEAD_DIM, generator=gen)
    v = torch.randn(2, NUM_KV_HEADS, 19, HEAD_DIM, generator=gen)
    if op_name == "sdpa" and variant.softcap is not None:
        with pytest.raises(ValueError, match="flex"):
            op.attend(q, k, v, layer_idx=0, scale=SCALE, variant=variant)
        return
    out = op.attend(q, k, v, layer_idx=0, scale=SCALE, variant=variant)
    for b in range(2):
        expected = reference(q[b], k[b], v[b], torch.arange(19), variant)
        torch.testing.assert_close(out[b].double(), expected, atol=FP32_ATOL, rtol=FP32_RTOL)


def test_sdpa_rejects_softcap_with_a_pointer_to_flex_and_paged():
    variant = VARIANTS["softcap"]
    cache = make_cache("sdpa", variant, 1, 8)
    cache.add(0)
    meta = cache.prepare([0], [4])
    q = torch.randn(1, NUM_HEADS, 4, HEAD_DIM)
    k = v = torch.randn(1, NUM_KV_HEADS, 4, HEAD_DIM)
    with pytest.raises(ValueError, match="attn_name='flex' or 'paged'"):
        get_attention_op("sdpa").attend(q, k, v, layer_idx=0, scale=SCALE, variant=variant, cache=cache, meta=meta)


def test_paged_rejects_a_window_the_cache_was_not_built_for():
    cache = make_cache("paged", VARIANTS["window20"], 1, 32)
    cache.add(0)
    meta = cache.prepare([0], [3])
    q = torch.randn(1, NUM_HEADS, 3, HEAD_DIM)
    k = v = torch.randn(1, NUM_KV_HEADS, 3, HEAD_DIM)
    with pytest.raises(ValueError, match="sliding window 5 but the cache was built for 20"):
        get_attention_op("paged").attend(q, k, v, layer_idx=0, scale=SCALE, variant=VARIANTS["window5"],
                                         cache=cache, meta=meta)


# ---------------------------------------------------------------------------- paged + sliding window


@pytest.mark.paged
@pytest.mark.parametrize("page_size", [16, 32])
@pytest.mark.parametrize("window", [1, 5, 15, 16, 17, 20, 33, 64])
def test_paged_window_bounds_pages_held_per_sequence(window, page_size):
    # Page bookkeeping only (the attention itself is checked above): two sequences decode 300 tokens,
    # releasing after every step as generate() does; each holds at most ceil(W / ps) + 1 pages.
    bound = math.ceil(window / page_size) + 1
    cache = make_cache("paged", AttentionVariant(sliding_window=window), 2, 340, page_size=page_size,
                       num_pages=2 * bound + 2 * math.ceil(37 / page_size))
    for s, prompt in enumerate([37, 2]):
        cache.add(s)
        cache.prepare([s], [prompt])
    held = []
    for _ in range(300):
        for s in (0, 1):
            cache.release_out_of_window(s)
        cache.prepare([0, 1], [1, 1])  # would raise OutOfPagesError if released pages were not reused
        held += [sum(p >= 0 for p in cache.block_table(s)) for s in (0, 1)]
        assert cache.memory_stats().pages_in_use == held[-1] + held[-2]
    cache.manager.tables.check_invariants()
    cache.manager.allocator.check_invariants()
    # Tight: pages (q - W, q] span, reached whenever q starts a page; ps dividing W - 1 gives bound - 1.
    assert max(held) == math.ceil((window - 1) / page_size) + 1 <= bound


@pytest.mark.paged
def test_paged_window_generation_holds_few_pages_and_matches_contiguous(monkeypatch):
    from fms.models import get_model
    from fms.utils.generation import generate

    # One layer keeps eager FlexAttention's per-step cost on CPU low; NoPE lifts the 1024 limit.
    model = get_model("gpt2", "nano", seed=3, num_layers=1, sliding_window=20, position_embedding_type="nope")
    window, ps, chunk, new = 20, PAGE_SIZE, 16, 60
    decode_bound = math.ceil(window / ps) + 1
    prefill_bound = math.ceil((window - 1 + chunk) / ps) + 1  # the window behind a chunk, plus the chunk
    prompts = [[(7 * i) % 500 + 3 for i in range(70)], [11, 12]]
    expected = generate(model, prompts, new, attn_name="sdpa")

    # generate() releases pages before every step; watch the KV manager of the cache it creates.
    op = get_attention_op("paged")
    seen = {"held": [], "page_ids": set(), "num_free": [], "cache": None}
    create = op.create_cache

    def spying_create(*args, **kwargs):
        cache = seen["cache"] = create(*args, **kwargs)
        reserve = cache.manager.reserve

        def spying_reserve(seq_ids, counts):
            grants = reserve(seq_ids, counts)
            bound = decode_bound if max(counts) == 1 else prefill_bound
            for s in seq_ids:
                table = cache.block_table(s)
                assert sum(p >= 0 for p in table) <= bound, f"sequence {s} holds {table}"
                seen["held"].append(sum(p >= 0 for p in table))
                seen["page_ids"].update(p for p in table if p >= 0)
            seen["num_free"].append(cache.manager.allocator.num_free)
            return grants

        cache.manager.reserve = spying_reserve
        return cache

    monkeypatch.setattr(op, "create_cache", spying_create)
    got = generate(model, prompts, new, attn_name="paged", page_size=ps, prefill_chunk_size=chunk)
    assert got == expected  # token for token, chunked paged vs one-shot contiguous
    cache = seen["cache"]
    # without releasing, the two sequences (130 and 62 tokens) would end up holding 9 + 4 pages
    assert cache.num_pages - min(seen["num_free"]) <= prefill_bound + decode_bound
    # freed pages are handed out again: a few physical pages serve all 13 logical pages
    assert len(seen["page_ids"]) <= prefill_bound + decode_bound + 1
    assert cache.manager.allocator.num_free == cache.num_pages  # all pages back after the run


@pytest.mark.paged
def test_released_pages_are_reused_lowest_id_first():
    # One sequence, W = 17, ps = 16, a pool of ceil(17 / 16) + 1 = 3 pages for 80 tokens (5 pages' worth).
    cache = make_cache("paged", AttentionVariant(sliding_window=17), 1, 80, num_pages=3)
    cache.add(0)
    cache.prepare([0], [33])  # positions 0..32 -> pages 0, 1, 2
    assert cache.block_table(0) == [0, 1, 2]
    assert cache.release_out_of_window(0) == [0]  # the next query (33) sees 17..33: page 0 (0..15) is out
    assert cache.manager.allocator.num_free == 1
    for _ in range(14):  # positions 33..46
        cache.prepare([0], [1])
        assert cache.release_out_of_window(0) == []
    cache.prepare([0], [1])  # position 47, the last slot of page 2
    assert cache.release_out_of_window(0) == [1]  # the next query (48) sees 32..48
    cache.prepare([0], [1])  # position 48 opens a page: the lowest free id, page 0
    assert cache.block_table(0) == [-1, -1, 2, 0]
    for _ in range(31):  # up to position 79 in the 3-page pool
        cache.prepare([0], [1])
        cache.release_out_of_window(0)
    assert cache.block_table(0) == [-1, -1, -1, -1, 1]  # the next query (80) sees 64..80: page 4 only
    cache.manager.tables.check_invariants()
    assert cache.memory_stats().pages_in_use == 1
