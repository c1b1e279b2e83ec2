#!/usr/bin/env bash
# Session 16 device runs, prepared in session 15: main as it stands (layers the default scope, the paged K/V write an
# opaque op in that scope, duck sizing off), and two ways to win back the opaque write's cost, each a patch on main:
#   .wA: session15/traced_untuned.patch  the write traced again, the first half compiled with no pointwise autotuning
#   .wB: session15/kv_write_triton.patch the opaque op writes K and V in one Triton launch
# Usage: run.sh OUT PART (carry .gpu .wA .wB); run.sh build (here, before the call: makes the three trees);
# part d: run.sh build_d (after 4a033b1, which took patch B: build no longer applies it), carry .gpu .wO
#   part a: CUDA tests; cold start-up of the 8B (default scope) and of Granite-4.0-H-1B on main, .wA and .wB
#   part b: 1B serving + batch-1 on main, .wA and .wB (layers), then main with --compile_scope model, in one call
#   part c: 8B start-up cold and warm, 8B serving, both on the default scope
#   part d: main with the one-launch write against cb64db8; server vs offline; Granite-4.0-H start-up
#   part e: part d's server steps with .whl; 1B serving on main, layers then model
#   part p: cProfile of a cold Granite-4.0-H-1B and 8B start-up (main)
# Each part fits one call (limit 600 s); calls made back to back find the machine warm.
set -u
if [ "${1:-}" = build ]; then
  rm -rf .gpu .wA .wB && mkdir .gpu && git archive HEAD | tar -x -C .gpu && git rev-parse --short HEAD > .gpu/COMMIT
  # patch, not git apply: inside this repository's folder git apply skips every path without a word (session 15's
  # "v4" tree was c034297 unpatched for that reason); diff checks that the tree changed
  for t in A:traced_untuned B:kv_write_triton; do
    cp -r .gpu ".w${t%%:*}" && (cd ".w${t%%:*}" && patch -s -p1 -i "../final_project/results/session15/${t#*:}.patch" \
      && echo "$(cat COMMIT)+${t#*:}" > COMMIT) && ! diff -rq -x COMMIT .gpu ".w${t%%:*}" > /dev/null || exit 1
  done
  cat .gpu/COMMIT .wA/COMMIT .wB/COMMIT; exit 0
fi
if [ "${1:-}" = build_d ]; then  # part d's trees: .gpu = HEAD, .wO = cb64db8 (the write as two index_copy_)
  rm -rf .gpu .wO && mkdir .gpu .wO && git archive HEAD | tar -x -C .gpu && git rev-parse --short HEAD > .gpu/COMMIT \
    && git archive cb64db8 | tar -x -C .wO && echo cb64db8 > .wO/COMMIT && cat .gpu/COMMIT .wO/COMMIT; exit $?
fi
OUT=${1:?out dir}; PART=${2:?part}
source final_project/results/device_steps.sh
WORKLOAD="--num_requests 128 --prompt_range 64,512 --output_range 256,256 --batch1_tokens 512 --decode_steps_sweep 16,16,16"
case $PART in
  a)  # ~260 s: CUDA tests and cold start-ups (peak host memory shows whether inductor backs a pool up)
    step cuda_tests 120 python3 -m pytest -q -rs tests/serving/test_engine_gpu.py
    step startup_8b 90 python3 scripts/bench_startup.py --models llama:3.1-8b --runs cold --timeout 80 \
      --output "$OUT/startup_8b.json"
    for tree in gpu wA wB; do
      TREE=.$tree step startup_gh_$tree 100 python3 scripts/bench_startup.py --models granite_hybrid:4.0-h-1b \
        --runs cold --compile-scope layers --timeout 90 --output "$OUT/startup_gh_$tree.json"
    done
    ;;
  b)  # ~340 s: 1B serving + batch-1, main's default (layers), .wA and .wB with layers, main with model, one call
    for tree in gpu wA wB; do
      TREE=.$tree step serving_1b_$tree 100 python3 scripts/benchmark_serving.py --variant 3.2-1b $WORKLOAD \
        --compile_scope layers --results_dir "$OUT/serving_1b_$tree"
    done
    step serving_1b_model 170 python3 scripts/benchmark_serving.py --variant 3.2-1b $WORKLOAD --compile_scope model \
      --results_dir "$OUT/serving_1b_model"
    ;;
  c)  # ~180 s: 8B start-up cold and warm on the default scope (main), 8B serving on the default scope
    step startup_8b_2 170 python3 scripts/bench_startup.py --models llama:3.1-8b --timeout 80 --output "$OUT/startup_8b_2.json"
    step serving_8b 200 python3 scripts/benchmark_serving.py --variant 3.1-8b --num_requests 128 --prompt_range 64,512 \
      --output_range 256,256 --results_dir "$OUT/serving_8b"
    ;;
  p)  # ~150 s (added in session 16): where the cold start-up goes, cProfile + dynamo's compile times (main)
    step profile_gh 100 python3 ../final_project/results/session16/profile_startup.py granite_hybrid:4.0-h-1b "$OUT/prof_gh"
    step profile_8b 80 python3 ../final_project/results/session16/profile_startup.py llama:3.1-8b "$OUT/prof_8b"
    ;;
  d)  # ~450 s (added in session 16, after main took the one-launch write, 4a033b1): CUDA tests; 1B serving on main
      # and on cb64db8 (two index_copy_) interleaved, main first; issue 18's server vs offline without and with
      # compile; one more Granite-4.0-H-1B cold start-up. Build: run.sh build, then .wO = git archive cb64db8
    step cuda_tests 120 python3 -m pytest -q -rs tests/serving/test_engine_gpu.py tests/triton/test_kv_write.py
    for tree in gpu wO gpu; do
      TREE=.$tree step serving_1b_$tree$((n = ${n:-0} + 1)) 100 python3 scripts/benchmark_serving.py --variant 3.2-1b \
        $WORKLOAD --results_dir "$OUT/serving_1b_$tree$n"
    done
    step server_vs_offline 100 python3 scripts/bench_server_vs_offline.py --repeats 3 --engine-args=--no-compile \
      --output "$OUT/server_vs_offline.json"
    step server_vs_offline_compiled 150 python3 scripts/bench_server_vs_offline.py --repeats 3 --server-timeout 120 \
      --output "$OUT/server_vs_offline_compiled.json"
    step startup_gh 100 python3 scripts/bench_startup.py --models granite_hybrid:4.0-h-1b --runs cold --timeout 90 \
      --output "$OUT/startup_gh.json"
    ;;
  e)  # ~450 s: part d's server steps again with the server's packages (.whl, see session9/run.sh), then 1B serving on
      # main with each scope, layers first (tree .gpu of build_d; carry .gpu .whl)
    step server_vs_offline 100 python3 scripts/bench_server_vs_offline.py --repeats 3 --engine-args=--no-compile \
      --output "$OUT/server_vs_offline.json"
    step server_vs_offline_compiled 150 python3 scripts/bench_server_vs_offline.py --repeats 3 --server-timeout 120 \
      --output "$OUT/server_vs_offline_compiled.json"
    step serving_1b_layers 100 python3 scripts/benchmark_serving.py --variant 3.2-1b $WORKLOAD \
      --results_dir "$OUT/serving_1b_layers"
    step serving_1b_model 170 python3 scripts/benchmark_serving.py --variant 3.2-1b $WORKLOAD --compile_scope model \
      --results_dir "$OUT/serving_1b_model"
    ;;
  *) echo "unknown part $PART"; exit 2 ;;
esac
