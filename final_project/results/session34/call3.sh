#!/usr/bin/env bash
# Session 34's third device call (FINAL = $OUT), .gpn built on the unbacked_batch option (off by default): run.sh
# part u (GPU engine tests, the batch-of-one trace test with unbacked_batch) and part c (1B serving + batch-1, .gpu
# against .gpn with --unbacked_batch; PAIRS=1 for one pair), then part G (Granite-4.0-H-1B cold start, .gpn with
# --unbacked-batch).
FINAL=${1:?final out dir}
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 140 bash final_project/results/session34/run.sh "$FINAL" u
timeout 170 bash final_project/results/session34/run.sh "$FINAL" c
timeout 130 bash final_project/results/session34/run.sh "$FINAL" G
ls "$FINAL"
