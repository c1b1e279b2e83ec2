"""Host time of issue 19's fp32 eval row on the CPU: llama micro's 4 layers and vocabulary at 32 wide, so that the
passes are mostly host work; --full keeps micro's width; other arguments go to `fms eval`.

    PYTHONPATH=. python final_project/results/session38/eval_host_narrow.py [--no_share_context] [--full]
"""
import sys, json, functools
import torch
torch.set_num_threads(1)
import fms.models as fm
orig = fm.get_model
fm.get_model = functools.partial(orig, hidden_size=32, num_heads=2, num_kv_heads=1) if "--full" not in sys.argv else orig
from fms.entrypoints import bench_cli
extra = [a for a in sys.argv[1:] if a != "--full"]
r = bench_cli.eval_main(["--task", "truthfulqa_mc2", "--data", "fms/resources/eval/truthfulqa_mc.json", "--mode", "both",
                     "--dtype", "fp32", "--device_type", "cpu", "--no_progress", "--timing_repeats", "21", *extra])
for m, v in r["modes"].items():
    print(m, "elapsed ms", round(v["elapsed_s"] * 1e3, 2), "batches", v["num_batches"])
