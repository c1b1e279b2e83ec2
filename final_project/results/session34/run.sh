#!/usr/bin/env bash
# Session 34 device run. Usage: run.sh FINAL PARTS (carry .gpu and .gpn: `bash final_project/results/build_trees.sh
# .gpu:b32a87c .gpn:REV`). Raw files in /tmp/raw_PART, packed into FINAL/PART.tgz after each step.
#   part t (~90 s): in .gpn, whether this torch has backed_size_oblivious; the GPU engine tests (the new batch-of-one
#     trace test among them) and the CPU-run compile-count tests
#   part b (~200 s): issue 19's 1B serving + batch-1, .gpu (b32a87c: batch 1 in the batch-2 graph) and .gpn (batch 1
#     in its own graph from the same trace) interleaved, twice each; then .gpn with FMS_FUSE_NORM=1 twice
#   part u (~70 s): in .gpn, the GPU engine tests of compiled decode (batch of one, layer scope, hybrids)
#   part c (~130 s): part b without the FMS_FUSE_NORM runs, .gpn with --unbacked_batch
#   part G (~110 s): part g's first pair, .gpn with --unbacked-batch
#   part g (~300 s): Granite-4.0-H-1B cold start-up (bench_startup.py, a fresh process each), .gpu and .gpn
#     interleaved, twice each: the batch-1 graph's cost, or its absence, at start-up (dynamo recompiles listed)
set -u
FINAL=${1:?final out dir}; PART=${2:?part}
OUT=/tmp/raw_$PART; mkdir -p "$OUT"
source final_project/results/device_steps.sh
part_t() {
  TREE=.gpn step flag 30 python3 -c "import torch, torch.fx.experimental._config as c; print(torch.__version__, 'backed_size_oblivious' in dir(c) or hasattr(c, 'backed_size_oblivious'))"
  TREE=.gpn step gpu_tests 200 python3 -m pytest -q -p no:cacheprovider tests/serving/test_engine_gpu.py tests/runtime/test_compile_counts.py
}
part_b() {
  serving_1b gpu1 gpn1 gpu2 gpn2
  FMS_FUSE_NORM=1 serving_1b gpn3 gpn4
}
part_u() {
  TREE=.gpn step gpu_tests_u 120 python3 -m pytest -q -p no:cacheprovider tests/serving/test_engine_gpu.py \
    -k "batch_of_one or layer_compile or hybrid"
}
part_c() {  # PAIRS=1: gpu1 and gpn1 only; .gpn with --unbacked_batch (EngineConfig.unbacked_batch, off by default)
  local runs="gpu1 gpn1 gpu2 gpn2"; [ "${PAIRS:-2}" = 1 ] && runs="gpu1 gpn1"
  for run in $runs; do
    local flag=""; [ "${run%?}" = gpn ] && flag="--unbacked_batch"
    TREE=.${run%?} step serving_1b_$run 110 python3 scripts/benchmark_serving.py --variant 3.2-1b $WORKLOAD $flag \
      --results_dir "$OUT/serving_1b_$run"
  done
}
part_G() {  # .gpn with --unbacked-batch (EngineConfig.unbacked_batch; before eec493f the tree's default)
  for run in gpu1 gpn1; do
    local flag=""; [ "${run%?}" = gpn ] && flag="--unbacked-batch"
    TREE=.${run%?} step startup_gh_$run 100 python3 scripts/bench_startup.py --models granite_hybrid:4.0-h-1b \
      --runs cold --timeout 90 $flag --output "$OUT/startup_gh_$run.json"
  done
}
part_g() {
  for run in gpu1 gpn1 gpu2 gpn2; do
    TREE=.${run%?} step startup_gh_$run 100 python3 scripts/bench_startup.py --models granite_hybrid:4.0-h-1b \
      --runs cold --timeout 90 --output "$OUT/startup_gh_$run.json"
  done
}
run_parts "$PART"
