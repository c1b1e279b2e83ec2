"""Tiny host-side factories for scheduler / prefix-cache tests (no model: the 'runner' only reserves pages)."""

import torch

from fms.cache.base import KVCacheSpec
from fms.cache.paged import PagedKVCache
from fms.cache.prefix_cache import PrefixCache
from fms.serving.request import Request, SamplingParams
from fms.serving.scheduler import Scheduler

PAGE = 16


def make_cache(num_pages: int, max_num_seqs: int = 4, max_seq_len: int = 256) -> PagedKVCache:
    spec = KVCacheSpec(num_layers=1, attention_layers=(0,), num_kv_heads=1, head_dim=4, dtype=torch.float32,
                       device=torch.device("cpu"), max_position_embeddings=1024)
    return PagedKVCache(spec, max_batch_size=max_num_seqs, max_seq_len=max_seq_len, page_size=PAGE,
                        num_pages=num_pages)


def make_scheduler(num_pages: int, budget: int = 64, max_num_seqs: int = 4, prefix: bool = False,
                   max_seq_len: int = 256, max_decode_steps: int = 1) -> Scheduler:
    cache = make_cache(num_pages, max_num_seqs, max_seq_len)
    prefix_cache = PrefixCache(cache.allocator, PAGE) if prefix else None
    return Scheduler(cache, max_num_seqs, budget, max_seq_len, prefix_cache, max_decode_steps=max_decode_steps)


def request(rid, prompt, max_new_tokens=4, eos=(), **params) -> Request:
    if isinstance(prompt, int):
        prompt = [(rid * 7 + i) % 50 + 1 for i in range(prompt)] if isinstance(rid, int) else list(range(1, prompt + 1))
    return Request(rid, list(prompt), SamplingParams(max_new_tokens=max_new_tokens, **params),
                   eos_token_ids=frozenset(eos))


def run_step(scheduler: Scheduler, token=0):
    """Schedule, reserve the pages like the model runner does, 'sample' `token` (or token(chunk))."""
    out = scheduler.schedule()
    ids = [c.request_id for c in out.chunks]
    if out.num_decode_steps > 1:  # a decode window: pages for every step, one token per step
        scheduler.cache.prepare_decode_window(ids, [c.num_steps for c in out.chunks])
    elif out.chunks:
        scheduler.cache.prepare(ids, [len(c.token_ids) for c in out.chunks])
    sampled = [[token(c) if callable(token) else token] * c.num_steps if c.sample else [] for c in out.chunks]
    return out, scheduler.update(out, sampled)


def check_pages(scheduler: Scheduler) -> None:
    """Refcount of every page == sequences holding it + 1 if the prefix cache holds it."""
    cache = scheduler.cache
    cache.allocator.check_invariants()
    cache.tables.check_invariants()
    holders = [0] * cache.num_pages
    for seq in cache.sequences:
        for page in cache.block_table(seq):
            if page >= 0:
                holders[page] += 1
    pc = scheduler.prefix_cache
    if pc is not None:
        pc.check_invariants()
    for page in range(cache.num_pages):
        expected = holders[page] + (1 if pc is not None and pc.is_cached(page) else 0)
        assert cache.allocator.refcount(page) == expected, (page, cache.allocator.refcount(page), expected)
