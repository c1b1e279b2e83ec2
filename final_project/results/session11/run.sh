#!/usr/bin/env bash
# Session 11 device runs, on clean trees (git archive: .gpu and .after = this session's commit named in
# .gpu/COMMIT, .before = 4e66ff6), each step under its own time limit, results written under OUT as they
# come and packed into OUT/PART.tgz after each step (a call returns only a few files).
# Usage: run.sh OUT PART (carry .before .after .gpu .whl; .whl: see session10/run.sh's header and the summary)
#   part a: issue 19's fp32 eval repeat, then restructuring round 8 (before, then after; compiled, ~8 min)
#   part b: issue 18's server vs offline (engine process, no compile) on .tt = .gpu + trace.patch (per-request
#           timestamps, trace_timeline.py reads them), with uvicorn's h11 and then with httptools (.wh2); then the
#           packed-Mamba2-conv GPU tests and issue 22's hybrid prefix-cache workload with the packed conv
#   part e: issue 18's server vs offline on this session's admission changes (.gpu, httptools from .whl), twice, then
#           once traced (.tt = .gpu + trace2.patch); issue 19's start-up by phase, llama 3.2-1b cold then warm
#   part f: part c's server runs again on the tree with one add message per loop turn restored, then Granite-4.0-H-1B
#           serving (no compile) next to HF's static generate in batches of 16
set -u
OUT=${1:?out dir}; PART=${2:?part}
source final_project/results/device_steps.sh  # its prologue (device facts, step, pack), shared since session 13
server_runs() {  # server_runs LIMIT_S: issue 18's server vs offline (engine process, no compile), twice
  for i in 1 2; do
    step server_vs_offline_r$i "$1" python3 scripts/bench_server_vs_offline.py --repeats 3 --engine-args=--no-compile \
      --output "$OUT/server_vs_offline_r$i.json"
  done
}
traced_run() {  # traced_run LIMIT_S: the same once on .tt (.gpu + trace2.patch), timestamps under OUT/trace
  mkdir -p "$OUT/trace"
  local start=$(date +%s.%N)
  (cd .tt && PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} FMS_TRACE="$OUT/trace/t" timeout "$1" \
    python3 scripts/bench_server_vs_offline.py --repeats 2 --engine-args=--no-compile \
    --output "$OUT/trace/server_vs_offline.json") > "$OUT/log_trace.txt" 2>&1
  echo "exit $? wall $(python3 -c "import time; print(round(time.time() - $start, 1))") s" >> "$OUT/log_trace.txt"
  tail -4 "$OUT/log_trace.txt"; pack
}
case $PART in
  a)
    step eval_fp32 60 python3 scripts/eval.py --task truthfulqa_mc2 --data fms/resources/eval/truthfulqa_mc.json \
      --mode both --device_type cuda --dtype fp32 --no_progress --output "$OUT/tqa_fp32.json"
    mkdir -p "$OUT/restructure"
    bash final_project/results/restructure/run.sh "$OUT/restructure" 8 "before after"; pack
    ;;
  b)
    for http in h11 httptools; do
      mkdir -p "$OUT/trace_$http"
      extra=""; [ $http = httptools ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --target /tmp/site_ht .wh2/*.whl && extra=/tmp/site_ht:
      start=$(date +%s.%N)
      (cd .tt && PYTHONPATH=$extra$PWD${PYTHONPATH:+:$PYTHONPATH} FMS_TRACE="$OUT/trace_$http/t" timeout 80 \
        python3 scripts/bench_server_vs_offline.py --repeats 2 --engine-args=--no-compile \
        --output "$OUT/trace_$http/server_vs_offline.json") > "$OUT/log_trace_$http.txt" 2>&1
      echo "exit $? wall $(python3 -c "import time; print(round(time.time() - $start, 1))") s" >> "$OUT/log_trace_$http.txt"
      tail -5 "$OUT/log_trace_$http.txt"
      (cd "$OUT/trace_$http" && tar -czf ../trace_$http.tgz . ) && rm -rf "$OUT/trace_$http"; pack
    done
    FMS_TEST_DEVICE=cuda step packed_conv_tests 90 python3 -m pytest -q -rs tests/modules/test_ssm.py \
      tests/triton/test_ssd_scan_checkpoints.py -k "packed or fast_path or emit"
    step hybrid_prefix 120 python3 scripts/bench_hybrid_prefix_cache.py --device cuda --no-compile \
      --results_dir "$OUT/hybrid_prefix"
    ;;
  e)  # what was left of the device time after parts c and d could not start (refused twice): c's server runs and
      # d's start-up, with shorter limits (the script as it ran is in commit e876f49)
    server_runs 70
    traced_run 60
    step startup_1b 465 python3 scripts/bench_startup.py --models llama:3.2-1b --timeout 230 \
      --output "$OUT/startup_1b.json"
    ;;
  f)
    server_runs 60
    step serving_hybrid_hf 115 python3 scripts/benchmark_serving.py --architecture granite_hybrid --variant 4.0-h-1b \
      --num_requests 64 --prompt_range 512,2048 --output_range 128,128 --no_compile --peers hf_generate \
      --hf_batch_size 16 --results_dir "$OUT/serving_hybrid"
    ;;
  *) echo "unknown part $PART"; exit 2 ;;
esac
