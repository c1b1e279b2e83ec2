#!/usr/bin/env bash
# Session 13 device runs on a clean tree (.gpu = git archive of the commit in .gpu/COMMIT), each step under its
# own time limit, results packed into OUT/PART.tgz after each step.
# Usage: run.sh OUT PART (carry .gpu)
#   part a: CUDA tests of compile_scope "layers"; issue 19's start-up of Llama-3.1-8B and -3.2-1B with
#           --compile-scope layers, cold and warm (the whole-model scope took 221 / 104 s for the 8B in session 12)
#   part b: 1B serving + batch-1 with the two compile scopes in one call (layers first), then the fp32 eval row
#   part c: 8B serving compiled with compile_scope "layers", HF generate_batch beside it
set -u
OUT=${1:?out dir}; PART=${2:?part}
source final_project/results/device_steps.sh
WORKLOAD="--num_requests 128 --prompt_range 64,512 --output_range 256,256"
case $PART in
  a)
    step cuda_tests 100 python3 -m pytest -q -rs tests/serving/test_engine_gpu.py
    step startup_8b_layers 330 python3 scripts/bench_startup.py --models llama:3.1-8b --compile-scope layers \
      --timeout 160 --output "$OUT/startup_8b_layers.json"
    step startup_1b_layers 140 python3 scripts/bench_startup.py --models llama:3.2-1b --compile-scope layers \
      --timeout 68 --output "$OUT/startup_1b_layers.json"
    ;;
  b)
    for scope in layers model; do
      step serving_1b_$scope 250 python3 scripts/benchmark_serving.py --variant 3.2-1b $WORKLOAD --batch1_tokens 512 \
        --decode_steps_sweep 16,16,16 --compile_scope $scope --results_dir "$OUT/serving_1b_$scope"
    done
    step targets_eval 90 python3 -m fms.entrypoints.cli bench targets --rows eval-fp32 --timeout 80 --commit "$COMMIT" \
      --output "$OUT/targets_eval.json"
    ;;
  c)
    step serving_8b_layers 540 python3 scripts/benchmark_serving.py --variant 3.1-8b $WORKLOAD --compile_scope layers \
      --peers hf --results_dir "$OUT/serving_8b_layers"
    ;;
  *) echo "unknown part $PART"; exit 2 ;;
esac
