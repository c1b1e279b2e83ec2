#!/usr/bin/env bash
# Session 30 device run. Usage: run.sh FINAL PARTS (carry .gpu, .wA, .wB; built by
# `bash final_project/results/build_trees.sh .gpu:REV .wA:35fd80b .wB:REV`). Raw files in /tmp/raw_PART, packed
# into FINAL/PART.tgz after each step. TREES (default ../.wA,../.gpu,../.wB), ROUNDS and L_LIMIT adjust part l.
# Next (session 31): `bash final_project/results/build_trees.sh .gpu:HEAD .wB:9bfe15d`, then
# `TREES=../.wB,../.gpu bash final_project/results/session30/run.sh $OUT Plh` (carry .gpu and .wB): the build
# without sympy and the GPU profile of what is left of it, then Granite's cold start if the machine is an H200.
#   part s (~30 s): tests/utils/test_serialization.py on the GPU, in .gpu then .wB
#   part l (~120 s): session 29's load_ab.py, Llama-3.2-1B: .wA (safetensors' device reads), .gpu (memory map into
#     the pinned ring), .wB (os.preadv into the ring on threads), cold and warm, two rounds
#   part L (~300 s, rows written as they finish): the same for Llama-3.1-8B
#   part D (~40 s): disk_read.py: the disk's own cold and warm read rate for the 8B checkpoint (part L writes it), 1, 4
#     and 16 threads of 64 MB preads, no GPU: the ceiling for a cold load
#   part P (~30 s): profile_get_model.py: cProfile of get_model from the 1B checkpoint on .gpu (where the build goes)
#   part h (~105 s): part g on an H200 only (the target's GPU); skipped elsewhere
#   part g (~105 s): Granite-4.0-H-1B cold start-up, three fresh processes (bench_startup.py), on .gpu
set -u
FINAL=${1:?final out dir}; PART=${2:?part}
OUT=/tmp/raw_$PART; mkdir -p "$OUT"
source final_project/results/device_steps.sh
TREES=${TREES:-../.wA,../.gpu,../.wB}
for PART_ in $(echo $PART | grep -o .); do
case $PART_ in
  s) for run in gpu wB; do
       TREE=.$run step serialization_tests_$run 90 python3 -m pytest -q -p no:cacheprovider tests/utils/test_serialization.py
     done ;;
  l) step load_ab_1b ${L_LIMIT:-150} python3 ../final_project/results/session29/load_ab.py "$OUT/load_ab_1b.json" \
       --model llama:3.2-1b --trees $TREES --rounds ${ROUNDS:-2} ;;
  L) step load_ab_8b 300 python3 ../final_project/results/session29/load_ab.py "$OUT/load_ab_8b.json" \
       --model llama:3.1-8b --trees $TREES --rounds 2 ;;
  D) step disk_read 90 python3 ../final_project/results/session30/disk_read.py "$OUT/disk_read.json" \
       /tmp/ckpt_ab/llama-3.1-8b ;;
  P) step profile_get_model 120 python3 ../final_project/results/session30/profile_get_model.py \
       "$OUT/profile_get_model_1b" --model llama:3.2-1b ;;
  h) if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
       for run in gpu1 gpu2 gpu3; do
         step startup_gh_$run 100 python3 scripts/bench_startup.py --models granite_hybrid:4.0-h-1b --runs cold \
           --timeout 90 --output "$OUT/startup_gh_$run.json"
       done
     else echo "part h: not an H200, skipped"; fi ;;
  g) for run in gpu1 gpu2 gpu3; do
       step startup_gh_$run 100 python3 scripts/bench_startup.py --models granite_hybrid:4.0-h-1b --runs cold \
         --timeout 90 --output "$OUT/startup_gh_$run.json"
     done ;;
  *) echo "unknown part $PART_"; exit 2 ;;
esac
done
pack
