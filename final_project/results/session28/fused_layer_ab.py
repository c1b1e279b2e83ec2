"""One decoder layer's projections and the glue between them, unfused (what the engine runs by default) against
KernelConfig.fuse_norm's fused kernels, at Llama-3.2-1B's shapes, batch 1 and 2, on the GPU.

    unfused: norm (compiled) -> qkv GEMV;  o GEMV;  residual add + norm (compiled, one kernel as inductor fuses
             them) -> gate|up GEMV;  SwiGLU down GEMV;  residual add (compiled)
    fused:   qkv GEMV with the norm;  o GEMV with the residual;  gate|up GEMV with the norm;  down GEMV with the
             residual

Each GEMV takes this GPU's table choice as the engine does (fms.triton.gemv). Sixteen layers with distinct weights
(L2 holds none) run as one CUDA graph (scripts/bench_gemv.py's graph_time_us), replayed and timed with CUDA events;
the attention between the halves is left out (it does not change). Also checks that both give the same layer
output (within bf16 noise).

    python final_project/results/session28/fused_layer_ab.py OUT.json [--replays 50] [--rounds 3]
    python final_project/results/session28/fused_layer_ab.py OUT.json --device cpu   # interpreter check, tiny
"""

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path.cwd()
sys.path.insert(0, str(ROOT))

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("output")
parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
parser.add_argument("--replays", type=int, default=50)
parser.add_argument("--rounds", type=int, default=3, help="unfused and fused alternate, this many times each")
args = parser.parse_args()
if args.device == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from fms.bench.results import run_metadata  # noqa: E402
from fms.triton import gemv as gemv_mod  # noqa: E402
from fms.triton.rmsnorm import rms_norm_reference  # noqa: E402

if args.device == "cuda" and not torch.cuda.is_available():
    sys.exit("fused_layer_ab.py times GPU kernels; no CUDA device here (--device cpu checks the script only)")
if args.device == "cpu":
    sys.path.insert(0, str(ROOT / "tests"))
    from triton_interpreter import patch_interpreter_for_numpy_2_4

    patch_interpreter_for_numpy_2_4()
    gemv_mod.BLOCKS = (32, 64, 1, 1)  # interpreter speed
    hidden, inter, qkv_rows, layers, dtype = 64, 128, 128, 2, torch.float32
else:
    hidden, inter, qkv_rows, layers, dtype = 2048, 8192, 3072, 16, torch.bfloat16
spec = importlib.util.spec_from_file_location("bench_gemv", ROOT / "scripts" / "bench_gemv.py")
bench_gemv = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_gemv)

dev, eps = torch.device(args.device), 1e-5
torch.manual_seed(0)


def weight(n, k):
    return torch.randn(n, k, device=dev, dtype=dtype) / k ** 0.5


W = [dict(qkv=weight(qkv_rows, hidden), o=weight(hidden, hidden), gate_up=weight(2 * inter, hidden),
          down=weight(hidden, inter), ln=1 + 0.1 * torch.randn(hidden, device=dev, dtype=dtype),
          ff_ln=1 + 0.1 * torch.randn(hidden, device=dev, dtype=dtype)) for _ in range(layers)]
def _add_norm(x, y, g):
    h = x + y
    return h, rms_norm_reference(h, g, eps)


def _add(x, y):
    return x + y


compile_ = (lambda f: f) if args.device == "cpu" else (lambda f: torch.compile(f, dynamic=False))
norm = compile_(rms_norm_reference)  # inductor's kernels, as the engine's compiled layers run them
add_norm = compile_(_add_norm)
add = compile_(_add)
gemv = gemv_mod.gemv


def unfused(x, attn, w):
    qkv = gemv(norm(x, w["ln"], eps), w["qkv"])
    h, hn = add_norm(x, gemv(attn, w["o"]), w["ff_ln"])
    return qkv, add(h, gemv(gemv(hn, w["gate_up"]), w["down"], silu_mul=True))


def fused(x, attn, w):
    qkv = gemv(x, w["qkv"], norm_weight=w["ln"], eps=eps)
    h = gemv(attn, w["o"], residual=x)
    gate_up = gemv(h, w["gate_up"], norm_weight=w["ff_ln"], eps=eps)
    return qkv, gemv(gate_up, w["down"], silu_mul=True, residual=h)


def time_us(fn, x, attn) -> float:
    """Microseconds per layer: a CUDA graph of all layers on the GPU; a plain loop on the CPU (not a timing)."""
    if args.device == "cuda":
        return bench_gemv.graph_time_us(lambda j: fn(x, attn, W[j]), layers, args.replays)
    start = time.perf_counter()
    for j in range(layers):
        fn(x, attn, W[j])
    return (time.perf_counter() - start) * 1e6 / layers


results = {"metadata": run_metadata(" ".join(["python"] + sys.argv), dev), "shapes": dict(
    hidden=hidden, intermediate=inter, qkv_rows=qkv_rows, layers=layers, dtype=str(dtype)), "rows": []}
if args.device == "cpu":
    results["note"] = "CPU run in Triton's interpreter at tiny shapes: checks the script, the times mean nothing"
for rows in (1, 2):
    x = 3 * torch.randn(rows, hidden, device=dev, dtype=dtype)
    attn = torch.randn(rows, hidden, device=dev, dtype=dtype)
    with torch.no_grad():
        a, b = unfused(x, attn, W[0]), fused(x, attn, W[0])
        diffs = [((p.float() - q.float()).abs().max() / q.float().abs().max()).item() for p, q in zip(a, b)]
        runs = {"unfused": [], "fused": []}
        for r in range(args.rounds):
            for name in (("unfused", "fused") if r % 2 == 0 else ("fused", "unfused")):
                runs[name].append(time_us(unfused if name == "unfused" else fused, x, attn))
    row = {"rows": rows, "us_per_layer": runs, "rel_max_diff_qkv_out": diffs,
           "best_unfused_us": min(runs["unfused"]), "best_fused_us": min(runs["fused"])}
    row["saved_us_per_token"] = (row["best_unfused_us"] - row["best_fused_us"]) * layers
    results["rows"].append(row)
    print(json.dumps(row), flush=True)
    assert max(diffs) < 2e-2, f"fused and unfused layers differ: {diffs}"
Path(args.output).write_text(json.dumps(results, indent=1) + "\n")
print("wrote", args.output)
