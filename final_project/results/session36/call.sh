#!/usr/bin/env bash
# Session 36's device call (FINAL = $OUT). Trees: `bash final_project/results/build_trees.sh .gpu:b32a87c .gpn:REV`,
# carry .gpu and .gpn. Each step is packed as it ends (a call cut short returns what finished), in order of need:
#   u: the unbacked batch's GPU engine tests in .gpn (session 34's run.sh part u)
#   w: off the H200 (whose shipped table has one-row entries), a one-row GEMV table for this GPU, written to
#      /tmp/gemv_tables (FMS_GEMV_TABLE_DIR, read over the shipped table by every later step of this call; copied into
#      the results): with the unbacked batch, batch 1 runs at one row, where the H100's shipped table (two rows
#      only) leaves the untuned default blocks
#   c: 1B serving + batch-1 pairs, .gpu (b32a87c) against .gpn with --unbacked_batch (run.sh part c)
#   G: Granite-4.0-H-1B cold start, .gpu against .gpn with --unbacked-batch (run.sh part G)
#   F: .gpn serving with --unbacked_batch and FMS_FUSE_NORM=1 (the norm fusion lost at the two rows where batch 1
#      ran, section 20; at one row it saved 2.7 us a layer)
#   p: where the default engine's decode step goes on this GPU (scripts/profile_serving.py in .gpn)
# For a short budget: PAIRS=1 C_LIMIT=100 (one serving pair), F_LIMIT=0 and P_LIMIT=0 (skip F, p), W=0 (skip w).
FINAL=${1:?final out dir}
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 100 bash final_project/results/session34/run.sh "$FINAL" u
export FMS_GEMV_TABLE_DIR=/tmp/gemv_tables; mkdir -p "$FMS_GEMV_TABLE_DIR"
PART=w; OUT=/tmp/raw_w; mkdir -p "$OUT"
source final_project/results/device_steps.sh
if [ "${W:-1}" = 1 ] && ! nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
  TREE=.gpn step gemv_rows1 100 python3 scripts/bench_gemv.py --rows 1 --write_table "$FMS_GEMV_TABLE_DIR" \
    --results_dir "$OUT/gemv_rows1"
  cp "$FMS_GEMV_TABLE_DIR"/*.json "$OUT/" 2>/dev/null; pack
fi
PAIRS=${PAIRS:-2} timeout ${C_LIMIT:-170} bash final_project/results/session34/run.sh "$FINAL" c
timeout 130 bash final_project/results/session34/run.sh "$FINAL" G
PART=p; OUT=/tmp/raw_p; mkdir -p "$OUT"
source final_project/results/device_steps.sh
[ "${F_LIMIT:-110}" -gt 0 ] && FMS_FUSE_NORM=1 TREE=.gpn step serving_1b_gpnF ${F_LIMIT:-110} python3 scripts/benchmark_serving.py --variant 3.2-1b $WORKLOAD \
  --unbacked_batch --results_dir "$OUT/serving_1b_gpnF"
[ "${P_LIMIT:-160}" -gt 0 ] && TREE=.gpn step profile_1b ${P_LIMIT:-160} python3 scripts/profile_serving.py --num_requests 128 --prompt_range 64,512 \
  --output_len 128 --step_batch_sizes 1,2,32,128 --kernel_batch_sizes 1,128 --top 40 --results_dir "$OUT/profile_1b"
pack; ls "$FINAL"
