#!/usr/bin/env bash
# Session 34's third device call (FINAL = $OUT), with .gpn rebuilt on the unbacked-batch commit: parts u, c and G
# of run.sh (GPU tests, 1B serving + batch-1 .gpu against .gpn, Granite-4.0-H-1B cold start .gpu against .gpn).
FINAL=${1:?final out dir}
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 140 bash final_project/results/session34/run.sh "$FINAL" u
timeout 170 bash final_project/results/session34/run.sh "$FINAL" c
timeout 130 bash final_project/results/session34/run.sh "$FINAL" G
ls "$FINAL"
