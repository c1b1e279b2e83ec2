#!/usr/bin/env bash
# Session 33's second device call (FINAL = $OUT): the PDL probe with its three modes (part d), then on an H200 the
# batch-128 decode-step profile (session31 part p) and Granite-4.0-H-1B's cold start, two or three runs in 230 s (session30 part h).
FINAL=${1:?final out dir}
nvidia-smi --query-gpu=name --format=csv,noheader
bash final_project/results/session33/run.sh "$FINAL" d
if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
  timeout 150 bash final_project/results/session31/run.sh "$FINAL" p
  timeout 230 bash final_project/results/session30/run.sh "$FINAL" h
fi
ls "$FINAL"
