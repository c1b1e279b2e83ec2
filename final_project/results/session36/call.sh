#!/usr/bin/env bash
# Session 36's device call (FINAL = $OUT). Trees: `bash final_project/results/build_trees.sh .gpu:b32a87c .gpn:REV`,
# carry .gpu and .gpn. Session 35's call (session 34's run.sh parts u, c, G: the unbacked batch's GPU tests, the 1B
# serving + batch-1 in pairs, Granite-4.0-H-1B's cold start), then part p of this file: where the default engine's
# decode step goes on this GPU (scripts/profile_serving.py in .gpn, without the option), after one serving run of
# .gpn with both --unbacked_batch and FMS_FUSE_NORM=1 (the norm fusion lost at the two rows where batch 1 ran until
# now, section 20; with its own graph batch 1 runs at one row, where it saved 2.7 us a layer).
FINAL=${1:?final out dir}
nvidia-smi --query-gpu=name --format=csv,noheader
bash final_project/results/session35/call.sh "$FINAL"
PART=p; OUT=/tmp/raw_p; mkdir -p "$OUT"
source final_project/results/device_steps.sh
FMS_FUSE_NORM=1 TREE=.gpn step serving_1b_gpnF 110 python3 scripts/benchmark_serving.py --variant 3.2-1b $WORKLOAD \
  --unbacked_batch --results_dir "$OUT/serving_1b_gpnF"
TREE=.gpn step profile_1b ${P_LIMIT:-160} python3 scripts/profile_serving.py --num_requests 128 --prompt_range 64,512 \
  --output_len 128 --step_batch_sizes 1,2,32,128 --kernel_batch_sizes 1,128 --top 40 --results_dir "$OUT/profile_1b"
pack; ls "$FINAL"
