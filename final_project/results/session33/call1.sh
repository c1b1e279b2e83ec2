#!/usr/bin/env bash
# Session 33's first device call (FINAL = $OUT): session 32's split-K parts k and S, this session's PDL probe (d),
# the PDL serving A/B (P) where the probe gained >= 1% at 2 rows with equal outputs, and on an H200 the batch-128
# decode-step profile (session31 part p). Each part packs its own FINAL/PART.tgz as it goes.
FINAL=${1:?final out dir}
nvidia-smi --query-gpu=name --format=csv,noheader
bash final_project/results/session32/run.sh "$FINAL" k
bash final_project/results/session33/run.sh "$FINAL" d
bash final_project/results/session32/run.sh "$FINAL" S
if python3 -c "
import json, sys; r = json.load(open('/tmp/raw_d/pdl_probe.json'))['rows']['2']
sys.exit(0 if r['outputs_bitwise_equal'] and r['over_off']['on'] < 0.99 else 1)"; then
  bash final_project/results/session33/run.sh "$FINAL" P
else echo "PDL probe: no gain at 2 rows (or outputs differ): part P skipped"; fi
if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
  timeout 120 bash final_project/results/session31/run.sh "$FINAL" p
fi
ls "$FINAL"
