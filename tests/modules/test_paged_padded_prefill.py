"""The paged op's padded multi-token path (one SDPA call per layer over keys gathered into padded rows)
against dense attention per row, computed here with explicit softmax math in fp64 on the CPU.

Tolerances: fp32 atol/rtol 1e-5; fp16 atol/rtol 4e-3 (fp16 inputs and outputs; the reference runs
on the same fp16 values). FMS_TEST_DEVICE=cuda runs the op-level checks on the GPU (fp32 there
within 2e-3: the fused kernels may use TF32).
"""

import os

import pytest
import torch

from fms.cache.paged import PagedKVCache
from fms.cache.spec import KVCacheSpec
from fms.eval.scoring import TokenRequest, score_requests
from fms.models import get_model
from fms.modules import attention
from fms.modules.attention import PagedOp, get_attention_op
from fms.modules.masks import AttentionVariant

pytestmark = pytest.mark.paged

HEAD_DIM = 16
CAUSAL = AttentionVariant()
DEVICE = torch.device(os.environ.get("FMS_TEST_DEVICE", "cpu"))
TOL = {torch.float32: 1e-5 if DEVICE.type == "cpu" else 2e-3, torch.float16: 4e-3}


def _spec(num_kv_heads, dtype):
    return KVCacheSpec(num_layers=1, attention_layers=(0,), num_kv_heads=num_kv_heads, head_dim=HEAD_DIM,
                       dtype=dtype, device=DEVICE, max_position_embeddings=4096)


def _dense(q, keys, values, first_position, scale):
    """One row: q (Hq, T, D) at positions first_position.. over keys/values (Hkv, L, D) -> (Hq, T, D), in
    fp64 on the CPU."""
    group = q.shape[0] // keys.shape[0]
    keys, values = (x.cpu().double().repeat_interleave(group, 0) for x in (keys, values))
    scores = q.cpu().double() @ keys.transpose(1, 2) * scale  # (Hq, T, L)
    q_pos = torch.arange(q.shape[1])[:, None] + first_position
    scores = scores.masked_fill(torch.arange(keys.shape[1])[None, :] > q_pos, float("-inf"))
    return scores.softmax(-1) @ values


