#!/usr/bin/env bash
# Session 9 device runs, on clean trees (git archive), each step under its own time limit, results
# written under OUT as they come. Usage: run.sh OUT PART
#   part server: issue 18's server-vs-offline throughput (.gpu = git archive of the commit in .gpu/COMMIT)
#   part eval:   issue 19's fp32 paged eval on CUDA under cProfile (where the 241x goes)
#   part both:   server, then eval
#   parts hybrid, tp1, fp32check: the runs this session had no device time for (see each part)
set -u
OUT=${1:?out dir}; PART=${2:?part}
export PYTHONUNBUFFERED=1
# the server's packages the device image lacks, carried as wheels (.whl, git-ignored; fetched with
# pip download for cp312 manylinux: fastapi starlette uvicorn pydantic pydantic_core annotated-types
# typing-inspection opentelemetry-api, the versions of requirements.txt's resolution here)
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/device_$PART.txt" 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$OUT/device_$PART.txt" 2>&1
echo "tree: $(cat .gpu/COMMIT)" >> "$OUT/device_$PART.txt"
step() {  # step NAME LIMIT_S COMMAND...
  local name=$1 limit=$2; shift 2
  local start=$(date +%s.%N)
  (cd .gpu && PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} timeout "$limit" "$@") > "$OUT/log_$name.txt" 2>&1
  echo "exit $? wall $(python3 -c "import time; print(round(time.time() - $start, 1))") s" >> "$OUT/log_$name.txt"
  tail -4 "$OUT/log_$name.txt"
}
case $PART in
  server)
    step server_vs_offline 430 python3 scripts/bench_server_vs_offline.py --repeats 2 --output "$OUT/server_vs_offline.json"
    ;;
  server-nocompile)  # CUDA graphs, no torch.compile on either side: a start in seconds, not minutes
    step server_vs_offline_nocompile 270 python3 scripts/bench_server_vs_offline.py --repeats 2 \
      --engine-args=--no-compile --output "$OUT/server_vs_offline_nocompile.json"
    ;;
  hybrid)  # issue 22's GPU workload (Granite-4.0-H-1B shape), caching on and off
    step hybrid_prefix 560 python3 scripts/bench_hybrid_prefix_cache.py --device cuda --no_attention_only_reference \
      --results_dir "$OUT/hybrid_prefix"
    ;;
  tp1)  # issue 20: --tensor-parallel-size 1 against today's path (1B shape)
    step tp_overhead 560 python3 scripts/bench_tp_overhead.py --variant 3.2-1b --device cuda --memory-gb 20 \
      --repeats 3 --no-bracket --out "$OUT/tp_overhead_h200_llama_1b.json"
    ;;
  fp32check)  # issue 19: the padded fp32 path on CUDA, then its kernels against the reference
    step eval_fp32_padded 150 python3 scripts/eval.py --task truthfulqa_mc2 --data fms/resources/eval/truthfulqa_mc.json \
      --mode both --device_type cuda --dtype fp32 --no_progress --output "$OUT/tqa_fp32_padded.json"
    FMS_TEST_DEVICE=cuda step padded_prefill_tests 150 python3 -m pytest -q tests/modules/test_paged_padded_prefill.py
    ;;
  eval|both)
    [ "$PART" = both ] && step server_vs_offline 430 python3 scripts/bench_server_vs_offline.py --repeats 2 \
      --output "$OUT/server_vs_offline.json"
    step eval_fp32 120 python3 -m cProfile -o "$OUT/eval_fp32.prof" scripts/eval.py --task truthfulqa_mc2 \
      --data fms/resources/eval/truthfulqa_mc.json --mode both --device_type cuda --dtype fp32 --no_progress \
      --output "$OUT/tqa_fp32.json"
    python3 -c "import pstats; s = pstats.Stats('$OUT/eval_fp32.prof'); s.sort_stats('cumtime').print_stats(40); s.sort_stats('tottime').print_stats(25)" > "$OUT/eval_fp32_profile.txt" 2>&1
    ;;
esac
