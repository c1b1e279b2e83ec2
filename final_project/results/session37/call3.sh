#!/usr/bin/env bash
# Session 37's third device call (FINAL = $OUT): why the unbacked batch's batch-128 step is 3.6% slower (call 2's
# profiles: the greedy argmax in two kernels, the pre-projection RMSNorm as a reduction plus a pointwise kernel, the
# residual add slower), and whether inductor's unbacked_symint_fallback set to the hint mends it. Likely cause (LOG
# session 37, item 7): torch 2.11's Reduction.num_splits gives a reduction over an unbacked size ReductionHint.DEFAULT
# whatever its hint; the output code names each kernel's reduction_hint.
# Trees: `bash final_project/results/build_trees.sh .gpu:main .gpn:flip-unbacked .gpf:unbacked-fallback
# .gph:unbacked-hint-probe`; carry all. K_RUNS (default gpn gpf gph; gpu too for the backed baseline).
#   k (K_RUNS=" " skips it): this torch's mark_unbacked signature; then in each of K_RUNS the decode-step graph replays (batch 1, 2, 128) and
#      batch 128's kernels, with inductor's output code and fusion decisions logged (TORCH_LOGS=output_code,+fusion:
#      its WhyNoFuse lines name the check that kept two nodes apart)
#   s: 1B serving + batch-1 pairs, .gpf against .gpu (S_RUNS, default "gpf1 gpu1 gpu2 gpf2")
FINAL=${1:?final out dir}
# a (A=0 skips it; ~150 s): the Triton argmax (fms.triton.argmax, FMS_ARGMAX_KERNEL=1) in .gpu (main): the kernel
#   against torch's compiled column split per batch size, the batch-128 step's kernels with it, a serving pair
if [ "${A:-1}" = 1 ]; then
  PART=a; OUT=/tmp/raw_a; mkdir -p "$OUT"
  source final_project/results/device_steps.sh
  step argmax_bench 60 python3 ../final_project/results/session37/argmax_bench.py "$OUT/argmax_bench.json"
  FMS_ARGMAX_KERNEL=1 step profile_argmax 80 python3 scripts/profile_serving.py --num_requests 32 --prompt_range 64,128 \
    --output_len 32 --step_batch_sizes 1,2,128 --kernel_batch_sizes 128 --top 30 --results_dir "$OUT/profile_argmax"
  FMS_ARGMAX_KERNEL=1 step serving_1b_arg1 100 python3 scripts/benchmark_serving.py --variant 3.2-1b $WORKLOAD \
    --results_dir "$OUT/serving_1b_arg1"
  step serving_1b_gpu1 100 python3 scripts/benchmark_serving.py --variant 3.2-1b $WORKLOAD \
    --results_dir "$OUT/serving_1b_gpu1"
fi
PART=k; OUT=/tmp/raw_k; mkdir -p "$OUT"
source final_project/results/device_steps.sh
TREE=.gpf step signature 30 python3 -c "import inspect, torch, torch._inductor.config as c; \
print(torch.__version__, inspect.signature(torch._dynamo.decorators.mark_unbacked), c.unbacked_symint_fallback)"
for v in ${K_RUNS:-gpn gpf gph}; do  # gph: .gph (the probe branch) with the hint 8192, fallback 8192
  tree=$v; [ $v = gph ] && export FMS_PROBE_UNBACKED_HINT=8192
  TORCH_LOGS=output_code,+fusion TREE=.$tree step profile_$v 90 python3 scripts/profile_serving.py --num_requests 32 \
    --prompt_range 64,128 --output_len 32 --step_batch_sizes 1,2,128 --kernel_batch_sizes 128 --top 30 \
    --results_dir "$OUT/profile_$v"
  unset FMS_PROBE_UNBACKED_HINT
done
PART=s; OUT=/tmp/raw_s; mkdir -p "$OUT"
source final_project/results/device_steps.sh
for run in ${S_RUNS:-gpf1 gpu1 gpu2 gpf2}; do
  TREE=.${run%?} step serving_1b_$run 100 python3 scripts/benchmark_serving.py --variant 3.2-1b $WORKLOAD \
    --results_dir "$OUT/serving_1b_$run"
done
ls "$FINAL"
