"""Session 33 probe: does programmatic dependent launch (FMS_PDL=1) shorten the batch-1 decode's GEMV chain?

One CUDA graph holds a Llama-3.2-1B-shaped chain of 16 layers (q/k/v, o with the residual add, gate|up, the SwiGLU
down with the residual add; each layer its own weights, so nothing is served from L2) and the LM head, at 1 and 2
rows (the engine's batch-1 runs in its batch-2 graph), with an RMSNorm-like torch op before q/k/v and gate|up as in
the model (those kernels are not PDL launches). The same chain is captured with FMS_PDL unset ("off"), =1 (the next
kernel launches once every program has read its inputs) and =2 (as they exit); the replays rotate, and the graphs'
outputs must be bitwise equal (a missing wait would read stale inputs).

    python pdl_probe.py OUT.json [--rows 1,2] [--replays 50] [--rounds 7]

On the CPU (no GPU; TRITON_INTERPRET=1) it runs one layer and 1,024 rows of the head eagerly, a check of the script.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.getcwd())
from fms.triton.gemv import gemv, tuned_choice  # noqa: E402
from fms.triton.support import PDL_ENV  # noqa: E402

HIDDEN, INTER, QKV, VOCAB, LAYERS = 2048, 8192, 3072, 128256, 16


def make_weights(dev, layers):
    dt = torch.bfloat16
    g = torch.Generator(device="cpu").manual_seed(0)
    rnd = lambda *shape: (torch.randn(*shape, generator=g) / shape[-1] ** 0.5).to(dev, dt)  # noqa: E731
    return [{"qkv": rnd(QKV, HIDDEN), "o": rnd(HIDDEN, HIDDEN), "gate_up": rnd(2 * INTER, HIDDEN),
             "down": rnd(HIDDEN, INTER), "norm": torch.ones(HIDDEN, device=dev, dtype=dt)} for _ in range(layers)], \
        rnd(VOCAB, HIDDEN)


def norm(x, w):  # a torch RMSNorm between GEMVs, as the model's own (not a PDL launch)
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype) * w


def chain(x, layers, head):
    for lw in layers:
        qkv = gemv(norm(x, lw["norm"]), lw["qkv"])
        x = gemv(qkv[:, :HIDDEN].contiguous(), lw["o"], residual=x)  # the attention output stands in: q's part
        h = gemv(norm(x, lw["norm"]), lw["gate_up"])
        x = gemv(h, lw["down"], silu_mul=True, residual=x)
    return gemv(x, head)


def weight_bytes(layers, head):
    return sum(w.numel() * w.element_size() for lw in layers for k, w in lw.items() if k != "norm") \
        + head.numel() * head.element_size()


MODES = {"off": None, "on": "1", "exit": "2"}  # FMS_PDL values


def capture(x, layers, head, mode: str | None):
    if mode:
        os.environ[PDL_ENV] = mode
    else:
        os.environ.pop(PDL_ENV, None)
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):  # compile the kernels (with and without PDL) outside the capture
                chain(x, layers, head)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = chain(x, layers, head)
    finally:
        os.environ.pop(PDL_ENV, None)
    return graph, out


def replay_us(graph, replays):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / replays


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--rows", default="1,2")
    p.add_argument("--replays", type=int, default=50)
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args()
    result = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv), "torch": torch.__version__,
              "host": platform.node(), "commit": os.environ.get("FMS_GIT_COMMIT", ""), "rows": {}}
    if not torch.cuda.is_available():
        layers, head = make_weights("cpu", 1)
        y = chain(torch.randn(1, HIDDEN, dtype=torch.bfloat16), layers, head[:1024].contiguous())
        result["cpu_check"] = list(y.shape)
        print("no GPU: the chain ran eagerly once on the CPU (a check of this script), shape", tuple(y.shape))
        json.dump(result, open(args.out, "w"), indent=1)
        return
    import triton
    dev = torch.device("cuda")
    result["device"] = torch.cuda.get_device_name(dev)
    result["triton"] = triton.__version__
    result["capability"] = list(torch.cuda.get_device_capability(dev))
    result["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                      capture_output=True, text=True).stdout.strip()
    layers, head = make_weights(dev, LAYERS)
    nbytes = weight_bytes(layers, head)
    result["weight_bytes"] = nbytes
    for rows in [int(r) for r in args.rows.split(",")]:
        x = torch.randn(rows, HIDDEN, device=dev, dtype=torch.bfloat16)
        configs = {name: tuned_choice(x, w, rows, name == "down") for name, w in layers[0].items() if name != "norm"}
        graphs = {name: capture(x, layers, head, mode) for name, mode in MODES.items()}
        for g, _ in graphs.values():
            g.replay()
        torch.cuda.synchronize()
        equal = all(torch.equal(out, graphs["off"][1]) for _, out in graphs.values())
        names = list(MODES)
        times = {name: [] for name in names}
        for r in range(args.rounds):  # rotate the order every round
            for name in names[r % len(names):] + names[:r % len(names)]:
                times[name].append(replay_us(graphs[name][0], args.replays))
        med = {k: statistics.median(v) for k, v in times.items()}
        row = {"outputs_bitwise_equal": equal, "configs": {k: str(v) for k, v in configs.items()},
               "graph_us": times, "median_us": med,
               "tb_s": {k: nbytes / v / 1e6 for k, v in med.items()},
               "over_off": {k: v / med["off"] for k, v in med.items()},
               "tokens_per_s_bound": {k: 1e6 / v for k, v in med.items()}}
        result["rows"][str(rows)] = row
        print(f"rows {rows}: " + ", ".join(f"{k} {v:.1f} us ({row['over_off'][k]:.3f})" for k, v in med.items())
              + f"; outputs equal {equal}", flush=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    result["process_s"] = time.process_time()
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
