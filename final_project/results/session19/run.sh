#!/usr/bin/env bash
# Session 19 device runs. NOT RUN on a device yet (session 19 lost most of its time to an outage). Part p's one
# CPU dry run ran its full workload (128 requests x 128 tokens of llama micro on the CPU) and passed its 200 s
# limit; that says nothing of the H200 (the same script with 4 requests finishes in 7 s here).
# Usage: run.sh build (here: .gpu = HEAD, .wO = the baseline named in BASE);
# run.sh OUT PART (carry .gpu and, for A/B parts, .wO)
#   part p (~150 s): where the default engine's decode time goes on the H200: torch.profiler over a
#     1B serving run (128 requests, prompts 64-512, 128 new), the kernels of one graphed decode step at
#     batch 1 and 128 (idle rows: the weights and everything but KV reads), and step times per bucket
set -u
if [ "${1:-}" = build ]; then
  BASE=${BASE:-HEAD}
  rm -rf .gpu .wO && mkdir .gpu .wO && git archive HEAD | tar -x -C .gpu && git rev-parse --short HEAD > .gpu/COMMIT \
    && git archive "$BASE" | tar -x -C .wO && git rev-parse --short "$BASE" > .wO/COMMIT && cat .gpu/COMMIT .wO/COMMIT
  exit $?
fi
OUT=${1:?out dir}; PART=${2:?part}
source final_project/results/device_steps.sh
case $PART in
  p)
    step profile_1b 200 python3 scripts/profile_serving.py --num_requests 128 --prompt_range 64,512 --output_len 128 \
      --step_batch_sizes 1,8,32,64,128 --kernel_batch_sizes 1,128 --top 40 --results_dir "$OUT/profile_1b"
    ;;
  *) echo "unknown part $PART"; exit 2 ;;
esac
