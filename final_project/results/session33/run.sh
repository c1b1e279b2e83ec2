#!/usr/bin/env bash
# Session 33 device run. Usage: run.sh FINAL PARTS (carry .gpu; `bash final_project/results/build_trees.sh .gpu:REV`).
# Raw files in /tmp/raw_PART, packed into FINAL/PART.tgz after each step.
#   part d (~60 s): pdl_probe.py: the batch-1 GEMV chain (16 layers + LM head, 1 and 2 rows) in a CUDA graph with
#     programmatic dependent launch off, FMS_PDL=1 and FMS_PDL=2, rotating replays, outputs compared bitwise
#   part P (~90 s): issue 19's 1B serving + batch-1 in .gpu with FMS_PDL unset, =1, =1, unset
#   (session 32's parts k and S: `bash final_project/results/session32/run.sh FINAL kS`)
set -u
FINAL=${1:?final out dir}; PART=${2:?part}
OUT=/tmp/raw_$PART; mkdir -p "$OUT"
source final_project/results/device_steps.sh
part_d() {
  step pdl_probe 150 python3 ../final_project/results/session33/pdl_probe.py "$OUT/pdl_probe.json"
}
part_P() {
  serving_1b gpu1
  FMS_PDL=1 serving_1b gpu2 gpu3
  serving_1b gpu4
}
run_parts "$PART"
