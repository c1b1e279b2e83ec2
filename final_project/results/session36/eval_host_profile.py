"""The fp32 eval's host work per pass on the CPU, paged against default, with the same work (no shared context) or
shared: llama `micro` shrunk to 32 wide (as results/session24/host_proxy.py), 5 warm-up then 30 timed passes of
score_requests per mode, then a cProfile of 30 more, limited to fms.cache, fms.modules.attention and fms.eval; last,
the input shapes of every forward per mode (both run the same tokens with the context not shared).

    PYTHONPATH=. python final_project/results/session36/eval_host_profile.py same|shared
"""
import cProfile, pstats, sys, time
import torch
from fms.eval.data import load_task_data
from fms.eval.modes import encode_questions, MODES
from fms.eval.scoring import score_requests
from fms.modules.attention import get_attention_op
from fms.models import get_model
from fms.utils.tokenizers import get_tokenizer
torch.set_num_threads(1)
model = get_model("llama", "micro", device_type="cpu", data_type=torch.float32, hidden_size=32, num_heads=2,
                  num_kv_heads=1, num_layers=4)
items = load_task_data("truthfulqa_mc2", "fms/resources/eval/truthfulqa_mc.json").items
from fms.eval.modes import build_questions
from fms.eval.tasks import get_task
qs = build_questions(get_task('truthfulqa_mc2'), items, 0, None, 1234)
enc = encode_questions(get_tokenizer(None), qs)
flat = [r for rs in enc for r in rs]
share = sys.argv[1] == "shared"
for mode, attn in MODES.items():
    opts = get_attention_op(attn).cache_kwargs(page_size=16)
    kw = dict(share_context=None if share else False)
    for _ in range(5): score_requests(model, flat, attn, 8, opts, **kw)
    t = time.perf_counter()
    for _ in range(30): score_requests(model, flat, attn, 8, opts, **kw)
    print(mode, attn, (time.perf_counter() - t) / 30 * 1e3, "ms / pass")
    pr = cProfile.Profile(); pr.enable()
    for _ in range(30): score_requests(model, flat, attn, 8, opts, **kw)
    pr.disable()
    pstats.Stats(pr).sort_stats("cumtime").print_stats("fms/(cache|modules/attention|eval)", 25)
shapes = {}
orig = type(model).forward
def fwd(self, input_ids, *a, **k):
    shapes.setdefault(cur, []).append(tuple(input_ids.shape))
    return orig(self, input_ids, *a, **k)
type(model).forward = fwd
for mode, attn in MODES.items():
    cur = mode
    opts = get_attention_op(attn).cache_kwargs(page_size=16)
    score_requests(model, flat, attn, 8, opts, share_context=None if share else False)
for m, s in shapes.items(): print(m, s, sum(a*b for a,b in s))
