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