class _Rows:
    """Random steps through one op; keeps every sequence's K/V history to build the reference."""

    def __init__(self, op, cache, num_heads, num_kv_heads, dtype, seed):
        self.op, self.cache, self.hq, self.hkv, self.dtype = op, cache, num_heads, num_kv_heads, dtype
        self.gen = torch.Generator().manual_seed(seed)
        self.history = {}
        self.scale = HEAD_DIM**-0.5

    def add(self, seq_id):
        self.cache.add(seq_id)
        self.history[seq_id] = (torch.empty(self.hkv, 0, HEAD_DIM), torch.empty(self.hkv, 0, HEAD_DIM))

    def step(self, seq_ids, counts, query_len=None):
        t = query_len or max(counts)
        b = len(seq_ids)
        q, k, v = (torch.randn(b, h, t, HEAD_DIM, generator=self.gen).to(DEVICE, self.dtype)
                   for h in (self.hq, self.hkv, self.hkv))
        meta = self.cache.prepare(seq_ids, counts, query_len=query_len)
        out = self.op.attend(q, k, v, layer_idx=0, scale=self.scale, variant=CAUSAL, cache=self.cache, meta=meta)
        assert out.shape == q.shape and out.dtype == self.dtype
        tol = TOL[self.dtype]
        for row, (seq_id, n) in enumerate(zip(seq_ids, counts)):
            hk, hv = self.history[seq_id]
            hk, hv = torch.cat([hk, k[row, :, :n].cpu().float()], 1), torch.cat([hv, v[row, :, :n].cpu().float()], 1)
            self.history[seq_id] = (hk, hv)
            expected = _dense(q[row, :, :n], hk, hv, hk.shape[1] - n, self.scale)
            torch.testing.assert_close(out[row, :, :n].cpu().double(), expected, atol=tol, rtol=tol)
        return [out[row, :, :n] for row, n in enumerate(counts)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("page_size", [16, 64])
@pytest.mark.parametrize("group", [1, 4])
def test_fresh_resumed_and_padded_rows_match_dense(page_size, group, dtype):
    hkv = 2
    cache = PagedKVCache(_spec(hkv, dtype), max_batch_size=4, max_seq_len=page_size * 4, page_size=page_size)
    rows = _Rows(PagedOp(prefill_kernel="padded"), cache, hkv * group, hkv, dtype, seed=page_size + group)
    for i in range(3):
        rows.add(i)
    rows.step([0, 1, 2], [1, page_size - 1, page_size + 1])  # fresh ragged rows: the step's own keys, causal
    rows.step([0, 1, 2], [page_size, 2, 5], query_len=page_size + 3)  # resumed, padded past the longest
    rows.add(3)
    rows.step([3, 2, 0], [page_size, 1, page_size - 1])  # a fresh row beside resumed rows, pages crossed
    rows.step([1, 3], [3, 4])  # a subset of the sequences


def test_auto_pads_off_flash_and_equals_varlen(monkeypatch):
    """In fp32 the registered op takes the padded path for padded steps; the varlen path (forced)
    computes the same values on the same inputs."""
    outs = {}
    for kernel in ("varlen", "auto"):
        called = []
        for name in ("_paged_varlen", "_paged_padded"):
            real = getattr(attention, name)
            monkeypatch.setattr(attention, name, lambda *a, _r=real, _n=name: called.append(_n) or _r(*a))
        op = PagedOp(prefill_kernel=kernel)
        cache = PagedKVCache(_spec(2, torch.float32), max_batch_size=2, max_seq_len=96, page_size=16)
        rows = _Rows(op, cache, 8, 2, torch.float32, seed=3)
        rows.add(0)
        rows.add(1)
        outs[kernel] = rows.step([0, 1], [20, 3]) + rows.step([0, 1], [5, 17])  # same seed: same inputs
        assert set(called) == {"_paged_varlen" if kernel == "varlen" else "_paged_padded"}
        monkeypatch.undo()
    for padded, varlen in zip(outs["auto"], outs["varlen"]):
        torch.testing.assert_close(padded, varlen, atol=TOL[torch.float32], rtol=TOL[torch.float32])


def test_padded_key_grid_is_built_once_and_reads_only_the_rows_keys():
    ps = 16
    cache = PagedKVCache(_spec(2, torch.float32), max_batch_size=2, max_seq_len=64, page_size=ps)
    cache.add("a")
    cache.add("b")
    fresh = cache.prepare(["a", "b"], [18, 3])
    grid = fresh.get_padded_kv()
    assert grid.kv_slots is None and grid.mask is None  # no context: the step's own keys, causal
    resumed = cache.prepare(["a", "b"], [2, 4], query_len=5)
    grid = resumed.get_padded_kv()
    assert resumed.get_padded_kv() is grid  # every layer reads the same grid
    pages_a, pages_b = cache.block_table("a"), cache.block_table("b")

    def slot(pages, position):
        return pages[position // ps] * ps + position % ps

    # a holds 20 tokens, b 7; b's padding repeats its last key
    expect_a = [slot(pages_a, j) for j in range(20)]
    expect_b = [slot(pages_b, j) for j in range(7)] + [slot(pages_b, 6)] * 13
    assert grid.kv_slots.tolist() == [expect_a, expect_b]
    assert grid.mask.shape == (2, 1, 5, 20)
    # a's queries sit at 18, 19 (then padding at 20..22 sees its 20 keys); b's at 3..6 (padding at 7 sees 7)
    visible = grid.mask[:, 0].sum(-1).tolist()
    assert visible == [[19, 20, 20, 20, 20], [4, 5, 6, 7, 7]]
    packed = cache.prepare(["a"], [3], packed=True)
    with pytest.raises(ValueError, match="no padded key grid"):
        packed.get_padded_kv()


def test_packed_runs_of_a_padded_step_are_built_only_when_a_layer_asks(monkeypatch):
    """A padded multi-token step defers its varlen metadata (host work and copies) to the first layer that
    takes the varlen path; the padded SDPA path (fp32, off flash) never builds it. Packed steps carry it."""
    built = []
    real = PagedKVCache._varlen_meta
    monkeypatch.setattr(PagedKVCache, "_varlen_meta", lambda self, *a: built.append(a[-1]) or real(self, *a))
    for kernel, expect in (("auto", []), ("varlen", [False, False])):
        built.clear()
        cache = PagedKVCache(_spec(2, torch.float32), max_batch_size=2, max_seq_len=96, page_size=16)
        rows = _Rows(PagedOp(prefill_kernel=kernel), cache, 4, 2, torch.float32, seed=7)
        rows.add(0)
        rows.add(1)
        rows.step([0, 1], [20, 3])
        rows.step([0, 1], [5, 17])
        assert built == expect, kernel  # once per step for varlen (packed=False), never for the padded path
    cache = PagedKVCache(_spec(2, torch.float32), max_batch_size=2, max_seq_len=96, page_size=16)
    cache.add("a")
    cache.add("b")
    meta = cache.prepare(["a", "b"], [18, 3])
    assert meta.varlen is None
    runs = meta.get_varlen()
    assert meta.get_varlen() is runs  # built once per step, shared by every layer
    assert runs.cu_q.tolist() == [0, 18, 21] and runs.cu_k.tolist() == [0, 18, 21] and runs.kv_slots is None
    assert runs.q_index.tolist() == list(range(18)) + [18, 19, 20]  # row b's real queries at b * 18 ..
    built.clear()
    packed = cache.prepare(["a", "b"], [2, 4], packed=True)
    assert built == [True] and packed.varlen is not None  # Mamba layers read its cu_q directly
    assert packed.varlen.cu_k.tolist() == [0, 20, 27]
    # the decode kernel's inputs exist on one-token steps only
    assert meta.page_table is None and meta.seq_lens is None and packed.page_table is None
    decode = cache.prepare(["a", "b"], [1, 1])
    assert decode.get_varlen() is None  # a one-token step has no packed runs
    assert decode.seq_lens.tolist() == [21, 8]
    assert decode.page_table[:, :2].tolist() == [cache.block_table("a")[:2], cache.block_table("b")[:1] + [0]]


def test_unused_slots_holding_nan_are_never_read():
    """Pages beyond a row's length and the scratch page hold NaN: outputs stay equal to dense."""
    cache = PagedKVCache(_spec(2, torch.float32), max_batch_size=2, max_seq_len=128, page_size=16)
    rows = _Rows(PagedOp(prefill_kernel="padded"), cache, 4, 2, torch.float32, seed=11)
    rows.add(0)
    rows.add(1)
    for pool in (*cache.keys, *cache.values):
        pool.fill_(float("nan"))
    rows.step([0, 1], [17, 2])  # row 1's padded queries write the scratch page
    scratch = slice(cache.scratch_page * 16, (cache.scratch_page + 1) * 16)
    for pool in (*cache.keys, *cache.values):
        pool[:, scratch] = float("nan")
    rows.step([0, 1], [3, 3])  # no padded query; row 1 (5 keys) is padded to row 0's 20 keys


def test_prefill_kernel_selection():
    cache = PagedKVCache(_spec(2, torch.float32), max_batch_size=1, max_seq_len=64, page_size=16)
    # fp32 packs off CUDA (the varlen reference); on CUDA flash varlen takes only 16-bit, so fp32 steps stay padded
    assert PagedOp(prefill_kernel="varlen").can_pack(CAUSAL, cache) == (DEVICE.type != "cuda")
    half = PagedKVCache(_spec(2, torch.float16), max_batch_size=1, max_seq_len=64, page_size=16)
    assert PagedOp(prefill_kernel="varlen").can_pack(CAUSAL, half)
    assert not PagedOp(prefill_kernel="padded").can_pack(CAUSAL, cache)  # a padded op wants padded steps
    assert not PagedOp(prefill_kernel="padded").prefill_uses_flex(CAUSAL, cache)
    assert PagedOp(prefill_kernel="padded").prefill_uses_flex(AttentionVariant(alibi=True), cache)
    with pytest.raises(ValueError, match=r"prefill_kernel must be one of .*'padded'.*got 'sdpa'"):
        PagedOp(prefill_kernel="sdpa")


def test_eval_scoring_equals_sdpa_on_both_paged_paths():
    """Log-likelihoods of eval requests (fresh context step, then continuations over cached context)."""
    model = get_model("llama", "micro", seed=0, init_std=0.5)
    gen = torch.Generator().manual_seed(5)

    def tokens(n):
        return tuple(torch.randint(0, model.config.vocab_size, (n,), generator=gen).tolist())

    requests = [TokenRequest(tokens(c), tokens(n)) for c, n in [(40, 6), (23, 1), (70, 12), (9, 3), (33, 20)]]
    scores = {}
    paged = get_attention_op("paged")
    try:
        for label, name, kernel in (("sdpa", "sdpa", None), ("varlen", "paged", "varlen"), ("padded", "paged", "auto")):
            if kernel:
                paged.prefill_kernel = kernel
            run = score_requests(model, requests, name, batch_size=4, cache_options={"page_size": 16} if kernel else None)
            scores[label] = torch.tensor([s for s, _ in run.results], dtype=torch.float64)
    finally:
        paged.prefill_kernel = "auto"
    assert len(set(scores["sdpa"].tolist())) == len(requests)  # distinct, non-degenerate scores
    torch.testing.assert_close(scores["padded"], scores["sdpa"], atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(scores["varlen"], scores["sdpa"], atol=1e-3, rtol=1e-5)


def test_fp32_on_cuda_prefers_padded_steps_to_packed_ones():
    """A packed step on CUDA needs flash varlen (fp16/bf16); in fp32 the engine gets padded steps (one
    SDPA call per layer) instead of packed ones (a loop over rows). Only the cache's spec is read."""
    from types import SimpleNamespace

    def cache(dtype, device):
        spec = SimpleNamespace(dtype=dtype, device=torch.device(device))
        return SimpleNamespace(spec=spec, can_pack=True, window=None)

    op = get_attention_op("paged")
    assert op.can_pack(CAUSAL, cache(torch.bfloat16, "cuda")) and op.can_pack(CAUSAL, cache(torch.float16, "cuda"))
    assert not op.can_pack(CAUSAL, cache(torch.float32, "cuda"))
    assert op.can_pack(CAUSAL, cache(torch.float32, "cpu"))
