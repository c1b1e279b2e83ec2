"""What a GPU's shipped GEMV table says one Llama-3.2-1B decode step's projections cost at one row against two rows
(the engine runs batch 1 at two rows, in the batch-2 graph, unless its batch is unbacked): the sum over 16 layers of
q/k/v (3072 x 2048), o (2048 x 2048), gate|up (16384 x 2048) and the down projection with SwiGLU fused
(2048 x 8192, silu_mul), plus the LM head (128256 x 2048), each at the table's chosen kernel's measured time.

    python final_project/results/session36/gemv_rows_from_table.py fms/resources/gemv/NVIDIA_H200.json
"""
import json
import sys

LAYERS = 16
SHAPES = [((3072, 2048, False), LAYERS), ((2048, 2048, False), LAYERS), ((16384, 2048, False), LAYERS),
          ((2048, 8192, True), LAYERS), ((128256, 2048, False), 1)]
table = json.load(open(sys.argv[1]))
times = {(e["rows"], e["n"], e["k"], e["silu_mul"]): e["us"] for e in table["entries"]}
for rows in (1, 2):
    missing = [s for s, _ in SHAPES if (rows, *s) not in times]
    if missing:
        print(f"{rows} row(s): the table lists no entry for {missing}")
        continue
    total = sum(times[(rows, *s)] * n for s, n in SHAPES)
    print(f"{rows} row(s): {total:.1f} us of projections per decode step ({table['device']})")
