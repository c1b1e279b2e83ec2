"""Dynamo's tracing time of the layers compile scope on the CPU (backend "eager": tracing only, no codegen), for a
32-layer llama `micro`: the packed prefill warm-up step, then decode steps at batch 2 and batch 1, on one engine.
Usage: python trace_layers.py OUT.json  (run from the repository root of the tree to measure)."""
import json
import subprocess
import sys
import time

import torch
import torch._dynamo.utils as du

from fms.models import get_model
from fms.runtime.compiled import compile_forward
from fms.runtime.sampling_params import SamplingParams
from fms.serving import LLMEngine

torch.manual_seed(0)
model = get_model("llama", "micro", device_type="cpu", data_type="float32", num_layers=32)
engine = LLMEngine(model, num_pages=64, max_num_seqs=4, max_decode_steps=1)
runner = engine.runner
runner.prefill_compiled = True
runner._prefill_forward = compile_forward(model, "layers", backend="eager")
runner.decoder._forward = compile_forward(model, "layers", backend="eager")
seconds = {}
start = time.perf_counter()
runner.warmup_steps = lambda n: [[{0: 48, 1: 16}]]
engine._warmup_prefill(256)
seconds["prefill_warmup"] = time.perf_counter() - start
for name, prompts in (("decode_batch2", [[1] * 30, [2] * 20]), ("decode_batch1", [[1] * 30])):
    start = time.perf_counter()
    engine.generate(prompts, SamplingParams(max_new_tokens=3), use_tqdm=False)
    seconds[name] = time.perf_counter() - start
commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
dirty = bool(subprocess.run(["git", "status", "--porcelain", "fms"], capture_output=True, text=True).stdout.strip())
result = {"command": " ".join(["python", *sys.argv]), "commit": commit, "uncommitted_changes_in_fms": dirty,
          "torch": torch.__version__, "threads": torch.get_num_threads(), "seconds": seconds,
          "unique_graphs": du.counters["stats"]["unique_graphs"],
          "dynamo_compile_times_s": {k: round(sum(v), 4) for k, v in du.compile_times(repr="raw", aggregate=True).items()}
          if isinstance(du.compile_times(repr="raw"), dict) else du.compile_times(repr="str", aggregate=True)}
json.dump(result, open(sys.argv[1], "w"), indent=1)
print(json.dumps(result, indent=1))
