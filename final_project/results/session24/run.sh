#!/usr/bin/env bash
# Session 24 device runs.
# Usage: run.sh build REV_GPU REV_WA (here: .gpu = REV_GPU, .wA = REV_WA, archives without final_project);
#        run.sh FINAL PARTS (carry .gpu .wA .whl). Raw files go to /tmp/raw_PART, packed into FINAL/PART.tgz
#        after each step (a device call returns only a few files).
#   part d (~140 s): issue 18's server vs offline, compiled engine (the default on CUDA), three times on .gpu
#   part t (~70 s): the CUDA tests of the paged cache's metadata and the paged attention paths on .gpu
#   part e (~100 s): issue 19's fp32 eval (21 interleaved pairs each), context shared and not, .wA then .gpu
#     then .gpu then .wA
#   part s (~230 s): 1B serving + batch-1 for .gpu then .wA
set -u
if [ "${1:-}" = build ]; then
  for t in .gpu:${2:?rev for .gpu} .wA:${3:?rev for .wA}; do
    dir=${t%%:*}; rev=${t#*:}
    rm -rf $dir && mkdir $dir && git archive $rev -- . ':!final_project' | tar -x -C $dir \
      && git rev-parse --short $rev > $dir/COMMIT && echo "$dir $(cat $dir/COMMIT)" || exit 1
  done
  exit 0
fi
FINAL=${1:?final out dir}; PART=${2:?part}
OUT=/tmp/raw_$PART; mkdir -p "$OUT"
source final_project/results/device_steps.sh
WORKLOAD="--num_requests 128 --prompt_range 64,512 --output_range 256,256 --batch1_tokens 512 --decode_steps_sweep 16,16,16"
eval_fp32() {  # eval_fp32 NAME: issue 19's fp32 eval row, 21 interleaved pairs, context shared and not
  for share in shared alone; do
    local flag=""; [ $share = alone ] && flag="--no_share_context"
    step eval_fp32_${share}_$1 60 python3 scripts/eval.py --task truthfulqa_mc2 \
      --data fms/resources/eval/truthfulqa_mc.json --mode both --dtype fp32 --device_type cuda --no_progress \
      --timing_repeats 21 $flag --output "$OUT/eval_fp32_${share}_$1.json"
  done
}
for PART_ in $(echo $PART | grep -o .); do
case $PART_ in
  d)
    python3 -c "import fastapi, uvicorn, openai, prometheus_client; print('server imports ok')" || exit 1
    for n in 1 2 3; do
      step server_vs_offline_compiled_$n 200 python3 scripts/bench_server_vs_offline.py --repeats 3 \
        --server-timeout 120 --output "$OUT/server_vs_offline_compiled_$n.json"
    done
    ;;
  t)
    step cuda_tests 150 python3 -m pytest -q -p no:cacheprovider tests/cache tests/triton/test_copy_pages.py \
      tests/modules/test_paged_attention.py tests/modules/test_paged_padded_prefill.py
    ;;
  e)
    for run in wA1 gpu1 gpu2 wA2; do TREE=.${run%?} eval_fp32 $run; done
    ;;
  s)
    for run in gpu1 wA1; do
      TREE=.${run%?} step serving_1b_$run 110 python3 scripts/benchmark_serving.py --variant 3.2-1b $WORKLOAD \
        --results_dir "$OUT/serving_1b_$run"
    done
    ;;
  *) echo "unknown part $PART_"; exit 2 ;;
esac
done
