#!/bin/bash
# CPU (2 cores): scripts/bench_server_overhead.py (server vs offline engine, a 1-layer model whose forward costs
# little) with 128 prompts of 64-128 token ids (the model holds 256 tokens), 3 rounds of three trees in turn:
# de2ec5e (FastAPI POST routes; worktree /tmp/wt), edee959 (plain ASGI POST routes; /tmp/wt2), and this tree
# (plus decode windows that ramp up after each prefill).
# Usage: git worktree add /tmp/wt de2ec5e; git worktree add /tmp/wt2 edee959;
#        bash final_project/results/session18/cpu/run_server_overhead.sh
out=$PWD/final_project/results/session18/cpu
for i in 1 2 3; do
  for tree in /tmp/wt:fastapi /tmp/wt2:asgi $PWD:asgi_ramp; do
    dir=${tree%%:*}; name=${tree##*:}
    (cd $dir && PYTHONPATH=$dir OMP_NUM_THREADS=1 python scripts/bench_server_overhead.py --prompt-range 64,128 \
       --output $out/server_overhead_${name}_$i.json > $out/log_server_overhead_${name}_$i.txt 2>&1)
  done
done
