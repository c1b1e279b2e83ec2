#!/usr/bin/env bash
# Session 10 device runs, on clean trees (git archive: .gpu and .after = this session's commit, .before =
# 4e66ff6), each step under its own time limit, results written under OUT as they come.
# Usage: run.sh OUT PART (carry .before .after .gpu .whl; see session9/run.sh for .whl)
#   part a:      restructuring round 7 (after, then before), then issue 20's TP=1 cost (no compile)
#   part b:      restructuring round 8 (before, then after), then issue 22's hybrid prefix-cache workload
#   part server: issue 18's server vs offline (engine in its own process), then issue 19's fp32 check
set -u
OUT=${1:?out dir}; PART=${2:?part}
export PYTHONUNBUFFERED=1
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
  tail -6 "$OUT/log_$name.txt"
}
restructure() {  # restructure ROUND ORDER
  mkdir -p "$OUT/restructure"
  bash final_project/results/restructure/run.sh "$OUT/restructure" "$1" "$2"
}
case $PART in
  a)
    restructure 7 "after before"
    step tp_overhead 170 python3 scripts/bench_tp_overhead.py --variant 3.2-1b --device cuda --memory-gb 20 \
      --repeats 3 --no-bracket --no-compile --out "$OUT/tp_overhead_h200_llama_1b_nocompile.json"
    ;;
  b)
    restructure 8 "before after"
    step hybrid_prefix 190 python3 scripts/bench_hybrid_prefix_cache.py --device cuda --no-compile \
      --results_dir "$OUT/hybrid_prefix"
    ;;
  b2)  # issue 22's hybrid workload, then where round 7's 10% went: 370af43 (round 6's after) vs this tree vs
       # 4e66ff6 uncompiled (CUDA graphs only), then host profiles (cProfile) of this tree and 370af43
    step hybrid_prefix 190 python3 scripts/bench_hybrid_prefix_cache.py --device cuda --no-compile \
      --results_dir "$OUT/hybrid_prefix"
    for tree in .r6 .gpu .before; do
      name=ab_${tree#.}
      (cd $tree && PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} timeout 100 python3 scripts/benchmark_serving.py --no_compile \
        --decode_steps_sweep 16,16,16 --batch1_tokens 512 --results_dir "$OUT/$name") > "$OUT/log_$name.txt" 2>&1
      echo "exit $?" >> "$OUT/log_$name.txt"; grep "fms LLMEngine" "$OUT/log_$name.txt" | tail -4
    done
    for tree in .gpu .r6; do
      name=prof_${tree#.}
      (cd $tree && PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} timeout 100 python3 -m cProfile -o "$OUT/$name.prof" \
        scripts/benchmark_serving.py --no_compile --decode_steps_sweep 16 --results_dir "$OUT/$name") > "$OUT/log_$name.txt" 2>&1
      python3 -c "import pstats; s = pstats.Stats('$OUT/$name.prof'); s.sort_stats('tottime').print_stats(45)" \
        > "$OUT/${name}_tottime.txt" 2>&1
    done
    ;;
  c)  # issue 18's server vs offline (engine process, then the thread mode), issue 20's NCCL all-reduces in CUDA
      # graphs, issue 22's hybrid workload again (its JSON), issue 19's fp32 check; OUT/c.tgz after each step
    pack() { (cd "$OUT" && tar -czf c.tgz --exclude=c.tgz --exclude='*.prof' .); }
    step server_vs_offline_nocompile 150 python3 scripts/bench_server_vs_offline.py --repeats 2 \
      --engine-args=--no-compile --output "$OUT/server_vs_offline_nocompile.json"; pack
    step server_vs_offline_nocompile_thread 120 python3 scripts/bench_server_vs_offline.py --repeats 2 \
      --no-engine-process --engine-args=--no-compile --output "$OUT/server_vs_offline_nocompile_thread.json"; pack
    step tp_nccl_graphs 200 python3 -m pytest -v -rs tests/test_tensor_parallel_cuda.py; pack
    step hybrid_prefix 100 python3 scripts/bench_hybrid_prefix_cache.py --device cuda --no-compile \
      --results_dir "$OUT/hybrid_prefix"; pack
    step eval_fp32_padded 150 python3 scripts/eval.py --task truthfulqa_mc2 --data fms/resources/eval/truthfulqa_mc.json \
      --mode both --device_type cuda --dtype fp32 --no_progress --output "$OUT/tqa_fp32_padded.json"; pack
    FMS_TEST_DEVICE=cuda step padded_prefill_tests 120 python3 -m pytest -q -rs tests/modules/test_paged_padded_prefill.py; pack
    ;;
  d)  # repeats of issue 18's engine-process run, the two mended GPU tests, then the hybrid compiled (start-up)
    pack() { (cd "$OUT" && tar -czf d.tgz --exclude=d.tgz .); }
    for i in 1 2; do
      step server_vs_offline_nocompile_r$i 120 python3 scripts/bench_server_vs_offline.py --repeats 3 \
        --engine-args=--no-compile --output "$OUT/server_vs_offline_nocompile_r$i.json"; pack
    done
    step tp_nccl_graphs 200 python3 -m pytest -v -rs tests/test_tensor_parallel_cuda.py; pack
    FMS_TEST_DEVICE=cuda step padded_prefill_tests 60 python3 -m pytest -q -rs tests/modules/test_paged_padded_prefill.py; pack
    step hybrid_prefix_compiled 170 python3 scripts/bench_hybrid_prefix_cache.py --device cuda \
      --no_attention_only_reference --results_dir "$OUT/hybrid_prefix_compiled"; pack
    ;;
  server)
    step server_vs_offline_nocompile 270 python3 scripts/bench_server_vs_offline.py --repeats 2 \
      --engine-args=--no-compile --output "$OUT/server_vs_offline_nocompile.json"
    step eval_fp32_padded 150 python3 scripts/eval.py --task truthfulqa_mc2 --data fms/resources/eval/truthfulqa_mc.json \
      --mode both --device_type cuda --dtype fp32 --no_progress --output "$OUT/tqa_fp32_padded.json"
    FMS_TEST_DEVICE=cuda step padded_prefill_tests 120 python3 -m pytest -q tests/modules/test_paged_padded_prefill.py
    ;;
  *) echo "unknown part $PART"; exit 2 ;;
esac
