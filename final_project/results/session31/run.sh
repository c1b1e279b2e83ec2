#!/usr/bin/env bash
# Session 31 device run. Usage: run.sh FINAL PARTS (carry .gpu, .wB; `bash final_project/results/build_trees.sh
# .gpu:REV .wB:REV`). Raw files in /tmp/raw_PART, packed into FINAL/PART.tgz after each step.
#   part G (~40 s): gemm_probe.py: the decode projections' kernel time at 8-256 rows, cuBLAS against cublasLt
#   part T (~250 s, H100-class GPUs without a table only): scripts/bench_gemv.py --rows 2 --write_table: this GPU's GEMV
#     table for the engine's decode graph (batch 1 and 2 run at two rows); tree .wT = .gpu + that table; then issue
#     19's 1B serving + batch-1 in .gpu, .wT, .wT, .gpu (the table's effect, both orders)
#   part a (~60 s): argmax_probe.py: the compiled greedy argmax at batch 2-128 per column split
#   part f (~60 s): prefill_profile.py: one full 8,176-token prefill step's kernels (torch.profiler)
#   part F (~60 s): part f on a mixed step (27 prompts and 28 decoding requests) plus its chrome trace and where the
#     GPU waited (gaps between kernels, the host op that launched the kernel after each)
#   part S (~90 s): issue 19's 1B serving + batch-1 in .gpu, .wA, .wA, .gpu (build .wA with the candidate first)
#   part p (~120 s): profile_serving.py's decode-step kernel profile at batch 1 and 128 (as session 19's part p)
#   part E: part F in .wA
# Next (session 32): `bash final_project/results/build_trees.sh .gpu:HEAD .wA:6e566c6`, then `bash
#   final_project/results/session31/run.sh $OUT FES` (carry .gpu and .wA; ~4 min): the prefill step's trace with and
#   without session 31's non-blocking copies (.wA is before them), then the 1B serving A/B of the two trees; on an
#   H200 also `bash final_project/results/session30/run.sh $OUT h` (Granite's cold start).
set -u
FINAL=${1:?final out dir}; PART=${2:?part}
OUT=/tmp/raw_$PART; mkdir -p "$OUT"
source final_project/results/device_steps.sh
part_G() { step gemm_probe 120 python3 ../final_project/results/session31/gemm_probe.py "$OUT/gemm_probe.json"; }
part_T() {
  local name
  name=$(python3 -c "import re, torch; print(re.sub(r'[^A-Za-z0-9]+', '_', torch.cuda.get_device_name()).strip('_'))")
  if [ -f ".gpu/fms/resources/gemv/$name.json" ]; then echo "part T: $name already has a table, skipped"; return; fi
  step gemv_table_rows2 300 python3 scripts/bench_gemv.py --rows 2 --write_table "$OUT/$name.json" \
    --results_dir "$OUT/gemv_sweep_rows2"
  [ -f "$OUT/$name.json" ] || { echo "part T: no table written"; return; }
  rm -rf .wT && cp -r .gpu .wT && cp "$OUT/$name.json" .wT/fms/resources/gemv/ && echo "wT: $(cat .wT/COMMIT) + $name.json"
  serving_1b gpu1 wT1 wT2 gpu2
}
part_a() { step argmax_probe 120 python3 ../final_project/results/session31/argmax_probe.py "$OUT/argmax_probe.json"; }
part_f() { step prefill_profile 150 python3 ../final_project/results/session31/prefill_profile.py "$OUT/prefill_profile.json"; }
part_F() {  # in $TREE (default .gpu); the files are named after the tree
  local tree=${TREE:-.gpu}
  step prefill_trace${tree#.} 150 python3 ../final_project/results/session31/prefill_profile.py \
    "$OUT/prefill_trace${tree#.}.json" --trace "$OUT/prefill_trace${tree#.}.json.gz" --mixed
}
part_E() { TREE=.wA part_F; }
part_S() { serving_1b gpu1 wA1 wA2 gpu2; }
part_p() {
  step profile_1b 200 python3 scripts/profile_serving.py --num_requests 128 --prompt_range 64,512 --output_len 128 \
    --step_batch_sizes 1,8,32,64,128 --kernel_batch_sizes 1,128 --top 40 --results_dir "$OUT/profile_1b"
}
run_parts "$PART"
