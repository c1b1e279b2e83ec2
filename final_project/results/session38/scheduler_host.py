"""The serving engine's host work on the CPU: issue 19's 1B serving workload (128 requests, prompts 64-512, 256
new tokens, decode windows of 16) on a 64-wide, 1-layer llama (paged); engine time_s per generate() in ms.
With --profile, the first timed run's schedule, update, commit and text steps run under cProfile (only those), and
the profile is printed sorted by SORT (tottime or cumulative).

    PYTHONPATH=. python final_project/results/session38/scheduler_host.py [RUNS] [--profile [SORT]]
"""
import cProfile
import io
import pstats
import random
import sys
import time

import torch

from fms.models import get_model
from fms.serving import LLMEngine, SamplingParams
from fms.serving.config import EngineConfig

torch.set_num_threads(1)
args = sys.argv[1:]
profile = "--profile" in args
sort = args[args.index("--profile") + 1] if profile and len(args) > args.index("--profile") + 1 else "tottime"
runs = int(args[0]) if args and args[0].isdigit() else 2
model = get_model("llama", "micro", device_type="cpu", attn_name="paged", hidden_size=64, num_layers=1, num_heads=2,
                  num_kv_heads=1)
engine = LLMEngine(model, config=EngineConfig(max_num_seqs=128, max_num_batched_tokens=8192, num_pages=6000,
                                              page_size=16, max_decode_steps=16, max_model_len=1024))
rng = random.Random(0)
lengths = [rng.randint(64, 512) for _ in range(128)]
params = SamplingParams(max_tokens=256, ignore_eos=True)
engine.generate([[5] * 16 for _ in range(4)], params, use_tqdm=False)  # warm-up
profiler = cProfile.Profile()


def profiled(obj, name):
    fn = getattr(obj, name)

    def run(*a, **k):
        profiler.enable()
        try:
            return fn(*a, **k)
        finally:
            profiler.disable()

    setattr(obj, name, run)


for run in range(runs):
    if profile and run == 0:
        for obj, name in ((engine.scheduler, "schedule"), (engine.scheduler, "update"), (engine.scheduler, "commit"),
                          (engine, "_apply_text_and_logprobs")):
            profiled(obj, name)
    for k in engine.time_s:
        engine.time_s[k] = 0.0
    prompts = [[rng.randrange(4, 2048) for _ in range(n)] for n in lengths]
    start = time.perf_counter()
    engine.generate(prompts, params, use_tqdm=False)
    print(f"wall {time.perf_counter() - start:.3f}", {k: round(v * 1e3, 1) for k, v in engine.time_s.items()},
          "steps", engine.num_steps)
    if profile and run == 0:
        for obj in (engine.scheduler, engine):  # drop the wrappers: later runs are timed without the profiler
            vars(obj).pop("schedule", None), vars(obj).pop("update", None), vars(obj).pop("commit", None)
            vars(obj).pop("_apply_text_and_logprobs", None)
        out = io.StringIO()
        stats = pstats.Stats(profiler, stream=out)
        print("profiled host seconds", round(stats.total_tt, 3))
        stats.sort_stats(sort).print_stats(40)
        print(out.getvalue()[:14000])
