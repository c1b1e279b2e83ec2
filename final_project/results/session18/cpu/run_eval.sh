#!/bin/bash
# CPU (this machine's 2 cores): the eval-fp32 row's command, 3 runs with the context shared (the default) and 3
# without (--no_share_context), alternated. Usage: bash final_project/results/session18/cpu/run_eval.sh
set -e
out=final_project/results/session18/cpu
nproc > $out/device_cpu.txt; python -c "import torch; print(torch.__version__)" >> $out/device_cpu.txt
git rev-parse --short HEAD >> $out/device_cpu.txt
for i in 1 2 3; do
  for share in shared alone; do
    flag=""; [ $share = alone ] && flag="--no_share_context"
    OMP_NUM_THREADS=2 python scripts/eval.py --task truthfulqa_mc2 --data fms/resources/eval/truthfulqa_mc.json \
      --mode both --dtype fp32 --device_type cpu --no_progress --timing_repeats 5 $flag \
      --output $out/eval_fp32_${share}_$i.json > $out/log_eval_fp32_${share}_$i.txt 2>&1
  done
done
python - <<'PY'
import json
for share in ("shared", "alone"):
    for i in (1, 2, 3):
        d = json.load(open(f"final_project/results/session18/cpu/eval_fp32_{share}_{i}.json"))["modes"]
        print(share, i, "paged/default latency %.3f" % (d["paged"]["latency_ms"] / d["default"]["latency_ms"]),
              "elapsed %.3f" % (d["paged"]["elapsed_s"] / d["default"]["elapsed_s"]),
              "tokens", d["default"]["input_tokens"], d["paged"]["input_tokens"])
PY
