#!/usr/bin/env bash
# Restructuring check: the serving benchmark (Llama-3.2-1B shape, random bf16 weights, 128 requests,
# prompts 64-512, 256 new tokens, three timed passes on one engine) and batch-1 decode (128-token
# prompt, 512 new) on the commit before the restructuring (.before = git archive 4e66ff6) and on this
# tree, alternating, in one device call. Usage: bash final_project/results/restructure/run.sh OUT_DIR [ROUND]
set -u
OUT=${1:?out dir}; ROUND=${2:-1}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/device_r$ROUND.txt" 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$OUT/device_r$ROUND.txt" 2>&1
git rev-parse HEAD >> "$OUT/device_r$ROUND.txt" 2>&1 || true
ARGS="--decode_steps_sweep 16,16,16 --batch1_tokens 512"
for tree in before after; do
  dir=.; [ "$tree" = before ] && dir=.before
  start=$(date +%s.%N)
  (cd "$dir" && PYTHONPATH=$PWD timeout 280 python3 scripts/benchmark_serving.py --results_dir "$OUT/tmp_$tree" $ARGS) \
    > "$OUT/log_${tree}_r$ROUND.txt" 2>&1
  echo "exit $? wall $(python3 -c "import time; print(round(time.time() - $start, 1))") s" >> "$OUT/log_${tree}_r$ROUND.txt"
  cp "$OUT/tmp_$tree/serving.json" "$OUT/serving_${tree}_r$ROUND.json" 2>/dev/null
  rm -rf "$OUT/tmp_$tree"
  tail -6 "$OUT/log_${tree}_r$ROUND.txt"
done
