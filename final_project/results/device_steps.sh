# Sourced by the device scripts (session11/run.sh and later): the device facts, and `step`, which runs one
# benchmark in the clean tree .gpu under its own time limit, logs it to OUT/log_NAME.txt and packs OUT into
# OUT/PART.tgz after each step (a device call returns only a few files). Needs OUT and PART set.
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || exit 1
fi
COMMIT=$(cat .gpu/COMMIT)
export FMS_GIT_COMMIT=$COMMIT  # the results' git_commit: .gpu has no .git, and the device's own .git may be older
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/device_$PART.txt" 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$OUT/device_$PART.txt" 2>&1
echo "tree: $COMMIT" >> "$OUT/device_$PART.txt"
# With FINAL set (session23/run.sh and later), OUT holds the raw files off the returned folder and the tarball
# goes to FINAL alone: a call returns about 8 files, and a tarball beside many raw files can be the one left out.
pack() { (cd "$OUT" && tar -czf "${FINAL:-$OUT}/$PART.tgz" --exclude="$PART.tgz" --exclude='*.prof' .); }
step() {  # step NAME LIMIT_S COMMAND...   (run in the tree $TREE, default .gpu)
  local name=$1 limit=$2; shift 2
  local start=$(date +%s.%N)
  (cd "${TREE:-.gpu}" && export FMS_GIT_COMMIT=$(cat COMMIT 2>/dev/null || echo "$COMMIT") && PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} timeout "$limit" "$@") > "$OUT/log_$name.txt" 2>&1
  echo "exit $? wall $(python3 -c "import time; print(round(time.time() - $start, 1))") s" >> "$OUT/log_$name.txt"
  tail -6 "$OUT/log_$name.txt"
  pack
}
eval_fp32() {  # eval_fp32 [NAME]: issue 19's fp32 eval row, 21 interleaved pairs, context shared and not, in $TREE
  local suffix=${1:+_$1}
  for share in shared alone; do
    local flag=""; [ $share = alone ] && flag="--no_share_context"
    step eval_fp32_$share$suffix 60 python3 scripts/eval.py --task truthfulqa_mc2 \
      --data fms/resources/eval/truthfulqa_mc.json --mode both --dtype fp32 --device_type cuda --no_progress \
      --timing_repeats 21 $flag --output "$OUT/eval_fp32_$share$suffix.json"
  done
}
WORKLOAD="--num_requests 128 --prompt_range 64,512 --output_range 256,256 --batch1_tokens 512 --decode_steps_sweep 16,16,16"
serving_1b() {  # serving_1b RUN...: issue 19's 1B serving workload + batch-1 for each RUN in tree .${RUN%?} (gpu1: .gpu)
  for run in "$@"; do
    TREE=.${run%?} step serving_1b_$run 110 python3 scripts/benchmark_serving.py --variant 3.2-1b $WORKLOAD \
      --results_dir "$OUT/serving_1b_$run"
  done
}
server_vs_offline_x3() {  # issue 18's server vs offline, compiled engine (the default on CUDA), three times on .gpu
  python3 -c "import fastapi, uvicorn, openai, prometheus_client; print('server imports ok')" || exit 1
  for n in 1 2 3; do
    step server_vs_offline_compiled_$n 200 python3 scripts/bench_server_vs_offline.py --repeats 3 \
      --server-timeout 120 --output "$OUT/server_vs_offline_compiled_$n.json"
  done
}
run_parts() {  # run_parts PARTS (session31/run.sh and later): part_X, defined by the sourcing script, for each letter X
  local p
  for p in $(echo "$1" | grep -o .); do
    if declare -F "part_$p" > /dev/null; then "part_$p"; else echo "unknown part $p"; exit 2; fi
  done
  pack
}
