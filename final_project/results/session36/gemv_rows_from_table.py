"""What a GPU's shipped GEMV table says one decode step's projections cost at one row against two rows (the engine
runs batch 1 at two rows, in the batch-2 graph, unless its batch is unbacked): per layer the fused q/k/v, o, gate|up
and the down projection with SwiGLU fused (silu_mul), plus the LM head once, each at the table's chosen kernel's
measured time. Shapes from the registered model's config (fms.bench.gemv, as `fms bench gemv --model` takes them).

    PYTHONPATH=. python final_project/results/session36/gemv_rows_from_table.py fms/resources/gemv/NVIDIA_H200.json \
        [llama:3.2-1b]
"""
import json
import sys

from fms.bench.gemv import model_shapes, projection_shapes
from fms.models import get_config

spec = sys.argv[2] if len(sys.argv) > 2 else "llama:3.2-1b"
layers = get_config(*spec.split(":")).num_layers
shapes = projection_shapes(**model_shapes(spec))
per_step = [(shapes[name], name == "down", 1 if name == "lm_head" else layers) for name in shapes]
table = json.load(open(sys.argv[1]))
times = {(e["rows"], e["n"], e["k"], e["silu_mul"]): e["us"] for e in table["entries"]}
for rows in (1, 2):
    missing = [(n, k, fused) for (n, k), fused, _ in per_step if (rows, n, k, fused) not in times]
    if missing:
        print(f"{rows} row(s): the table lists no entry for {missing}")
        continue
    total = sum(times[(rows, n, k, fused)] * count for (n, k), fused, count in per_step)
    print(f"{rows} row(s): {total:.1f} us of projections per decode step ({table['device']}, {spec})")
