#!/usr/bin/env bash
# Session 18 device runs (written in session 18, which was lent no device: none of them has run yet).
# What they decide: batch-1 decode on the H200 with the compiled engine's default graphs (batch 1 padded to the
# batch-2 graph) through the two-row GEMV kernel with two 2-D accumulators (d3ed3cb, never timed), against the
# same step through cuBLAS (FMS_GEMV=1: the kernel for one row only) and against a batch-1 graph of its own
# (--cuda_graph_sizes with 1: the one-row kernel, one more trace at start-up); b6ed921 as the reference (899
# tok/s in session 17); then the start-ups the default must keep (Granite-4.0-H-1B <= 30 s), the 8B's
# recompiles (a1c31d7 should leave none), fp32 eval with and without the shared context, and issue 18's server.
# Later in the session (CPU only): the server's POST routes became plain ASGI (edee959), decode windows ramp up
# after each prefill while the batch has room (72b5d43, 83de6e3), and the server's processes freeze their start-up
# heap (3e48551). Parts c and d compare main with .wA = main without the first two (FastAPI routes, no ramp, heap
# frozen as in main), alternated.
# Usage: run.sh build (here, before the calls: .gpu = HEAD, .wO = b6ed921, .wA = HEAD with edee959, 72b5d43 and
#        83de6e3 reversed); run.sh OUT PART (carry .gpu .wO .wA .whl)
#   part a (~420 s): CUDA tests; GEMV timing at 1 and 2 rows; 1B serving + batch-1: main, main FMS_GEMV=1,
#     main with a batch-1 graph, b6ed921
#   part t (~500 s): the GEMV sweep at 1 and 2 rows written into this GPU's table (.gpu/fms/resources/gemv, copied
#     to OUT: commit it if it wins), then 1B serving + batch-1 with the table, and with the table and FMS_GEMV=1
#   part b (~330 s): cold start-ups of Granite-4.0-H-1B (twice) and the 8B; fp32 eval, context shared and not
#   (.wA also reverses 226fe1a, a later change to the ASGI routes)
#   part c (~500 s, needs .whl): server vs offline without compile: main, .wA, main, .wA
#   part d (~360 s, needs .whl): server vs offline compiled: main, .wA
#   part g (~230 s): main with the committed H200 GEMV table (see the case below)
#   part f (~150 s): the smallest useful call: two-row GEMV timing, 1B batch-1 main and main FMS_GEMV=1
# Tables of the unpacked parts: python final_project/results/session18/summarize.py final_project/results/session18/*/
# Order for a session's 30 device minutes (parts a, c, b, t, d add up to ~35 min with start-ups): a, then c, then b,
# then t; d last if time is left. Calls made back to back find the machine warm.
set -u
if [ "${1:-}" = build ]; then
  rm -rf .gpu .wO && mkdir .gpu .wO && git archive HEAD | tar -x -C .gpu && git rev-parse --short HEAD > .gpu/COMMIT \
    && git archive b6ed921 | tar -x -C .wO && echo b6ed921 > .wO/COMMIT \
    && rm -rf .wA && mkdir .wA && git archive HEAD | tar -x -C .wA \
    && git show 226fe1a -- fms tests | patch -R -p1 -s -d .wA \
    && git show edee959 -- fms tests | patch -R -p1 -s -d .wA && git show 83de6e3 -- fms tests | patch -R -p1 -s -d .wA \
    && git show 72b5d43 -- fms tests | patch -R -p1 -s -d .wA \
    && echo "$(git rev-parse --short HEAD)-edee959-226fe1a-72b5d43-83de6e3" > .wA/COMMIT && cat .gpu/COMMIT .wO/COMMIT .wA/COMMIT
  exit $?
