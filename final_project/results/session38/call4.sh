#!/usr/bin/env bash
# Session 38's device calls (FINAL = $OUT), for the two changes of session 38 (report section 29), run with
# run_parts-style letters in PARTS (default "tg"; a second call "f"):
# Trees: `bash final_project/results/build_trees.sh .gpu:main .gpo:2806726` (.gpo: session 37's head, before them);
# carry [".gpu", ".gpo"].
#   t (~120 s): the GPU tests of both changes, with FMS_FUSE_KV_WRITE=1: the kernel's new_kv in bf16, the engine's
#      graphed and compiled decode against SDPA (tests/serving/test_engine_gpu.py: the layers scope runs its
#      attention eagerly, the kernel writing K/V), the hybrid too
#   g (~200 s): Granite-4.0-H-1B cold start, .gpu against .gpo alternated (gpu1 gpo1 gpo2 gpu2): one compile of the
#      merge kernel instead of five; graph_capture_s of 16/8/4/2 should lose ~0.25 s each
#   f (~450 s): 1B serving + batch-1 with FMS_FUSE_KV_WRITE=1 against without, alternated (kv1 gpu1 gpu2 kv2), then
#      the decode step's kernels and replays at batch 2 and 128 with it (the _kv_write_kernel rows should be gone)
#   e (~60 s): the fp32 eval row's passes 3-6 of each mode profiled (eval_profile_passes.py): does the paged pass's
#      ~11% higher host time per shared operator (session 37's one-pass profile) follow the mode or the pass?
#   k (~350 s): session 20's part k, never run: the decode kernel's launch (block, warps, stages) for head_dim 64
#      swept at batch 128 and the serving workload's contexts (256, 512, 1024); session20/pick_decode_launch.py writes
#      .wB = .gpu with DECODE_LAUNCH[64] set to the best (only if it is not the default), then 1B serving .gpu/.wB
#      alternated. Decode attention is ~0.65 ms of a batch-128 step at ~66% of bandwidth (session 20); compiled for
#      sm_90 on the CPU, the shipped launch holds 5 programs (20 warps) an SM, 32-key blocks 9 (section 29).
#      K_HD128=1 adds the same sweep for head_dim 128, as data.
FINAL=${1:?final out dir}
case "${PARTS:-tg}" in *t*)
  PART=t; OUT=/tmp/raw_t; mkdir -p "$OUT"
  source final_project/results/device_steps.sh
  FMS_FUSE_KV_WRITE=1 step gpu_tests_kv 200 python3 -m pytest -q -p no:cacheprovider tests/triton/test_paged_decode.py \
    tests/modules/test_fused_kv_write.py tests/serving/test_engine_gpu.py
  step gpu_tests 120 python3 -m pytest -q -p no:cacheprovider tests/triton/test_paged_decode.py
  ;; esac
case "${PARTS:-tg}" in *g*)
  PART=g; OUT=/tmp/raw_g; mkdir -p "$OUT"
  source final_project/results/device_steps.sh
  for run in ${G_RUNS:-gpu1 gpo1 gpo2 gpu2}; do
    TREE=.${run%?} step startup_gh_$run 90 python3 scripts/bench_startup.py --models granite_hybrid:4.0-h-1b \
      --runs cold --timeout 80 --output "$OUT/startup_gh_$run.json"
  done
  ;; esac
case "${PARTS:-tg}" in *f*)
  PART=f; OUT=/tmp/raw_f; mkdir -p "$OUT"
  source final_project/results/device_steps.sh
  for run in ${F_RUNS:-kv1 gpu1 gpu2 kv2}; do
    flag=""; [ "${run%?}" = kv ] && flag=1
    FMS_FUSE_KV_WRITE=$flag step serving_1b_$run 100 python3 scripts/benchmark_serving.py --variant 3.2-1b $WORKLOAD \
      --results_dir "$OUT/serving_1b_$run"
  done
  FMS_FUSE_KV_WRITE=1 step profile_kv 80 python3 scripts/profile_serving.py --num_requests 32 --prompt_range 64,128 \
    --output_len 32 --step_batch_sizes 2,128 --kernel_batch_sizes 2,128 --top 30 --results_dir "$OUT/profile_kv"
  ;; esac
case "${PARTS:-tg}" in *e*)
  PART=e; OUT=/tmp/raw_e; mkdir -p "$OUT"
  source final_project/results/device_steps.sh
  step eval_passes 120 python3 ../final_project/results/session38/eval_profile_passes.py "$OUT/eval_passes.json" \
    --device_type cuda
  ;; esac
case "${PARTS:-tg}" in *k*)
  PART=k; OUT=/tmp/raw_k; mkdir -p "$OUT"
  source final_project/results/device_steps.sh
  step decode_sweep_d64 150 python3 scripts/bench_paged_decode_kernel.py --head-dim 64 --batch-sizes 128 \
    --context-lengths 256 512 1024 --sweep --out "$OUT/decode_sweep_d64.json"
  python3 final_project/results/session20/pick_decode_launch.py "$OUT/decode_sweep_d64.json" .gpu .wB \
    "$OUT/decode_choice.json" > "$OUT/log_pick.txt" 2>&1; cat "$OUT/log_pick.txt"; pack
  if [ -d .wB ]; then
    for run in wB1 gpu1 gpu2 wB2; do
      TREE=.${run%?} step serving_1b_$run 100 python3 scripts/benchmark_serving.py --variant 3.2-1b $WORKLOAD \
        --results_dir "$OUT/serving_1b_$run"
    done
  fi
  if [ "${K_HD128:-0}" = 1 ]; then
    step decode_sweep_d128 150 python3 scripts/bench_paged_decode_kernel.py --head-dim 128 --batch-sizes 64 128 \
      --context-lengths 512 2048 --sweep --out "$OUT/decode_sweep_d128.json"
  fi
  ;; esac
ls "$FINAL"
