#!/usr/bin/env bash
# Session 23 device runs.
# Usage: run.sh build (here: .gpu = HEAD, .wA = 8778904 (before), .wC = 16d4386 (copy-on-write kernel only));
#        run.sh FINAL PART (carry .gpu .wA .wC .whl). The raw files go to /tmp/raw_PART and are packed into
#        FINAL/PART.tgz after each step: a device call returns only a few files, so FINAL holds that one file.
#   part t (~60 s): the CUDA tests of this session's code (to_device, copy_pages) and the paged attention tests
#   part e (~150 s): issue 19's fp32 eval (21 interleaved pairs each), context shared and not, for .wA, .wC, .gpu,
#     then again in the other order; then the eval profile of .gpu (kernels and host-to-device copies per pass)
#   part d (~130 s): issue 18's server vs offline, compiled engine (the default on CUDA), three times on .gpu
#   part s (~230 s): 1B serving + batch-1 for .gpu then .wA (issue 19's rows on this commit)
set -u
if [ "${1:-}" = build ]; then
  bash final_project/results/build_trees.sh .gpu:HEAD .wA:8778904 .wC:16d4386; exit
fi
FINAL=${1:?final out dir}; PART=${2:?part}
OUT=/tmp/raw_$PART; mkdir -p "$OUT"
source final_project/results/device_steps.sh
for PART_ in $(echo $PART | grep -o .); do
case $PART_ in
  t)
    step cuda_tests 120 python3 -m pytest -q -p no:cacheprovider tests/cache/test_to_device.py \
      tests/triton/test_copy_pages.py tests/modules/test_paged_attention.py tests/modules/test_paged_padded_prefill.py
    ;;
  e)
    for run in wA1 wC1 gpu1 gpu2 wC2 wA2; do TREE=.${run%?} eval_fp32 $run; done
    step eval_profile_shared 90 python3 ../final_project/results/session22/eval_profile.py "$OUT/eval_profile_shared.json"
    ;;
  d) server_vs_offline_x3 ;;
  s) serving_1b gpu1 wA1 ;;
  *) echo "unknown part $PART_"; exit 2 ;;
esac
done
