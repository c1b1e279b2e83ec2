#!/usr/bin/env bash
# One device-tool call: environment facts, paged tests on CUDA, kernel timings. Writes logs under $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-results/gpu}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/device.txt"
git rev-parse HEAD 2>/dev/null | tee -a "$OUT/device.txt"
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
