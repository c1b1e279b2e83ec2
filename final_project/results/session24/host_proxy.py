"""The host work of issue 19's fp32 eval row, on the CPU: llama `micro` shrunk to 32 wide (4 layers), so that the
forward's arithmetic is small and a pass is mostly host work, as on the GPU, where the pass is host-bound
(kernels 3.4 ms of ~35 ms, results/session22/dp). Paged/default per pass, 21 interleaved pairs, context shared and
not; then the host time of the paged cache's bookkeeping at serving scale (128 sequences: the prefill's prepare,
and a 16-step decode window's).

    PYTHONPATH=. python final_project/results/session24/host_proxy.py OUT.json
"""
import json
import statistics
import sys
import time

import torch

from fms.cache.paged import PagedKVCache
from fms.cache.spec import KVCacheSpec
from fms.eval.data import load_task_data
from fms.eval.modes import evaluate
from fms.models import get_model
from fms.utils.tokenizers import get_tokenizer

torch.set_num_threads(1)
report = {"command": " ".join(["python", *sys.argv]), "torch": torch.__version__, "eval": {}}
model = get_model("llama", "micro", device_type="cpu", data_type=torch.float32, hidden_size=32, num_heads=2,
                  num_kv_heads=1, num_layers=4)
items = load_task_data("truthfulqa_mc2", "fms/resources/eval/truthfulqa_mc.json").items
for share in (True, False):
    _, results, comparison = evaluate(model, get_tokenizer(None), "truthfulqa_mc2", items, timing_repeats=21,
                                      share_context=share)
    ratio = comparison["latency_ratio"]
    report["eval"]["shared" if share else "same_work"] = {
        "median": ratio["median"], "ci95": ratio["ci95"],
        "elapsed_ms": {r.mode: 1e3 * r.metrics["elapsed_s"] for r in results}}
    print("shared" if share else "same work", f"paged/default {ratio['median']:.3f}", ratio["ci95"])

spec = KVCacheSpec(num_layers=2, attention_layers=(0, 1), num_kv_heads=1, head_dim=16, dtype=torch.float32,
                   device=torch.device("cpu"), max_position_embeddings=4096)


def bookkeeping() -> tuple[float, float]:
    cache = PagedKVCache(spec, max_batch_size=128, max_seq_len=1024, page_size=16, num_pages=128 * 64)
    ids = list(range(128))
    for s in ids:
        cache.add(s)
    start = time.perf_counter()
    cache.prepare(ids, [100 + (s * 3) % 400 for s in ids])
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(16):
        cache.prepare_decode_window(ids, [16] * 128)
    return prefill, (time.perf_counter() - start) / 16


runs = [bookkeeping() for _ in range(7)]
report["bookkeeping_ms"] = {"prefill_prepare_128": 1e3 * statistics.median(r[0] for r in runs),
                            "decode_window_prepare_128": 1e3 * statistics.median(r[1] for r in runs)}
print(report["bookkeeping_ms"])
json.dump(report, open(sys.argv[1], "w"), indent=1)
