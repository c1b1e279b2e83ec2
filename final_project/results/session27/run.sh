#!/usr/bin/env bash
# Session 27 device runs. Usage: run.sh FINAL PARTS (carry .gpu, .wA and, for parts G/B, .wB; built by
# `bash final_project/results/build_trees.sh .gpu:REV .wA:b56d112`, then `cp -r .gpu .wB && patch -d .wB -p1 <
# final_project/results/session27/no_autotune_pointwise.patch && echo "$(cat .gpu/COMMIT)+no-autotune-pointwise" >
# .wB/COMMIT`). Raw files in /tmp/raw_PART, packed into FINAL/PART.tgz
# after each step.
#   part g (~105 s): Granite-4.0-H-1B cold start-up, three fresh processes (bench_startup.py)
#   part q (~35 s): one run of the session-26 probe on Granite-4.0-H-1B (dynamo's compile times, fms's own Triton
#     compiles)
#   part s (~110 s): issue 19's 1B serving workload x3 + batch-1 on .gpu
#   part e (~120 s): issue 19's fp32 eval, 21 interleaved pairs, context shared and not, on .gpu
#   part p (~130 s): prefill_ab.py (one prefill step's time by size, 8 rounds) on .wA, .gpu, .gpu, .wA
#   part t (~60 s): the GEMV and varlen tests on .gpu (the compiled prefill's graphs among them)
#   part G (~70 s): Granite-4.0-H-1B cold start-up, two fresh processes, on .wB (.gpu with inductor's
#     triton.autotune_pointwise off for the decode step)
#   part B (~110 s): the 1B serving workload x3 + batch-1 on .wB
#   part P (~70 s): prefill_ab.py on .wA then .gpu
#   part b (~220 s): issue 19's 1B serving workload x3 + batch-1 on .gpu then .wA
set -u
FINAL=${1:?final out dir}; PART=${2:?part}
OUT=/tmp/raw_$PART; mkdir -p "$OUT"
source final_project/results/device_steps.sh
# Each RUN names its tree and a count, as device_steps.sh's serving_1b does: gpu1 runs in .gpu, wB2 in .wB.
startup_gh() {  # startup_gh RUN...: Granite-4.0-H-1B's cold start-up (bench_startup.py) once per RUN
  for run in "$@"; do
    TREE=.${run%?} step startup_gh_$run 100 python3 scripts/bench_startup.py --models granite_hybrid:4.0-h-1b \
      --runs cold --timeout 90 --output "$OUT/startup_gh_$run.json"
  done
}
prefill_ab() {  # prefill_ab RUN...: prefill_ab.py (8 rounds) once per RUN
  for run in "$@"; do
    TREE=.${run%?} step prefill_ab_$run 75 python3 ../final_project/results/session27/prefill_ab.py \
      "$OUT/prefill_ab_$run.json" 8
  done
}
for PART_ in $(echo $PART | grep -o .); do
case $PART_ in
  g) startup_gh gpu1 gpu2 gpu3 ;;
  q)
    TRITON_CACHE_DIR=$(mktemp -d) TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) step probe_gh 90 \
      python3 ../final_project/results/session26/startup_probe.py granite_hybrid:4.0-h-1b "$OUT/np_gh" --no-profile
    ;;
  s) serving_1b gpu1 ;;
  b) serving_1b gpu1 wA1 ;;
  B) serving_1b wB1 ;;
  G) startup_gh wB1 wB2 ;;
  P) prefill_ab wA1 gpu1 ;;
  p) prefill_ab wA1 gpu1 gpu2 wA2 ;;
  t) step gpu_tests 120 python3 -m pytest -q -p no:cacheprovider tests/triton/test_gemv.py tests/triton/test_varlen.py ;;
  e) eval_fp32 ;;
  *) echo "unknown part $PART_"; exit 2 ;;
esac
done
nproc > "$OUT/nproc.txt"; lscpu | head -20 >> "$OUT/nproc.txt"; pack
