#!/usr/bin/env bash
# Session 14 device runs (session 13's runs again: their raw files were lost with that machine) on a clean tree (.gpu = git archive of the commit in .gpu/COMMIT), each step under its
# own time limit, results packed into OUT/PART.tgz after each step.
# Usage: run.sh OUT PART (carry .gpu)
#   part a: CUDA tests of compile_scope "layers"; issue 19's start-up of Llama-3.1-8B and -3.2-1B with
#           --compile-scope layers, cold and warm (the whole-model scope took 221 / 104 s for the 8B in session 12)
#   part b: 1B serving + batch-1 with the two compile scopes in one call (layers first), then the fp32 eval row
#   part c: 8B serving compiled with compile_scope "layers", HF generate_batch beside it
#   part d: (tree f0b6929) the CUDA test of --cuda-graph-sizes; 8B start-up (layers) without the size-1 graph, and
#           with the default sizes again; 8B serving (layers) again, no peer
#   part e: 1B batch-1 (layers) with the default graph sizes and without size 1 (a lone request in the size-2
#           graph), alternated twice, on a short 16-request workload
#   part f: (the tree in .gpu/COMMIT) compile_scope "layers" as two compiled halves around the attention op (no graph
#           break): CUDA tests, 8B start-up, 1B serving + batch-1 with layers, 8B serving with layers, 1B with model
set -u
OUT=${1:?out dir}; PART=${2:?part}
source final_project/results/device_steps.sh
WORKLOAD="--num_requests 128 --prompt_range 64,512 --output_range 256,256"
case $PART in
  a)
    step cuda_tests 100 python3 -m pytest -q -rs tests/serving/test_engine_gpu.py
    step startup_8b_layers 330 python3 scripts/bench_startup.py --models llama:3.1-8b --compile-scope layers \
      --timeout 160 --output "$OUT/startup_8b_layers.json"
    step startup_1b_layers 240 python3 scripts/bench_startup.py --models llama:3.2-1b --compile-scope layers \
      --timeout 110 --output "$OUT/startup_1b_layers.json"
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
  d)
    step cuda_tests_d 100 python3 -m pytest -q -rs tests/serving/test_engine_gpu.py -k "lone or layer_compile"
    step startup_8b_layers_no1 200 python3 scripts/bench_startup.py --models llama:3.1-8b --compile-scope layers \
      --cuda-graph-sizes 2,4,8,16,32,64,128 --timeout 95 --output "$OUT/startup_8b_layers_no1.json"
    step startup_8b_layers_2 200 python3 scripts/bench_startup.py --models llama:3.1-8b --compile-scope layers \
      --timeout 95 --output "$OUT/startup_8b_layers_2.json"
    step serving_8b_layers_2 200 python3 scripts/benchmark_serving.py --variant 3.1-8b $WORKLOAD --compile_scope layers \
      --results_dir "$OUT/serving_8b_layers_2"
    ;;
  e)
    for i in 1 2; do
      for sizes in default no1; do
        extra=""; [ $sizes = no1 ] && extra="--cuda_graph_sizes 2,4,8,16,32,64,128,256"
        step batch1_${sizes}_$i 130 python3 scripts/benchmark_serving.py --variant 3.2-1b --num_requests 16 \
          --prompt_range 64,512 --output_range 256,256 --batch1_tokens 512 --compile_scope layers $extra \
          --results_dir "$OUT/batch1_${sizes}_$i"
      done
    done
    ;;
  f)
    step cuda_tests_f 100 python3 -m pytest -q -rs tests/serving/test_engine_gpu.py
    step startup_8b_layers_f 200 python3 scripts/bench_startup.py --models llama:3.1-8b --compile-scope layers \
      --timeout 95 --output "$OUT/startup_8b_layers_f.json"
    step serving_1b_layers_f 150 python3 scripts/benchmark_serving.py --variant 3.2-1b $WORKLOAD --batch1_tokens 512 \
      --decode_steps_sweep 16,16,16 --compile_scope layers --results_dir "$OUT/serving_1b_layers_f"
    step serving_8b_layers_f 150 python3 scripts/benchmark_serving.py --variant 3.1-8b $WORKLOAD --compile_scope layers \
      --results_dir "$OUT/serving_8b_layers_f"
    step serving_1b_model_f 170 python3 scripts/benchmark_serving.py --variant 3.2-1b $WORKLOAD --batch1_tokens 512 \
      --decode_steps_sweep 16,16,16 --compile_scope model --results_dir "$OUT/serving_1b_model_f"
    ;;
  *) echo "unknown part $PART"; exit 2 ;;
esac
