#!/usr/bin/env bash
# Session 34 device run. Usage: run.sh FINAL PARTS (carry .gpu and .gpn: `bash final_project/results/build_trees.sh
# .gpu:b32a87c .gpn:REV`). Raw files in /tmp/raw_PART, packed into FINAL/PART.tgz after each step.
#   part t (~90 s): in .gpn, whether this torch has backed_size_oblivious; the GPU engine tests (the new batch-of-one
#     trace test among them) and the CPU-run compile-count tests
#   part b (~200 s): issue 19's 1B serving + batch-1, .gpu (b32a87c: batch 1 in the batch-2 graph) and .gpn (batch 1
#     in its own graph from the same trace) interleaved, twice each; then .gpn with FMS_FUSE_NORM=1 twice
set -u
FINAL=${1:?final out dir}; PART=${2:?part}
OUT=/tmp/raw_$PART; mkdir -p "$OUT"
source final_project/results/device_steps.sh
part_t() {
  TREE=.gpn step flag 30 python3 -c "import torch, torch.fx.experimental._config as c; print(torch.__version__, 'backed_size_oblivious' in dir(c) or hasattr(c, 'backed_size_oblivious'))"
  TREE=.gpn step gpu_tests 200 python3 -m pytest -q -p no:cacheprovider tests/serving/test_engine_gpu.py tests/runtime/test_compile_counts.py
}
part_b() {
  serving_1b gpu1 gpn1 gpu2 gpn2
  FMS_FUSE_NORM=1 serving_1b gpn3 gpn4
}
run_parts "$PART"
