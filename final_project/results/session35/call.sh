#!/usr/bin/env bash
# Session 35's device call (FINAL = $OUT): session 34's run.sh parts u, c and G with .gpn at this session's fixes of
# the unbacked batch (the attention output's base marked, a contiguous paged-decode output). Trees:
# `bash final_project/results/build_trees.sh .gpu:b32a87c .gpn:REV`, carry .gpu and .gpn. PAIRS=1: one serving pair.
FINAL=${1:?final out dir}
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 100 bash final_project/results/session34/run.sh "$FINAL" u
PAIRS=${PAIRS:-2} timeout ${C_LIMIT:-170} bash final_project/results/session34/run.sh "$FINAL" c
timeout 130 bash final_project/results/session34/run.sh "$FINAL" G
ls "$FINAL"
