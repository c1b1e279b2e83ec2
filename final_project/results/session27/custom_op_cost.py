"""What a torch.library custom op's dispatch costs per call on this machine's CPU: a trivial op (clone of 4 floats)
called as the plain function, through the CustomOpDef and through torch.ops, with and without grad mode.

    python final_project/results/session27/custom_op_cost.py OUT.json
"""
import json
import sys
import time

import torch


def _clone(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


@torch.library.custom_op("probe27::clone", mutates_args=())
def _clone_op(x: torch.Tensor) -> torch.Tensor:
    return _clone(x)


@_clone_op.register_fake
def _(x):
    return torch.empty_like(x)


def per_call_us(fn, x, n=20000) -> float:
    for _ in range(1000):
        fn(x)
    start = time.perf_counter()
    for _ in range(n):
        fn(x)
    return (time.perf_counter() - start) / n * 1e6


x = torch.zeros(4)
report = {"command": " ".join(["python", *sys.argv]), "torch": torch.__version__, "us_per_call": {}}
for grad in (True, False):
    with torch.set_grad_enabled(grad):
        for name, fn in (("plain function", _clone), ("CustomOpDef", _clone_op),
                         ("torch.ops overload", torch.ops.probe27.clone.default)):
            report["us_per_call"][f"{name}, grad {'on' if grad else 'off'}"] = round(per_call_us(fn, x), 2)
print(json.dumps(report, indent=1))
json.dump(report, open(sys.argv[1], "w"), indent=1)
