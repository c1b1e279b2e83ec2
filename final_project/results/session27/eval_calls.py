"""Python calls of paged fp32 scoring with the context shared and without, on the CPU stand-in of session 24
(llama `micro` shrunk to 32 wide, 4 layers: results/session24/host_proxy.py): 30 scoring passes of the TruthfulQA
file under cProfile for each, after two untimed passes, and the median pass time of 21 without the profiler.

    python final_project/results/session27/eval_calls.py OUT.json
"""
import cProfile
import json
import pstats
import statistics
import sys
import time

import torch

from fms.eval.data import load_task_data
from fms.eval.modes import encode_questions
from fms.eval.scoring import score_requests
from fms.eval.tasks import build_questions, get_task
from fms.models import get_model
from fms.modules.attention import get_attention_op
from fms.utils.tokenizers import get_tokenizer

torch.set_num_threads(1)
model = get_model("llama", "micro", device_type="cpu", data_type=torch.float32, hidden_size=32, num_heads=2,
                  num_kv_heads=1, num_layers=4)
items = load_task_data("truthfulqa_mc2", "fms/resources/eval/truthfulqa_mc.json").items
questions = build_questions(get_task("truthfulqa_mc2"), items, 0, None, 1234)
requests = [r for rs in encode_questions(get_tokenizer(None), questions) for r in rs]


def one_pass(attn: str, share: bool):
    options = get_attention_op(attn).cache_kwargs(page_size=16)
    return score_requests(model, requests, attn, 8, options, share_context=share)


report = {"command": " ".join(["python", *sys.argv]), "torch": torch.__version__, "runs": {}}
for attn, share in (("sdpa", False), ("paged", False), ("paged", True)):
    name = f"{attn}, share_context={share}"
    for _ in range(2):
        one_pass(attn, share)
    times = []
    for _ in range(21):
        run = one_pass(attn, share)
        times.append(1e3 * sum(run.batch_seconds))
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(30):
        one_pass(attn, share)
    profiler.disable()
    stats = pstats.Stats(profiler)
    report["runs"][name] = {"median_pass_ms": statistics.median(times), "input_tokens": run.input_tokens,
                            "python_calls_30_passes": stats.total_calls}
    print(name, report["runs"][name], flush=True)
json.dump(report, open(sys.argv[1], "w"), indent=1)
