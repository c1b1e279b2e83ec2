#!/usr/bin/env bash
# Session 15 device runs on clean trees (.gpu = git archive of the commit in .gpu/COMMIT; .v4 was meant to be c034297
# with session14/layers_v4.patch applied, but `git apply` run inside this repository's folder skipped every path
# without a word: the "v4" steps of part c ran c034297 unpatched), each step under its own time limit, results packed
# into OUT/PART.tgz.
# Usage: run.sh OUT PART (carry .gpu, and .v4 for part c)
#   part a: CUDA tests (the layers scope with the K/V write inside the first compiled half, and for Granite-4.0-H);
#           Granite-4.0-H-1B and Llama-3.1-8B start-up with --compile-scope layers, cold and warm; 1B serving +
#           batch-1 with layers
#   part b: the restructuring check, round 9, new tree first: final_project/results/restructure/run.sh OUT 9 "after before"
#   part c: 1B serving + batch-1 with layers and with model in one call; the v4 patch (whole layer in one graph):
#           1B serving + batch-1 with layers; start-up again (Granite-4.0-H-1B, 8B with v4, 8B with main), layers
#   part d: (the paged K/V write an opaque op under compile) CUDA tests of the compiled scopes; Granite-4.0-H-1B cold
#           start-up with layers; 1B serving + batch-1 with layers, then with model (cold compile: its start-up too)
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
    step serving_1b_layers_2 130 python3 scripts/benchmark_serving.py --variant 3.2-1b $WORKLOAD --batch1_tokens 512 \
      --decode_steps_sweep 16,16,16 --compile_scope layers --results_dir "$OUT/serving_1b_layers_2"
    step serving_1b_model 200 python3 scripts/benchmark_serving.py --variant 3.2-1b $WORKLOAD --batch1_tokens 512 \
      --decode_steps_sweep 16,16,16 --compile_scope model --results_dir "$OUT/serving_1b_model"
    TREE=.v4 step serving_1b_layers_v4 130 python3 scripts/benchmark_serving.py --variant 3.2-1b $WORKLOAD \
      --batch1_tokens 512 --decode_steps_sweep 16,16,16 --compile_scope layers --results_dir "$OUT/serving_1b_layers_v4"
    step startup_gh_layers_2 250 python3 scripts/bench_startup.py --models granite_hybrid:4.0-h-1b --compile-scope layers \
      --timeout 115 --output "$OUT/startup_gh_layers_2.json"
    TREE=.v4 step startup_8b_layers_v4 170 python3 scripts/bench_startup.py --models llama:3.1-8b --compile-scope layers \
      --timeout 80 --output "$OUT/startup_8b_layers_v4.json"
    step startup_8b_layers_2 170 python3 scripts/bench_startup.py --models llama:3.1-8b --compile-scope layers \
      --timeout 80 --output "$OUT/startup_8b_layers_2.json"
    ;;
  d)
    step cuda_tests_d 110 python3 -m pytest -q -rs tests/serving/test_engine_gpu.py -k "layer or cuda_graph_decode"
    step startup_gh_layers_d 120 python3 scripts/bench_startup.py --models granite_hybrid:4.0-h-1b --compile-scope layers \
      --runs cold --timeout 110 --output "$OUT/startup_gh_layers_d.json"
    step serving_1b_layers_d 100 python3 scripts/benchmark_serving.py --variant 3.2-1b $WORKLOAD --batch1_tokens 512 \
      --decode_steps_sweep 16,16,16 --compile_scope layers --results_dir "$OUT/serving_1b_layers_d"
    step serving_1b_model_d 170 python3 scripts/benchmark_serving.py --variant 3.2-1b $WORKLOAD --batch1_tokens 512 \
      --decode_steps_sweep 16,16,16 --compile_scope model --results_dir "$OUT/serving_1b_model_d"
    ;;
  *) echo "unknown part $PART"; exit 2 ;;
esac
