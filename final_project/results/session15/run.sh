#!/usr/bin/env bash
# Session 15 device runs on clean trees (.gpu = git archive of the commit in .gpu/COMMIT; .v4 = c034297 with
# session14/layers_v4.patch applied), each step under its own time limit, results packed into OUT/PART.tgz.
# Usage: run.sh OUT PART (carry .gpu, and .v4 for part c)
#   part a: CUDA tests (the layers scope with the K/V write inside the first compiled half, and for Granite-4.0-H);
#           Granite-4.0-H-1B and Llama-3.1-8B start-up with --compile-scope layers, cold and warm; 1B serving +
#           batch-1 with layers
#   part b: the restructuring check, round 9, new tree first: final_project/results/restructure/run.sh OUT 9 "after before"
#   part c: start-up again (Granite-4.0-H-1B and 8B, layers); the v4 patch (whole layer in one graph): 1B serving +
#           batch-1 and 8B start-up with layers
set -u
OUT=${1:?out dir}; PART=${2:?part}
source final_project/results/device_steps.sh
WORKLOAD="--num_requests 128 --prompt_range 64,512 --output_range 256,256"
case $PART in
  a)
    step cuda_tests 150 python3 -m pytest -q -rs tests/serving/test_engine_gpu.py
    step startup_gh_layers 250 python3 scripts/bench_startup.py --models granite_hybrid:4.0-h-1b --compile-scope layers \
      --timeout 115 --output "$OUT/startup_gh_layers.json"
    step startup_8b_layers 170 python3 scripts/bench_startup.py --models llama:3.1-8b --compile-scope layers \
      --timeout 80 --output "$OUT/startup_8b_layers.json"
    step serving_1b_layers 130 python3 scripts/benchmark_serving.py --variant 3.2-1b $WORKLOAD --batch1_tokens 512 \
      --decode_steps_sweep 16,16,16 --compile_scope layers --results_dir "$OUT/serving_1b_layers"
    ;;
  b)
    bash final_project/results/restructure/run.sh "$OUT" 9 "after before"
    pack
    ;;
  c)
    step startup_gh_layers_2 250 python3 scripts/bench_startup.py --models granite_hybrid:4.0-h-1b --compile-scope layers \
      --timeout 115 --output "$OUT/startup_gh_layers_2.json"
    step startup_8b_layers_2 170 python3 scripts/bench_startup.py --models llama:3.1-8b --compile-scope layers \
      --timeout 80 --output "$OUT/startup_8b_layers_2.json"
    TREE=.v4 step serving_1b_layers_v4 130 python3 scripts/benchmark_serving.py --variant 3.2-1b $WORKLOAD \
      --batch1_tokens 512 --decode_steps_sweep 16,16,16 --compile_scope layers --results_dir "$OUT/serving_1b_layers_v4"
    TREE=.v4 step startup_8b_layers_v4 170 python3 scripts/bench_startup.py --models llama:3.1-8b --compile-scope layers \
      --timeout 80 --output "$OUT/startup_8b_layers_v4.json"
    ;;
  *) echo "unknown part $PART"; exit 2 ;;
esac
