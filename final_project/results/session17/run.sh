#!/usr/bin/env bash
# Session 17 device runs: main with batch 1 in the batch-2 graph (the GEMV kernel takes two rows, the compiled op
# picks kernel or cuBLAS at run time, no batch-1 graph when the decode step is compiled) against b6ed921 (before).
# Usage: run.sh build (here, before the calls: .gpu = HEAD, .wO = b6ed921); run.sh OUT PART (carry .gpu .wO .whl)
#   part a: CUDA tests; GEMV timing at 1 and 2 rows; cold start-ups of Granite-4.0-H-1B (twice) and the 8B on main
#   part b: 1B serving + batch-1, main / b6ed921 / main, one process each, in one call
#   part c: issue 18's server vs offline on main, without and with compile
#   part d (after b showed the 3-D two-row kernel slow: batch-1 612-622 against 899 tok/s): the kernel with two 2-D
#     accumulators; GEMV timing; 1B serving on main, main with FMS_GEMV=0 (cuBLAS at every row count), b6ed921;
#     cold start-ups of the 8B and Granite-4.0-H-1B (decode capture now under no_grad, as the prefill warm-up);
#     then part c
#   part f: two-row GEMV timing and 1B serving + batch-1 on main only
#   part e: part d cut down (two-row GEMV timing, 1B serving main / b6ed921, Granite-4.0-H start-up)
# Each part fits one call (limit 600 s); calls made back to back find the machine warm.
set -u
if [ "${1:-}" = build ]; then
  rm -rf .gpu .wO && mkdir .gpu .wO && git archive HEAD | tar -x -C .gpu && git rev-parse --short HEAD > .gpu/COMMIT \
    && git archive b6ed921 | tar -x -C .wO && echo b6ed921 > .wO/COMMIT && cat .gpu/COMMIT .wO/COMMIT; exit $?
fi
OUT=${1:?out dir}; PART=${2:?part}
source final_project/results/device_steps.sh
WORKLOAD="--num_requests 128 --prompt_range 64,512 --output_range 256,256 --batch1_tokens 512 --decode_steps_sweep 16,16,16"
case $PART in
  a)  # ~300 s
    step cuda_tests 170 python3 -m pytest -q -rs tests/triton/test_gemv.py tests/serving/test_engine_gpu.py \
      tests/triton/test_kv_write.py
    step gemv_rows1 60 python3 scripts/bench_gemv.py --configs tuned --results_dir "$OUT"
    step gemv_rows2 60 python3 scripts/bench_gemv.py --configs tuned --rows 2 --results_dir "$OUT"
    for n in 1 2; do
      step startup_gh_$n 100 python3 scripts/bench_startup.py --models granite_hybrid:4.0-h-1b --runs cold --timeout 90 \
        --output "$OUT/startup_gh_$n.json"
    done
    step startup_8b 90 python3 scripts/bench_startup.py --models llama:3.1-8b --runs cold --timeout 80 \
      --output "$OUT/startup_8b.json"
    ;;
  b)  # ~330 s: main first, then b6ed921, then main again
    for tree in gpu wO gpu; do
      TREE=.$tree step serving_1b_$tree$((n = ${n:-0} + 1)) 110 python3 scripts/benchmark_serving.py --variant 3.2-1b \
        $WORKLOAD --results_dir "$OUT/serving_1b_$tree$n"
    done
    ;;
  c)  # ~300 s (needs .whl: fastapi, uvicorn)
    step server_vs_offline 120 python3 scripts/bench_server_vs_offline.py --repeats 3 --engine-args=--no-compile \
      --output "$OUT/server_vs_offline.json"
    step server_vs_offline_compiled 170 python3 scripts/bench_server_vs_offline.py --repeats 3 --server-timeout 120 \
      --output "$OUT/server_vs_offline_compiled.json"
    ;;
  d)  # ~450 s
    step gemv_rows1 60 python3 scripts/bench_gemv.py --configs tuned --results_dir "$OUT"
    step gemv_rows2 60 python3 scripts/bench_gemv.py --configs tuned --rows 2 --results_dir "$OUT"
    step serving_1b_gpu 110 python3 scripts/benchmark_serving.py --variant 3.2-1b $WORKLOAD --results_dir "$OUT/serving_1b_gpu"
    FMS_GEMV=0 step serving_1b_cublas 110 python3 scripts/benchmark_serving.py --variant 3.2-1b $WORKLOAD \
      --results_dir "$OUT/serving_1b_cublas"
    TREE=.wO step serving_1b_wO 110 python3 scripts/benchmark_serving.py --variant 3.2-1b $WORKLOAD \
      --results_dir "$OUT/serving_1b_wO"
    step startup_8b 90 python3 scripts/bench_startup.py --models llama:3.1-8b --runs cold --timeout 80 \
      --output "$OUT/startup_8b.json"
    step startup_gh 100 python3 scripts/bench_startup.py --models granite_hybrid:4.0-h-1b --runs cold --timeout 90 \
      --output "$OUT/startup_gh.json"
    bash "$0" "$OUT" c
    ;;
  e)  # ~200 s: part d cut to what decides the default, for a late call
    step gemv_rows2 60 python3 scripts/bench_gemv.py --configs tuned --rows 2 --results_dir "$OUT"
    step serving_1b_gpu 110 python3 scripts/benchmark_serving.py --variant 3.2-1b $WORKLOAD --results_dir "$OUT/serving_1b_gpu"
    TREE=.wO step serving_1b_wO 110 python3 scripts/benchmark_serving.py --variant 3.2-1b $WORKLOAD \
      --results_dir "$OUT/serving_1b_wO"
    step startup_gh 100 python3 scripts/bench_startup.py --models granite_hybrid:4.0-h-1b --runs cold --timeout 90 \
      --output "$OUT/startup_gh.json"
    ;;
  f)  # ~90 s: the two-row kernel's timing and main's batch-1, nothing else
    step gemv_rows2 60 python3 scripts/bench_gemv.py --configs tuned --rows 2 --results_dir "$OUT"
    step serving_1b_gpu 110 python3 scripts/benchmark_serving.py --variant 3.2-1b $WORKLOAD --results_dir "$OUT/serving_1b_gpu"
    ;;
  *) echo "unknown part $PART"; exit 2 ;;
esac
