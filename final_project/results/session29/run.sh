#!/usr/bin/env bash
# Session 29 device run. Usage: run.sh FINAL PARTS (carry .gpu and .wA; built by
# `bash final_project/results/build_trees.sh .gpu:REV .wA:35fd80b`). Raw files in /tmp/raw_PART, packed into
# FINAL/PART.tgz after each step.
#   part l (~80 s): load_ab.py, Llama-3.2-1B checkpoint: .wA (safetensors' device reads) against .gpu (the pinned
#     ring), cold and warm, two rounds
#   part L (~160 s, cut at 140 s; rows written as they finish): the same for Llama-3.1-8B
#   part s (~15 s): tests/utils/test_serialization.py on the GPU (the CUDA load through the ring equals the CPU load)
set -u
FINAL=${1:?final out dir}; PART=${2:?part}
OUT=/tmp/raw_$PART; mkdir -p "$OUT"
source final_project/results/device_steps.sh
for PART_ in $(echo $PART | grep -o .); do
case $PART_ in
  l) step load_ab_1b 120 python3 ../final_project/results/session29/load_ab.py "$OUT/load_ab_1b.json" \
       --model llama:3.2-1b --trees ../.wA,../.gpu --rounds 2 ;;
  L) step load_ab_8b 140 python3 ../final_project/results/session29/load_ab.py "$OUT/load_ab_8b.json" \
       --model llama:3.1-8b --trees ../.wA,../.gpu --rounds 2 ;;
  s) step serialization_tests 90 python3 -m pytest -q -p no:cacheprovider tests/utils/test_serialization.py ;;
  *) echo "unknown part $PART_"; exit 2 ;;
esac
done
pack
