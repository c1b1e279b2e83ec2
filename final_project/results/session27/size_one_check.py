"""Can one compile with a symbolic batch serve batch 1 too, under torch.fx.experimental._config.backed_size_oblivious?
Two functions compiled with dynamic=True at batch 4, then called at 3, 1 and 2: a matmul + reduction, and the same
with a slice assignment into a buffer (as a decode step writes its rows). Prints the compile count of each with the
flag off and on.

    python final_project/results/session27/size_one_check.py OUT.json
"""
import json
import sys

import torch
from torch._dynamo.testing import CompileCounter


def plain(x, w, buf):
    return (x @ w).relu().sum(-1)


def with_slice_write(x, w, buf):
    y = (x @ w).relu()
    buf[: x.shape[0]] = y.sum(-1)
    return y.view(x.shape[0], -1).sum(-1) + x[:, 0, 0]


report = {"command": " ".join(["python", *sys.argv]), "torch": torch.__version__, "compiles": {}}
w, buf = torch.randn(8, 8), torch.zeros(10, 1)
for fn in (plain, with_slice_write):
    for flag in (False, True):
        torch._dynamo.reset()
        counter = CompileCounter()
        compiled = torch.compile(fn, backend=counter, dynamic=True)
        with torch.fx.experimental._config.patch(backed_size_oblivious=flag):
            for batch in (4, 3, 1, 2):
                x = torch.randn(batch, 1, 8)
                torch.testing.assert_close(compiled(x, w, buf), fn(x, w, buf.clone()))
        report["compiles"][f"{fn.__name__}, backed_size_oblivious={flag}"] = counter.frame_count
print(json.dumps(report, indent=1))
json.dump(report, open(sys.argv[1], "w"), indent=1)
