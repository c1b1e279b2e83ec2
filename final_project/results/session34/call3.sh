#!/usr/bin/env bash
# Session 34's third device call (FINAL = $OUT), with .gpn rebuilt on the unbacked-batch commit: parts u, c and G
# of run.sh (GPU tests, 1B serving + batch-1 .gpu against .gpn, Granite-4.0-H-1B cold start .gpu against .gpn).
# SHORT=1: part c with one pair (gpu1, gpn1) only.
FINAL=${1:?final out dir}
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 140 bash final_project/results/session34/run.sh "$FINAL" u
if [ "${SHORT:-0}" = 1 ]; then PAIRS=1 timeout 100 bash final_project/results/session34/run.sh "$FINAL" c
else timeout 170 bash final_project/results/session34/run.sh "$FINAL" c; fi
timeout 130 bash final_project/results/session34/run.sh "$FINAL" G
ls "$FINAL"
