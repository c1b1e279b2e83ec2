#!/usr/bin/env bash
# Session 25 device runs: parts d, w, c, i here; t, e, s, p and `build` are session 24's (run by its script). Every
# server-vs-offline run now also writes each engine's timeline (FMS_STEP_TRACE) beside its JSON.
# Usage: run.sh build REV_GPU REV_WA (here: .gpu = REV_GPU, .wA = REV_WA, archives without final_project);
#        run.sh FINAL PARTS (carry .gpu .wA .whl). Raw files go to /tmp/raw_PART, packed into FINAL/PART.tgz
#        after each step (a device call returns only a few files).
#   part d (~250 s): issue 18's server vs offline, compiled engine (the default on CUDA), three times on .gpu, then
#     once with --fresh-connections (the client method before session 25)
#   part c (~15 s): clock_probe.py, a matmul's time after the GPU idled 0-1 s
#   part i (~130 s): server vs offline twice with --idle-before-run 0.5
#   part w (~210 s): part d without its --fresh-connections run
#   part t (~70 s): the CUDA tests of the paged cache's metadata and the paged attention paths on .gpu
#   part e (~100 s): issue 19's fp32 eval (21 interleaved pairs each), context shared and not, .wA then .gpu
#     then .gpu then .wA
#   part s (~230 s): 1B serving + batch-1 for .gpu then .wA
#   part p (~60 s): the eval profile (results/session22/eval_profile.py) of the shared-context pass on .gpu
set -u
[ "${1:-}" = build ] && exec bash final_project/results/session24/run.sh "$@"
FINAL=${1:?final out dir}; PART=${2:?part}
OUT=/tmp/raw_$PART; mkdir -p "$OUT"
source final_project/results/device_steps.sh
for PART_ in $(echo $PART | grep -o .); do
case $PART_ in
  d)
    server_vs_offline_x3
    # the method before session 25 on the same tree: each run opens its 128 connections inside the timed run
    step server_vs_offline_fresh_connections 200 python3 scripts/bench_server_vs_offline.py --repeats 3 \
      --server-timeout 120 --fresh-connections --output "$OUT/server_vs_offline_fresh_connections.json"
    ;;
  w) server_vs_offline_x3 ;;
  c)  # ~15 s: does the GPU start slow after idling? (clock_probe.py)
    step clock_probe 60 python3 ../final_project/results/session25/clock_probe.py "$OUT/clock_probe.json"
    ;;
  i)  # ~130 s: server vs offline twice with both sides idling 0.5 s before each timed run
    for n in 1 2; do
      step server_vs_offline_idle05_$n 200 python3 scripts/bench_server_vs_offline.py --repeats 3 \
        --server-timeout 120 --idle-before-run 0.5 --output "$OUT/server_vs_offline_idle05_$n.json"
    done
    ;;
  [tesp]) bash final_project/results/session24/run.sh "$FINAL" "$PART_" ;;
  *) echo "unknown part $PART_"; exit 2 ;;
esac
done
