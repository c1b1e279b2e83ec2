#!/usr/bin/env bash
# One device-tool call: environment facts, paged tests on CUDA, kernel timings. Writes logs under $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-results/gpu}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/device.txt"
git rev-parse HEAD 2>/dev/null | tee -a "$OUT/device.txt"
fla_site() {  # fla (flash-linear-attention) is carried as a wheel in .whl/ when the machine has no network
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
  fi
}
serving() {  # serving NAME ARGS...: one benchmark_serving run -> $OUT/serving_NAME.json
  local name=$1; shift
  timeout ${SERVING_TIMEOUT:-450} python3 scripts/benchmark_serving.py --results_dir "$OUT/$name" "$@" 2>&1 \
    | grep -v "requests:\|ContinuousBatchingLogger" | tail -4
  mv "$OUT/$name/serving.json" "$OUT/serving_$name.json"; rm -rf "$OUT/$name"
}
static() {  # static NAME SECONDS ARGS...: one benchmark_inference run -> $OUT/static_NAME.json and .md
  local name=$1 limit=$2; shift 2
  timeout "$limit" python3 scripts/benchmark_inference.py --results_dir "$OUT/s" --run_name "$name" --no_progress "$@" \
    2>&1 | grep -v "DEBUG\|Warning" | tail -25
  mv "$OUT/s/$name/results.json" "$OUT/static_$name.json"; mv "$OUT/s/$name/tables.md" "$OUT/static_$name.md"
  rm -rf "$OUT/s"
}
case "${1:-all}" in
  kernel|all)
    timeout 200 python3 scripts/bench_paged_decode_kernel.py --out "$OUT/kernel.json" 2>&1 | tee "$OUT/kernel.log" | tail -25
    ;;&
  flex|all)
    timeout 200 python3 scripts/bench_paged_decode_kernel.py --flex --batch-sizes 1 8 32 --context-lengths 4096 --out "$OUT/kernel_flex.json" 2>&1 | tee "$OUT/kernel_flex.log" | tail -12
    ;;&
  tests|all)
    FMS_TEST_DEVICE=cuda timeout 240 python3 -m pytest tests/modules/test_paged_decode_kernel.py tests/models/test_paged_generation.py tests/modules/test_paged_attention.py -q -x -k "not 256 and not 128" 2>&1 | tee "$OUT/tests.log" | tail -25
    ;;
  check)
    # correctness on CUDA of this session's kernels: varlen prefill, engine (graphs, packed compiled prefill)
    fla_site
    timeout 240 python3 -m pytest -q tests/modules/test_varlen_attention.py tests/serving/test_engine_gpu.py \
      2>&1 | tee "$OUT/tests.log" | tail -6
    ;;&
  serving-fast|check)
    serving s128 --peers hf
    serving b1 --num_requests 1 --prompt_range 128 --output_range 512
    ;;&
  check)
    FMS_TEST_DEVICE=cuda timeout 150 python3 -m pytest -q tests/modules/test_paged_attention.py \
      tests/models/test_paged_generation.py -k "not 256 and not 128" 2>&1 | tee -a "$OUT/tests.log" | tail -4
    ;;
  session7-ssd)
    # #5: the Triton SSD scan swept over its blocks against fla and the reference (one process per block_t:
    # a kernel fault kills only its own sweep); its GPU tests
    fla_site
    FMS_TEST_DEVICE=cuda timeout 120 python3 -m pytest -q tests/modules/test_ssd_kernel.py 2>&1 \
      | tee "$OUT/tests_ssd_kernel.log" | tail -3
    if [ -n "${SWEEP:-}" ]; then
      for bt in ${BLOCK_TS:-32 64}; do
        for point in "1,2,4,8 4096" "1,8 16384"; do
          set -- $point
          timeout ${BENCH_TIMEOUT:-150} python3 scripts/bench_ssd_scan.py --batch_sizes $1 --context_lengths $2 \
            --repeats 10 --block_t $bt --output "$OUT/bench_ssd_scan_t${bt}_$2.json" 2>&1 \
            | tee "$OUT/bench_ssd_scan_t${bt}_$2.log" | tail -6
        done
      done
    fi
    timeout 150 python3 scripts/bench_ssd_scan.py --defaults_only --batch_sizes 1,2,4,8 \
      --context_lengths 1024,4096,16384 --repeats 20 --output "$OUT/bench_ssd_scan_defaults.json" 2>&1 \
      | tee "$OUT/bench_ssd_scan_defaults.log" | tail -14
    [ -n "${NO_PROFILE:-}" ] || timeout 150 python3 scripts/profile_hybrid.py --sections mixer --paths fast,reference --variant 4.0-h-1b \
      --dtype bf16 --device cuda --batch_sizes 1,8 --context_lengths 4096,16384 --repeats 5 --warmup 2 \
      --output_dir "$OUT" --run_name profile_hybrid_mixer 2>&1 | tail -12
    ;;
  session7-tests)
    # the mixer's fast paths (Triton and fla scans) and the fused decode update on CUDA
    fla_site
    FMS_TEST_DEVICE=cuda timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q tests/modules/test_ssm.py \
      -k "fast_path or packed" 2>&1 | tee "$OUT/tests_ssd.log" | tail -4
    timeout 200 python3 -m pytest -q tests/modules/test_mamba_decode_kernel.py 2>&1 | tee "$OUT/tests_decode_kernel.log" | tail -4
    ;;
  session7-engine)
    # the hybrid model compiled and graphed, and the engine, on this code
    fla_site
    FMS_TEST_DEVICE=cuda timeout 150 python3 -m pytest -q tests/modules/test_ssm.py -k "packed" 2>&1 \
      | tee "$OUT/tests_packed.log" | tail -3
    timeout ${TEST_TIMEOUT:-400} python3 -m pytest -q tests/models/test_hybrid_decode_compile.py \
      tests/serving/test_engine_gpu.py -k "hybrid or mamba" 2>&1 | tee "$OUT/tests_engine.log" | tail -4
    ;;
  session4)
    # this session's report runs: eval parity on the Llama shape, serving (decode-window sweep, batch 1), profile
    for task in "mmlu fms/resources/eval/mmlu" "truthfulqa_mc2 fms/resources/eval/truthfulqa_mc.json"; do
      set -- $task
      timeout 120 python3 scripts/eval.py --mode both --variant 3.2-1b --task $1 --data $2 --num_fewshot 1 \
        --no_progress --output "$OUT/eval_3.2-1b_$1.json" 2>&1 | tail -3
    done
    serving s128sweep --decode_steps_sweep 8,16 --batch1_tokens 512
    timeout 200 python3 scripts/profile_serving.py --num_requests 128 --output_len 32 --results_dir "$OUT" --top 25 \
      --step_batch_sizes 1,128 2>&1 | tail -30
    ;;
  session4-hybrid)
    # Granite-4.0-H: compiled graphed decode (tests), the engine, eval parity
    fla_site
    timeout 200 python3 -m pytest -q tests/models/test_hybrid_decode_compile.py tests/serving/test_engine_gpu.py -k "hybrid" \
      2>&1 | tee "$OUT/tests_hybrid.log" | tail -3
    serving hybrid --architecture granite_hybrid --variant 4.0-h-1b --num_requests 64 --prompt_range 512,2048 --output_range 128
    for task in "mmlu fms/resources/eval/mmlu" "truthfulqa_mc2 fms/resources/eval/truthfulqa_mc.json"; do
      set -- $task
      timeout 120 python3 scripts/eval.py --mode both --architecture granite_hybrid --variant 4.0-h-1b --task $1 --data $2 \
        --num_fewshot 1 --no_progress --output "$OUT/eval_4.0-h-1b_$1.json" 2>&1 | tail -2
    done
    ;;
  session4-static)
    # #5: static generate, Granite-4.0-H-1B shape, sdpa vs paged at batch >= 8 and context >= 2k
    fla_site
    static granite 400 --architecture granite_hybrid --variant 4.0-h-1b --attn_name sdpa,paged \
      --batch_sizes 8 32 64 --base_context 2048 --context_lengths 2048 8192 16384 --max_new_tokens 16 --repeats 2
    ;;
  session5-tests)
    # every GPU test of the engine, the GEMV kernel, the paged kernels and the hybrid compile, on the final code
    fla_site
    FMS_TEST_DEVICE=cuda timeout 420 python3 -m pytest -q -p no:warnings tests/modules/test_gemv.py \
      tests/modules/test_varlen_attention.py tests/serving/test_engine_gpu.py tests/models/test_hybrid_decode_compile.py \
      tests/modules/test_paged_decode_kernel.py tests/models/test_paged_generation.py -k "not 256 and not 128" \
      2>&1 | tee "$OUT/tests.log" | tail -8
    ;;
  session5-serving)
    # #7: the workload with the HF peer, then batch 1 on the same engine
    SERVING_TIMEOUT=560 serving s128 --peers hf --batch1_tokens 512
    ;;
  session5-static)
    # #5: static generate compiled for both backends, Granite-4.0-H-1B shape, batch 8 and 32 at context 2048
    fla_site
    static granite_compiled ${STATIC_TIMEOUT:-540} --architecture granite_hybrid --variant 4.0-h-1b \
      --attn_name sdpa,paged --sweep batch --batch_sizes 8 32 --base_context 2048 --max_new_tokens 16 --repeats 2 \
      --warmup 1 --compile ${COMPILE_SCOPE:+--compile_scope $COMPILE_SCOPE}
    ;;
  session6-windows)
    # #5: static generate with decode windows (device-side step inputs, CUDA graphs) for both caches
    fla_site
    [ -n "${NO_TESTS:-}" ] || FMS_TEST_DEVICE=cuda timeout 200 python3 -m pytest -q -p no:warnings \
      tests/utils/test_generation_windows.py tests/models/test_hybrid_decode_compile.py tests/serving/test_engine_gpu.py \
      2>&1 | tee "$OUT/tests.log" | tail -6
    static granite_windows ${STATIC_TIMEOUT:-330} --architecture granite_hybrid --variant 4.0-h-1b \
      --attn_name sdpa,paged --sweep batch --batch_sizes 8 32 --base_context 2048 --max_new_tokens 64 --repeats 3 \
      --warmup 1 --decode_window 16 --cuda_graphs ${STATIC_COMPILE:+--compile}
    ;;
  session6-context)
    # #5: the same at batch 8 and longer contexts, CUDA graphs without compile (one compile per pool size)
    fla_site
    static granite_windows_context ${STATIC_TIMEOUT:-330} --architecture granite_hybrid --variant 4.0-h-1b \
      --attn_name sdpa,paged --sweep context --base_batch 8 --context_lengths 8192 16384 --max_new_tokens 64 \
      --repeats 3 --warmup 1 --decode_window 16 --cuda_graphs
    ;;
  session6-fused)
    # the fused fast path (fla conv + scan + gated norm) against the reference, then mixer and model prefill
    fla_site
    FMS_TEST_DEVICE=cuda timeout 300 python3 -m pytest -q -p no:warnings tests/modules/test_ssm.py 2>&1 | tail -3
    timeout 300 python3 scripts/profile_hybrid.py --sections mixer,prefill --paths fast,reference --variant 4.0-h-1b \
      --dtype bf16 --device cuda --batch_sizes 1,8 --context_lengths 4096,16384 --repeats 5 --warmup 2 \
      --output_dir "$OUT" --run_name profile_hybrid_fused 2>&1 | grep -v "^WARNING" | tail -40
    ;;
  session6-packed)
    # packed hybrid prefill: fla over cu_seqlens against the reference, the engine on the GPU, hybrid serving
    fla_site
    FMS_TEST_DEVICE=cuda timeout 400 python3 -m pytest -q -p no:warnings tests/modules/test_ssm.py \
      tests/serving/test_engine_gpu.py -k "packed or hybrid" 2>&1 | tail -3
    SERVING_TIMEOUT=560 serving hybrid_packed --architecture granite_hybrid --variant 4.0-h-1b --num_requests 64 \
      --prompt_range 512,2048 --output_range 128
    ;;
  session7-serving)
    # hybrid serving on this session's kernels (Triton scan in packed prefill, fused decode update)
    fla_site
    SERVING_TIMEOUT=${SERVING_TIMEOUT:-560} serving hybrid --architecture granite_hybrid --variant 4.0-h-1b \
      --num_requests 64 --prompt_range 512,2048 --output_range 128
    ;;
  session6-mixer)
    # #5: the Mamba scan and mixer alone, fla vs the PyTorch reference (eager and CUDA-graphed)
    fla_site
    timeout 300 python3 scripts/profile_hybrid.py --sections mixer --variant 4.0-h-1b --dtype bf16 --device cuda \
      --batch_sizes 1,8 --context_lengths 1024,4096,16384 --max_recurrent_context 2048 --repeats 10 --warmup 2 \
      --output_dir "$OUT" --run_name profile_hybrid_mixer 2>&1 | tail -40
    ;;
  report-serving)
    # #7 serving (with the HF peer), batch-1 decode, Granite-4.0-H through the engine; #6 eval parity
    fla_site
    serving s128 --peers hf
    serving b1 --num_requests 1 --prompt_range 128 --output_range 512
    serving hybrid --architecture granite_hybrid --variant 4.0-h-1b --num_requests 64 --prompt_range 512,2048 --output_range 128
    for v in "llama 3.2-1b" "granite_hybrid 4.0-h-1b"; do
      set -- $v
      for task in "mmlu fms/resources/eval/mmlu" "truthfulqa_mc2 fms/resources/eval/truthfulqa_mc.json"; do
        set -- $v $task
        timeout 150 python3 scripts/eval.py --mode both --architecture $1 --variant $2 --task $3 --data $4 --num_fewshot 1 \
          --no_progress --output "$OUT/eval_$2_$3.json" 2>&1 | tail -4
      done
    done
    ;;
  report-hybrid)
    fla_site
    timeout 300 python3 scripts/profile_hybrid.py --variant 4.0-h-1b --dtype bf16 --device cuda \
      --context_lengths 512,1024,2048,4096,8192,16384 --batch_sizes 1 --repeats 3 --warmup 1 \
      --max_recurrent_context 2048 --attn_name paged --output_dir "$OUT" --run_name profile_hybrid 2>&1 | tail -30
    static granite-4.0-h-1b 280 --architecture granite_hybrid --variant 4.0-h-1b --attn_name sdpa,paged \
      --batch_sizes 1 8 32 64 --base_context 2048 --context_lengths 512 2048 8192 16384 --max_new_tokens 16 --repeats 1
    ;;
  report-static)
    # #4: static-batch sweeps, both backends side by side, Llama-3.2-1B and Llama-2-7B shapes
    for v in ${MODELS:-3.2-1b 2-7b}; do
      # Llama-2-7B's context is 4096 tokens
      ctx="128 512 2048 8192 16384"; [ $v = 2-7b ] && ctx="128 512 1024 2048 4080"
      static $v 280 --variant $v --attn_name sdpa,paged \
        --batch_sizes 1 2 4 8 16 32 --base_context 512 --context_lengths $ctx --max_new_tokens 16 \
        --repeats 2 $( [ $v = 3.2-1b ] && echo "--mixed --mixed_requests 64 --mixed_prompt_range 32,1024 --mixed_output_range 8,64 --memory_budget_gb 2 --peers hf" )
    done
    ;;
  engine)
    # fla (flash-linear-attention) is carried as a wheel in .whl/ when the machine has no network
    if ls .whl/*.whl >/dev/null 2>&1; then
      python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
    fi
    timeout 300 python3 -m pytest tests/serving -q -x 2>&1 | tee "$OUT/tests_serving.log" | tail -5
    for run in "s128 --peers hf" "s128_k1 --max_decode_steps 1" "b1 --num_requests 1 --prompt_range 128 --output_range 512" \
               "b1_k1 --num_requests 1 --prompt_range 128 --output_range 512 --max_decode_steps 1"; do
      set -- $run
      name=$1; shift
      timeout 240 python3 scripts/benchmark_serving.py --results_dir "$OUT/$name" "$@" 2>&1 | grep -v "requests:" | tail -4
      mv "$OUT/$name/serving.json" "$OUT/serving_$name.json"; rm -rf "$OUT/$name"
    done
    ;;
esac
