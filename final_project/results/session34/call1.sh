#!/usr/bin/env bash
# Session 34's first device call (FINAL = $OUT): parts t and b of run.sh, session 33's PDL probe with modes off/1/2
# (part d, in .gpu), then on an H200 the batch-128 decode-step profile in .gpn (session 31 part p).
FINAL=${1:?final out dir}
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 330 bash final_project/results/session34/run.sh "$FINAL" tb
timeout 90 bash final_project/results/session33/run.sh "$FINAL" d
if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
  TREE=.gpn timeout 150 bash final_project/results/session31/run.sh "$FINAL" p
fi
ls "$FINAL"
