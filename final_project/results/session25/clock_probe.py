"""Does an idle GPU start slow? A bf16 matmul's time right after the GPU sat idle for a while, against its time
when the GPU is busy: the first of issue 18's server runs is a small prefill that took 27-57 ms (a full 8,192-token
step takes ~40 ms), and the server's GPU idles ~0.3-0.5 s before each timed run while the offline engine's runs
follow each other at once.

    python final_project/results/session25/clock_probe.py OUT.json
"""
import json
import subprocess
import sys
import time

import torch


def clocks() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,clocks.mem,power.draw,pstate",
                               "--format=csv,noheader"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        return f"nvidia-smi failed: {e}"


def main(out: str) -> None:
    n = 4096
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(40)]

    def busy(seconds: float) -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            for _ in range(20):
                a @ b
            torch.cuda.synchronize()

    def timed() -> list[float]:
        for start, stop in events:
            start.record()
            a @ b
            stop.record()
        torch.cuda.synchronize()
        return [start.elapsed_time(stop) for start, stop in events]

    busy(1.0)
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "matmul": f"bf16 {n}^3",
              "clocks_busy": None, "runs": []}
    busy(0.3)
    report["clocks_busy"] = clocks()
    for idle in (0.0, 0.05, 0.1, 0.2, 0.5, 1.0, 0.0, 0.5):
        busy(0.3)
        time.sleep(idle)
        wall = time.perf_counter()
        ms = timed()
        wall = 1e3 * (time.perf_counter() - wall)
        row = {"idle_s": idle, "first_ms": ms[0], "first5_mean_ms": sum(ms[:5]) / 5, "last20_mean_ms": sum(ms[20:]) / 20,
               "wall_40_ms": wall, "per_op_ms": ms}
        report["runs"].append(row)
        print(f"idle {idle:4.2f} s: first {ms[0]:.3f} ms, first 5 {row['first5_mean_ms']:.3f}, last 20 "
              f"{row['last20_mean_ms']:.3f}, 40 ops {wall:.1f} ms wall", flush=True)
    time.sleep(0.5)
    report["clocks_after_idle_0.5s"] = clocks()
    print("clocks busy:", report["clocks_busy"], "| after 0.5 s idle:", report["clocks_after_idle_0.5s"])
    with open(out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
