#!/usr/bin/env bash
# Session 34's second device call (FINAL = $OUT): part g of run.sh (Granite-4.0-H-1B cold start, .gpu against .gpn).
FINAL=${1:?final out dir}
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 450 bash final_project/results/session34/run.sh "$FINAL" g
ls "$FINAL"
