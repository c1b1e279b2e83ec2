#!/bin/bash
# CPU (2 cores): scripts/bench_server_overhead.py (server vs offline engine, a 1-layer model whose forward costs
# little) with 128 prompts of 64-128 token ids (the model holds 256 tokens), 3 runs of the tree before the plain-ASGI POST routes (de2ec5e, a
# worktree at /tmp/wt) and 3 after (this tree), alternated.
# Usage: git worktree add /tmp/wt de2ec5e; bash final_project/results/session18/cpu/run_server_overhead.sh
out=$PWD/final_project/results/session18/cpu
for i in 1 2 3; do
  (cd /tmp/wt && PYTHONPATH=/tmp/wt OMP_NUM_THREADS=1 python scripts/bench_server_overhead.py --prompt-range 64,128 \
     --output $out/server_overhead_before_$i.json > $out/log_server_overhead_before_$i.txt 2>&1)
  OMP_NUM_THREADS=1 python scripts/bench_server_overhead.py --prompt-range 64,128 \
     --output $out/server_overhead_after_$i.json > $out/log_server_overhead_after_$i.txt 2>&1
done
