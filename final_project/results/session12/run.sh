#!/usr/bin/env bash
# Session 12 device runs on a clean tree (.gpu = .after = git archive of the commit in .gpu/COMMIT; .before =
# 4e66ff6), each step under its own time limit, results written under OUT as they come and packed into
# OUT/PART.tgz after each step (a call returns only a few files).
# Usage: run.sh OUT PART (carry .gpu .after .before .whl)
#   part a: the CUDA tests of session 11's fixes and this session's compile counts; issue 19's start-up of the
#           1B after the two recompiles were removed (cold, warm); Granite-4.0-H-1B serving next to HF's static
#           generate (no compile, batches of 16); the fp32 eval row of `fms bench targets`
#   part b: `fms bench targets --rows startup-8b,serving-8b` in one budget
#   part c: restructuring round 9, the new tree first (not run: device time went to parts b and d)
#   part d: 8B serving uncompiled with HF generate_batch; the hybrid's HF peer in batches of 4
#   part e: server vs offline with per-run engine totals; the hybrid with HF on 16 requests
#   part f: the fp32 eval row, three runs
# CPU runs of the eval (cpu/): python scripts/eval.py ... --device_type cpu, three times, and fms bench targets --device cpu
set -u
OUT=${1:?out dir}; PART=${2:?part}
source final_project/results/device_steps.sh  # its prologue (device facts, step, pack), shared since session 13
case $PART in
  a)
    step cuda_tests 150 python3 -m pytest -q -rs tests/models/test_config_validation.py tests/utils/test_serialization.py \
      tests/runtime/test_compile_counts.py tests/serving/test_engine_gpu.py -k "cuda or compile or graph or packed or trace"
    step startup_1b 330 python3 scripts/bench_startup.py --models llama:3.2-1b --timeout 160 --output "$OUT/startup_1b.json"
    step serving_hybrid_hf 130 python3 scripts/benchmark_serving.py --architecture granite_hybrid --variant 4.0-h-1b \
      --num_requests 64 --prompt_range 512,2048 --output_range 128,128 --no_compile --peers hf_generate \
      --hf_batch_size 16 --results_dir "$OUT/serving_hybrid"
    step targets_eval 90 python3 -m fms.entrypoints.cli bench targets --rows eval-fp32 --timeout 80 --commit "$COMMIT" \
      --output "$OUT/targets_a.json"
    ;;
  b)
    step targets_8b 585 python3 -m fms.entrypoints.cli bench targets --rows startup-8b,serving-8b --timeout 560 \
      --budget 575 --commit "$COMMIT" --output "$OUT/targets_b.json"
    ;;
  c)
    mkdir -p "$OUT/restructure"
    bash final_project/results/restructure/run.sh "$OUT/restructure" 9 "after before"; pack
    ;;
  d)  # part b's serving-8b timed out compiling (211 s left for it): uncompiled here; the hybrid's HF peer ran out of
      # memory in batches of 16 (transformers' torch Mamba path asked for 192 GiB): batches of 4
    step serving_8b 300 python3 scripts/benchmark_serving.py --variant 3.1-8b --num_requests 128 --prompt_range 64,512 \
      --output_range 256,256 --no_compile --peers hf --results_dir "$OUT/serving_8b"
    step serving_hybrid_hf4 200 python3 scripts/benchmark_serving.py --architecture granite_hybrid --variant 4.0-h-1b \
      --num_requests 64 --prompt_range 512,2048 --output_range 128,128 --no_compile --peers hf_generate \
      --hf_batch_size 4 --results_dir "$OUT/serving_hybrid_hf4"
    ;;
  e)  # what was left: issue 18's server vs offline with the engine totals of each run (no compile); the hybrid
      # with HF's static generate on 16 of the requests (64 in batches of 4 did not finish in 200 s)
    step server_vs_offline 90 python3 scripts/bench_server_vs_offline.py --repeats 3 --engine-args=--no-compile \
      --output "$OUT/server_vs_offline.json"
    step serving_hybrid_hf16 170 python3 scripts/benchmark_serving.py --architecture granite_hybrid --variant 4.0-h-1b \
      --num_requests 16 --prompt_range 512,2048 --output_range 128,128 --no_compile --peers hf_generate \
      --hf_batch_size 4 --results_dir "$OUT/serving_hybrid_hf16"
    ;;
  f)  # ran as one command line in the last 234 s of device time: the fp32 eval row three times
    (cd .gpu && PYTHONPATH=$PWD timeout 150 python3 -m fms.entrypoints.cli bench targets --rows eval-fp32 --repeats 3 \
      --timeout 60 --commit "$COMMIT" --output "$OUT/targets_f.json") > "$OUT/log_targets_f.txt" 2>&1; pack
    ;;
  *) echo "unknown part $PART"; exit 2 ;;
esac
