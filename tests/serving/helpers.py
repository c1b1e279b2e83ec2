"""Tiny host-side factories for scheduler / prefix-cache tests (no model, no device: the scheduler
reserves pages through the KV manager; nothing else touches them)."""

from fms.cache.kv_manager import KVManager
from fms.serving.request import Request, SamplingParams
from fms.serving.scheduler import Scheduler

PAGE = 16


def make_scheduler(num_pages: int, budget: int = 64, max_num_seqs: int = 4, prefix: bool = False,
                   max_seq_len: int = 256, max_decode_steps: int = 1) -> Scheduler:
    kv = KVManager(num_pages, PAGE, max_num_seqs, enable_prefix_caching=prefix)
    return Scheduler(kv, max_num_seqs, budget, max_seq_len, max_decode_steps=max_decode_steps)


def request(rid, prompt, max_new_tokens=4, eos=(), **params) -> Request:
    if isinstance(prompt, int):
        prompt = [(rid * 7 + i) % 50 + 1 for i in range(prompt)] if isinstance(rid, int) else list(range(1, prompt + 1))
    return Request(rid, list(prompt), SamplingParams(max_new_tokens=max_new_tokens, **params),
                   eos_token_ids=frozenset(eos))


def run_step(scheduler: Scheduler, token=0):
    """Schedule (which reserves the step's pages), 'sample' `token` (or token(chunk)), update."""
    out = scheduler.schedule()
    for chunk in out.chunks:  # what the model runner checks: room reserved for exactly the step
        assert scheduler.kv.length(chunk.request_id) == chunk.start_position + len(chunk.token_ids) + chunk.num_steps - 1
    sampled = [[token(c) if callable(token) else token] * c.num_steps if c.sample else [] for c in out.chunks]
    return out, scheduler.update(out, sampled)


def check_pages(scheduler: Scheduler) -> None:
    """Refcount of every page == sequences holding it + 1 if the prefix cache holds it."""
    kv = scheduler.kv
    kv.check_invariants()
    holders = [0] * kv.num_pages
    for seq in kv.sequences:
        for page in kv.block_table(seq):
            if page >= 0:
                holders[page] += 1
    pc = kv.prefix_cache
    for page in range(kv.num_pages):
        expected = holders[page] + (1 if pc is not None and pc.is_cached(page) else 0)
        assert kv.allocator.refcount(page) == expected, (page, kv.allocator.refcount(page), expected)
