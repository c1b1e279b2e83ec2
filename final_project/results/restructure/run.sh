#!/usr/bin/env bash
# Restructuring check: the serving benchmark (Llama-3.2-1B shape, random bf16 weights, 128 requests,
# prompts 64-512, 256 new tokens, three timed passes on one engine) and batch-1 decode (128-token
# prompt, 512 new) on the commit before the restructuring (.before = git archive 4e66ff6) and on this
# tree, one after the other in one device call. Usage: run.sh OUT_DIR [ROUND] [ORDER], ORDER "before after"
# (default) or "after before" (the first process of a call also fills the inductor cache).
set -u
OUT=${1:?out dir}; ROUND=${2:-1}; ORDER=${3:-before after}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/device_r$ROUND.txt" 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$OUT/device_r$ROUND.txt" 2>&1
echo "after tree: $(cat .after/COMMIT 2>/dev/null || git rev-parse HEAD)" >> "$OUT/device_r$ROUND.txt" 2>&1
ARGS="--decode_steps_sweep 16,16,16 --batch1_tokens 512"
for tree in $ORDER; do
  # .before: git archive 4e66ff6; .after: git archive of the commit in .after/COMMIT (a clean tree,
  # not the working copy); without .after, this tree
  dir=.; [ "$tree" = before ] && dir=.before; [ "$tree" = after ] && [ -d .after ] && dir=.after
  start=$(date +%s.%N)
  # the new tree's engine defaults to compile_scope "layers" since session 15; the old one compiles the whole model
  scope=""; [ "$tree" != before ] && scope="--compile_scope model"
  (cd "$dir" && PYTHONPATH=$PWD timeout 420 python3 scripts/benchmark_serving.py --results_dir "$OUT/tmp_$tree" $ARGS $scope) \
    > "$OUT/log_${tree}_r$ROUND.txt" 2>&1
  echo "exit $? wall $(python3 -c "import time; print(round(time.time() - $start, 1))") s" >> "$OUT/log_${tree}_r$ROUND.txt"
  cp "$OUT/tmp_$tree/serving.json" "$OUT/serving_${tree}_r$ROUND.json" 2>/dev/null
  rm -rf "$OUT/tmp_$tree"
  tail -6 "$OUT/log_${tree}_r$ROUND.txt"
done
