#!/usr/bin/env bash
# Session 28 device runs. Usage: run.sh FINAL PARTS (carry .gpu and, for part P, .wA; built by
# `bash final_project/results/build_trees.sh .gpu:REV .wA:b56d112`). Raw files in /tmp/raw_PART, packed into
# FINAL/PART.tgz after each step.
#   part t (~90 s): the GEMV (plain and fused), fused-norm model and varlen tests on .gpu
#   part k (~60 s): fused_layer_ab.py: one layer's projections and glue, unfused against KernelConfig.fuse_norm,
#     batch 1 and 2, 1B shapes, CUDA graphs
#   part f (~220 s): issue 19's 1B serving workload x3 + batch-1 on .gpu, FMS_FUSE_NORM=0 then 1
#   part F (~220 s): the same, FMS_FUSE_NORM=1 then 0 (the other order)
#   part g (~105 s): Granite-4.0-H-1B cold start-up, three fresh processes (bench_startup.py)
#   part P (~70 s): session 27's prefill_ab.py on .wA then .gpu
#   part c (~240 s): checkpoint load rate (GB/s): a bf16 safetensors checkpoint written by bench_startup.py, then a
#     cold (page cache dropped) and a warm start from it; Llama-3.2-1B, then Llama-3.1-8B
set -u
FINAL=${1:?final out dir}; PART=${2:?part}
OUT=/tmp/raw_$PART; mkdir -p "$OUT"
source final_project/results/device_steps.sh
fuse_ab() {  # fuse_ab SETTING...: the 1B serving workload + batch-1 on .gpu once per FMS_FUSE_NORM setting
  for fuse in "$@"; do
    FMS_FUSE_NORM=$fuse step serving_1b_fuse${fuse}_$PART 110 python3 scripts/benchmark_serving.py \
      --variant 3.2-1b $WORKLOAD --results_dir "$OUT/serving_1b_fuse${fuse}_$PART"
  done
}
for PART_ in $(echo $PART | grep -o .); do
case $PART_ in
  t) step gpu_tests 150 python3 -m pytest -q -p no:cacheprovider tests/triton/test_gemv.py \
       tests/triton/test_gemv_fused.py tests/modules/test_fused_norm.py tests/triton/test_varlen.py ;;
  k) step fused_layer_ab 90 python3 ../final_project/results/session28/fused_layer_ab.py "$OUT/fused_layer_ab.json" ;;
  f) fuse_ab 0 1 ;;
  F) fuse_ab 1 0 ;;
  g)
    for run in gpu1 gpu2 gpu3; do
      step startup_gh_$run 100 python3 scripts/bench_startup.py --models granite_hybrid:4.0-h-1b --runs cold \
        --timeout 90 --output "$OUT/startup_gh_$run.json"
    done ;;
  P)
    for run in wA1 gpu1; do
      TREE=.${run%?} step prefill_ab_$run 75 python3 ../final_project/results/session27/prefill_ab.py \
        "$OUT/prefill_ab_$run.json" 8
    done ;;
  c)
    for model in llama:3.2-1b llama:3.1-8b; do
      step startup_ckpt_${model#llama:} 200 python3 scripts/bench_startup.py --models $model --checkpoint \
        --checkpoint-dir /tmp/ckpt --runs cold,warm --timeout 120 --output "$OUT/startup_ckpt_${model#llama:}.json"
    done ;;
  *) echo "unknown part $PART_"; exit 2 ;;
esac
done
nproc > "$OUT/nproc.txt"; lscpu | head -20 >> "$OUT/nproc.txt"; pack
