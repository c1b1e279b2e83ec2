#!/usr/bin/env bash
# Session 20 device runs.
# Usage: run.sh build (here: .gpu = HEAD); run.sh OUT PART (carry .gpu, and .whl for part d)
#   part k (~330 s): the paged decode kernel's launch for Llama-3.2-1B's head_dim 64: a sweep at batch 128 (contexts
#     256, 512, 1024; bench_paged_decode_kernel --head-dim 64 --sweep), the greedy argmax's column split
#     (argmax_probe.py), then pick_decode_launch.py writes .wB = .gpu
#     with DECODE_LAUNCH[64] set to the sweep's best, then 1B serving + batch-1 for .gpu, .wB, .gpu, .wB; then part e
#   part d (~400 s, needs .whl): issue 18's server vs offline with the compiled engine (session 18's part d on HEAD),
#     twice; then part e
#   part e (~40 s): issue 19's fp32 eval, 21 interleaved pairs, context shared and not
# Part p (the serving profile) is session 19's: bash final_project/results/session19/run.sh OUT p
set -u
if [ "${1:-}" = build ]; then
  rm -rf .gpu && mkdir .gpu && git archive HEAD | tar -x -C .gpu && git rev-parse --short HEAD > .gpu/COMMIT \
    && cat .gpu/COMMIT
  exit $?
fi
OUT=${1:?out dir}; PART=${2:?part}
source final_project/results/device_steps.sh
WORKLOAD="--num_requests 128 --prompt_range 64,512 --output_range 256,256 --batch1_tokens 512 --decode_steps_sweep 16,16,16"
serving() {  # serving NAME [extra flags]; TREE=.. picks the tree
  local name=$1; shift
  step serving_1b_$name 110 python3 scripts/benchmark_serving.py --variant 3.2-1b $WORKLOAD "$@" \
    --results_dir "$OUT/serving_1b_$name"
}
case $PART in
  k)
    step decode_sweep_d64 150 python3 scripts/bench_paged_decode_kernel.py --head-dim 64 --batch-sizes 128 \
      --context-lengths 256 512 1024 --sweep --out "$OUT/decode_sweep_d64.json"
    step argmax_probe 60 python3 final_project/results/session20/argmax_probe.py "$OUT/argmax_probe.json"
    python3 final_project/results/session20/pick_decode_launch.py "$OUT/decode_sweep_d64.json" .gpu .wB \
      "$OUT/decode_choice.json" > "$OUT/log_pick.txt" 2>&1; cat "$OUT/log_pick.txt"; pack
    if [ -d .wB ]; then
      for run in gpu1 wB1 gpu2 wB2; do TREE=.${run%?} serving $run; done
    fi
    eval_fp32
    ;;
  d)
    for n in 1 2; do
      step server_vs_offline_compiled_$n 170 python3 scripts/bench_server_vs_offline.py --repeats 3 \
        --server-timeout 120 --output "$OUT/server_vs_offline_compiled_$n.json"
    done
    eval_fp32
    ;;
  e) eval_fp32 ;;
  *) echo "unknown part $PART"; exit 2 ;;
esac
