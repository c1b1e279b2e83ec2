#!/usr/bin/env bash
# Session 35's short device call, for a short budget (FINAL = $OUT; each step packed as it ends, so a call cut short
# returns what finished): the GPU engine tests of the unbacked batch in .gpn; Granite-4.0-H-1B's cold start in .gpn
# with --unbacked-batch (dynamo graphs / recompiles); then the 1B serving + batch-1 in .gpn (--unbacked_batch) and
# .gpu (b32a87c). Trees as call.sh.
FINAL=${1:?final out dir}; PART=m; OUT=/tmp/raw_m; mkdir -p "$OUT"
source final_project/results/device_steps.sh
TREE=.gpn step gpu_tests_u 90 python3 -m pytest -q -p no:cacheprovider tests/serving/test_engine_gpu.py \
  -k "batch_of_one or layer_compile or hybrid"
TREE=.gpn step startup_gh_gpn1 80 python3 scripts/bench_startup.py --models granite_hybrid:4.0-h-1b --runs cold \
  --timeout 70 --unbacked-batch --output "$OUT/startup_gh_gpn1.json"
TREE=.gpn step serving_1b_gpn1 60 python3 scripts/benchmark_serving.py --variant 3.2-1b $WORKLOAD --unbacked_batch \
  --results_dir "$OUT/serving_1b_gpn1"
TREE=.gpu step serving_1b_gpu1 60 python3 scripts/benchmark_serving.py --variant 3.2-1b $WORKLOAD \
  --results_dir "$OUT/serving_1b_gpu1"
pack; ls "$FINAL"
