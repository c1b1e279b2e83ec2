#!/usr/bin/env bash
# Session 32 device run. Usage: run.sh FINAL PARTS (carry .gpu; `bash final_project/results/build_trees.sh .gpu:REV`).
# Raw files in /tmp/raw_PART, packed into FINAL/PART.tgz after each step.
#   part k (~150 s): tests/triton/test_splitk.py on the GPU (the bf16 tl.dot path the CPU's interpreter cannot run),
#     then fms bench gemv --rows ${ROWS:-128}: the split-K kernel against cuBLAS at the engine's batch-128 bucket,
#     written as a table into /tmp/raw_k/tables (FMS_GEMV_TABLE_DIR for part S)
#   part S (~170 s): issue 19's 1B serving + batch-1 in .gpu without the table, with it, with it, without
#   part q (~150 s): skinny_probe.py (the same kernel's sweep, standalone; with inductor's max-autotune beside)
set -u
FINAL=${1:?final out dir}; PART=${2:?part}
OUT=/tmp/raw_$PART; mkdir -p "$OUT"
source final_project/results/device_steps.sh
TABLES=/tmp/raw_k/tables
part_k() {
  mkdir -p "$TABLES"
  # the kernel's own tests gate the table; the compiled-step test (bf16 tokens against cuBLAS's) is for information
  step splitk_tests 120 python3 -m pytest -q -p no:cacheprovider tests/triton/test_splitk.py -k "not compiled_decode"
  grep -q "^exit 0 " "$OUT/log_splitk_tests.txt" || { echo "part k: the kernel's tests failed on the GPU: no table"; return; }
  step splitk_compiled_test 120 python3 -m pytest -q -p no:cacheprovider tests/triton/test_splitk.py -k compiled_decode
  step splitk_table ${SWEEP_LIMIT:-150} python3 scripts/bench_gemv.py --rows "${ROWS:-128}" --write_table "$TABLES" \
    --results_dir "$OUT/splitk_sweep"
  ls "$TABLES"; cp -r "$TABLES" "$OUT/"
}
part_S() {
  [ -n "$(ls $TABLES 2>/dev/null)" ] || { echo "part S: no table in $TABLES (run part k first)"; return; }
  serving_1b gpu1
  FMS_GEMV_TABLE_DIR=$TABLES serving_1b gpu3 gpu4
  serving_1b gpu2
}
part_q() {
  step skinny_probe 200 python3 ../final_project/results/session32/skinny_probe.py "$OUT/skinny_probe.json" \
    --rows 128 --autotune --budget_s 150
}
run_parts "$PART"
