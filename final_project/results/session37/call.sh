#!/usr/bin/env bash
# Session 37's second device call (FINAL = $OUT). Trees: `bash final_project/results/build_trees.sh .gpu:MAIN
# .gpn:flip-unbacked`, carry .gpu and .gpn. Both trees ship the H100's one-row GEMV table (merged this session);
# .gpu is main (unbacked batch off by default), .gpn the flip branch (on by default), so no flags differ.
# Each step is packed as it ends, in order of need:
#   c: three 1B serving + batch-1 pairs, the first tree alternating (gpn gpu, gpu gpn, gpn gpu)
#   G: Granite-4.0-H-1B cold start, one pair, .gpn first (call 1 ran .gpu first)
#   p: the decode-step profile in .gpn (the unbacked batch): batch 1 in its own graph, batch 128's kernels
#   e: the fp32 eval row in .gpu (21 interleaved pairs, shared and alone), then its shared-context pass profiled
# Short budget: C_RUNS="gpn1 gpu1" (one pair), P_LIMIT=0, E=0.
FINAL=${1:?final out dir}
PART=c; OUT=/tmp/raw_c; mkdir -p "$OUT"
source final_project/results/device_steps.sh
for run in ${C_RUNS:-gpn1 gpu1 gpu2 gpn2 gpn3 gpu3}; do
  TREE=.${run%?} step serving_1b_$run 100 python3 scripts/benchmark_serving.py --variant 3.2-1b $WORKLOAD \
    --results_dir "$OUT/serving_1b_$run"
done
PART=G; OUT=/tmp/raw_G; mkdir -p "$OUT"
source final_project/results/device_steps.sh
for run in gpn1 gpu1; do
  TREE=.${run%?} step startup_gh_$run 100 python3 scripts/bench_startup.py --models granite_hybrid:4.0-h-1b \
    --runs cold --timeout 90 --output "$OUT/startup_gh_$run.json"
done
PART=p; OUT=/tmp/raw_p; mkdir -p "$OUT"
source final_project/results/device_steps.sh
[ "${P_LIMIT:-80}" -gt 0 ] && TREE=.gpn step profile_1b_gpn ${P_LIMIT:-80} python3 scripts/profile_serving.py \
  --num_requests 128 --prompt_range 64,512 --output_len 128 --step_batch_sizes 1,2,128 --kernel_batch_sizes 1,128 \
  --top 40 --results_dir "$OUT/profile_1b_gpn"
if [ "${E:-1}" = 1 ]; then
  PART=e; OUT=/tmp/raw_e; mkdir -p "$OUT"
  source final_project/results/device_steps.sh
  TREE=.gpu eval_fp32
  TREE=.gpu step eval_profile_shared 90 python3 ../final_project/results/session22/eval_profile.py \
    "$OUT/eval_profile_shared.json" --device_type cuda
fi
ls "$FINAL"
