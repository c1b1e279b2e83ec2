"""The largest batch of a workload whose KV cache fits a memory budget, from sizes measured on real caches."""

import math

import torch

from fms.bench.timing import GB
from fms.bench.workloads import MixedWorkload
from fms.cache.allocator import OutOfPagesError
from fms.modules.attention import get_attention_op


def kv_capacity(model, workload: MixedWorkload, backend: str, budget_gb: float, page_size: int,
                verify: bool = False, max_requests: int = 1_000_000) -> dict:
    """Largest batch of this workload's requests whose KV cache fits in budget_gb (1e9 bytes).

    Computed from sizes measured on real caches, not from a formula: a 1-row cache gives a contiguous
    row's bytes (max_len tokens + its scratch column); a 1-page pool gives a page's bytes. Contiguous:
    floor(budget / row_bytes) rows. Paged: requests in workload order while the sum of
    ceil((prompt + output) / page_size) pages fits in floor(budget / page_bytes) - 1 pages (one scratch
    page). verify=True allocates a cache of that size and fills it to check the computed answer.
    Recurrent (Mamba) state is not part of the KV budget; it is reported per sequence.
    """
    spec = model.cache_spec()
    op = get_attention_op(backend)
    budget = budget_gb * GB
    max_len = workload.max_len
    probe = op.create_cache(spec, 1, max_len, **op.cache_kwargs(page_size=page_size, num_pages=1))
    if op.uses_pages:
        page_bytes = probe.memory_stats().bytes_allocated
        state_per_seq = _state_bytes_per_seq(probe)
        usable_pages = max(int(budget // page_bytes) - 1, 0)
        used, count, lengths = 0, 0, workload.lengths(max(4 * workload.num_requests, 64))
        while count < max_requests:
            if count == len(lengths):
                lengths = workload.lengths(2 * len(lengths))
            need = math.ceil(sum(lengths[count]) / page_size)
            if used + need > usable_pages:
                break
            used += need
            count += 1
        result = {"backend": backend, "kind": "paged", "page_bytes": page_bytes, "page_size": page_size,
                  "pool_pages": usable_pages, "pages_used": used, "largest_batch": count,
                  "kv_bytes_needed": used * page_bytes, "state_bytes_per_seq": state_per_seq,
                  "rule": "sum(ceil((prompt+output)/page_size)) * page_bytes <= budget - 1 scratch page"}
        if verify:
            result["verify"] = _verify_paged(op, spec, workload, lengths[: count + 1], count, budget_gb, page_size,
                                             usable_pages)
    else:
        row_bytes = probe.memory_stats().bytes_allocated
        count = min(int(budget // row_bytes), max_requests)
        result = {"backend": backend, "kind": "contiguous", "row_bytes": row_bytes, "max_len": max_len,
                  "largest_batch": count, "kv_bytes_needed": count * row_bytes,
                  "state_bytes_per_seq": _state_bytes_per_seq(probe),
                  "rule": "batch * (max_len + 1 scratch column) * bytes_per_token <= budget"}
        if verify:
            result["verify"] = _verify_contiguous(op, spec, max_len, count, row_bytes, budget)
    result.update(budget_gb=budget_gb, kv_bytes_per_token=spec.kv_bytes_per_token)
    return result


def _state_bytes_per_seq(cache) -> int:
    if cache.state_pool is None:
        return 0
    cache.add("probe")
    try:
        return cache.memory_stats().state_bytes
    finally:
        cache.free("probe")


def _device_bytes(device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.memory_allocated(device)


def _verify_paged(op, spec, workload, lengths, count, budget_gb, page_size, usable_pages) -> dict:
    """Allocate the pool for the budget, reserve pages for `count` requests, check the next one does not fit."""
    before = _device_bytes(spec.device)
    try:
        cache = op.create_cache(spec, max_batch_size=count + 1, max_seq_len=workload.max_len, page_size=page_size,
                                memory_gb=budget_gb)
    except torch.cuda.OutOfMemoryError as exc:
        return {"ok": False, "error": f"OutOfMemoryError: {exc}"}
    allocated = _device_bytes(spec.device)
    fitted = 0
    for i, (p, o) in enumerate(lengths[:count]):
        cache.add(i)
        cache.prepare([i], [p + o])
        fitted += 1
    next_fails = False
    if len(lengths) > count:
        cache.add(count)
        try:
            cache.prepare([count], [sum(lengths[count])])
        except OutOfPagesError:
            next_fails = True
    return {
        "ok": cache.num_pages == usable_pages and fitted == count and next_fails,
        "pool_pages": cache.num_pages, "requests_reserved": fitted, "next_request_out_of_pages": next_fails,
        "device_bytes_allocated": None if before is None else allocated - before,
    }


def _verify_contiguous(op, spec, max_len, count, row_bytes, budget) -> dict:
    if count < 1:
        return {"ok": True, "note": "not even one row fits"}
    before = _device_bytes(spec.device)
    try:
        cache = op.create_cache(spec, max_batch_size=count, max_seq_len=max_len)
    except torch.cuda.OutOfMemoryError as exc:
        return {"ok": False, "error": f"OutOfMemoryError: {exc}"}
    allocated = cache.memory_stats().bytes_allocated
    after = _device_bytes(spec.device)
    del cache
    return {"ok": allocated == count * row_bytes and allocated <= budget < allocated + row_bytes,
            "cache_bytes_allocated": allocated,
            "device_bytes_allocated": None if before is None else after - before}


