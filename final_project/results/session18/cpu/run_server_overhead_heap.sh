#!/bin/bash
# CPU (2 cores): scripts/bench_server_overhead.py, 128 prompts of 64-128 token ids, 4 rounds of two trees in turn,
# both with the frozen start-up heaps (3e48551's fms.entrypoints.heap): de2ec5e with that commit's code applied
# (FastAPI POST routes, no window ramp; worktree /tmp/wtA) against this tree (plain ASGI POST routes, the ramp).
# Usage: git worktree add /tmp/wtA de2ec5e && (cd /tmp/wtA && git cherry-pick -n 3e48551; resolve the results
#        file); bash final_project/results/session18/cpu/run_server_overhead_heap.sh
out=$PWD/final_project/results/session18/cpu
for i in 1 2 3 4; do
  for tree in /tmp/wtA:heap_fastapi $PWD:heap_asgi_ramp; do
    dir=${tree%%:*}; name=${tree##*:}
    (cd $dir && PYTHONPATH=$dir OMP_NUM_THREADS=1 python scripts/bench_server_overhead.py --prompt-range 64,128 \
       --output $out/server_overhead_${name}_$i.json > $out/log_server_overhead_${name}_$i.txt 2>&1)
  done
done