fi
OUT=${1:?out dir}; PART=${2:?part}
source final_project/results/device_steps.sh
WORKLOAD="--num_requests 128 --prompt_range 64,512 --output_range 256,256 --batch1_tokens 512 --decode_steps_sweep 16,16,16"
WITH_B1="--cuda_graph_sizes 1,2,4,8,16,32,64,128,256"
serving() {  # serving NAME [TREE=..] [extra flags]
  local name=$1; shift
  step serving_1b_$name 110 python3 scripts/benchmark_serving.py --variant 3.2-1b $WORKLOAD "$@" \
    --results_dir "$OUT/serving_1b_$name"
}
case $PART in
  a)
    step cuda_tests 150 python3 -m pytest -q -rs tests/triton/test_gemv.py tests/serving/test_engine_gpu.py \
      tests/modules/test_kernel_config.py
    step gemv_rows1 50 python3 scripts/bench_gemv.py --configs tuned --results_dir "$OUT"
    step gemv_rows2 50 python3 scripts/bench_gemv.py --configs tuned --rows 2 --results_dir "$OUT"
    serving gpu
    FMS_GEMV=1 serving gpu_cublas2
    serving gpu_b1graph $WITH_B1
    TREE=.wO serving wO
    ;;
  t)
    TABLE=fms/resources/gemv/NVIDIA_H200.json
    step gemv_sweep_rows1 170 python3 scripts/bench_gemv.py --rows 1 --write_table $TABLE --results_dir "$OUT/sweep1"
    step gemv_sweep_rows2 170 python3 scripts/bench_gemv.py --rows 2 --write_table $TABLE --results_dir "$OUT/sweep2"
    cp .gpu/$TABLE "$OUT/" 2>/dev/null
    serving gpu_table
    FMS_GEMV=1 serving gpu_table_cublas2
    ;;
  b)
    for n in 1 2; do
      step startup_gh_$n 100 python3 scripts/bench_startup.py --models granite_hybrid:4.0-h-1b --runs cold --timeout 90 \
        --output "$OUT/startup_gh_$n.json"
    done
    step startup_8b 90 python3 scripts/bench_startup.py --models llama:3.1-8b --runs cold --timeout 80 \
      --output "$OUT/startup_8b.json"
    for share in shared alone; do
      flag=""; [ $share = alone ] && flag="--no_share_context"
      step eval_fp32_$share 60 python3 scripts/eval.py --task truthfulqa_mc2 --data fms/resources/eval/truthfulqa_mc.json \
        --mode both --dtype fp32 --device_type cuda --no_progress --timing_repeats 5 $flag --output "$OUT/eval_fp32_$share.json"
    done
    ;;
  c)
    for run in gpu1 wA1 gpu2 wA2; do
      TREE=.${run%?} step server_vs_offline_$run 120 python3 scripts/bench_server_vs_offline.py --repeats 3 \
        --engine-args=--no-compile --output "$OUT/server_vs_offline_$run.json"
    done
    ;;
  d)
    for tree in gpu wA; do
      TREE=.$tree step server_vs_offline_compiled_$tree 170 python3 scripts/bench_server_vs_offline.py --repeats 3 \
        --server-timeout 120 --output "$OUT/server_vs_offline_compiled_$tree.json"
    done
    ;;
  g)  # ~230 s, after parts a-c and t ran: main with the H200 GEMV table committed (default graphs, then a batch-1
      # graph of its own), b6ed921 beside it, and Granite-4.0-H-1B's cold start with the table
    serving gpu_tab
    serving gpu_tab_b1graph $WITH_B1
    TREE=.wO serving wO_g
    step startup_gh_tab 100 python3 scripts/bench_startup.py --models granite_hybrid:4.0-h-1b --runs cold --timeout 90 \
      --output "$OUT/startup_gh_tab.json"
    ;;
  f)
    step gemv_rows2 50 python3 scripts/bench_gemv.py --configs tuned --rows 2 --results_dir "$OUT"
    WORKLOAD="--num_requests 8 --prompt_range 64,128 --output_range 16,16 --batch1_tokens 512"
    serving gpu
    FMS_GEMV=1 serving gpu_cublas2
    ;;
  *) echo "unknown part $PART"; exit 2 ;;
esac
