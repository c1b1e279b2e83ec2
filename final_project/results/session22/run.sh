#!/usr/bin/env bash
# Session 22 device runs (session 21's try was lost). Usage: run.sh OUT d (carry .gpu .whl; .gpu from
# session20/run.sh build; PART d or p or dp). Part k was session20/run.sh's part k, run as it stands (results in k/).
#   part d (~350 s): issue 18's server vs offline with the compiled engine, twice. The wheels in .whl must
#     include fastapi's newer dependencies (opentelemetry-api, annotated-doc): the first try of part d
#     failed on that import (d_failed_import/). Build .whl with the resolver, not --no-deps:
#     pip download --python-version 3.12 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64
#       --platform manylinux_2_28_x86_64 --only-binary=:all: -d .whl fastapi "uvicorn[standard]" prometheus-client
#       openai httpx  (then drop pyyaml: the device has its own)
set -u
OUT=${1:?out dir}; PART=${2:?part}
source final_project/results/device_steps.sh
python3 -c "import fastapi, uvicorn, openai, prometheus_client; print('server imports ok')" || exit 1
for PART_ in $(echo $PART | grep -o .); do
case $PART_ in
  d)
    for n in 1 2; do
      step server_vs_offline_compiled_$n 200 python3 scripts/bench_server_vs_offline.py --repeats 3 \
        --server-timeout 120 --output "$OUT/server_vs_offline_compiled_$n.json"
    done
    ;;
  p)  # issue 19's fp32 eval row: kernels of one timed pass per mode, context shared and not
    step eval_profile_shared 90 python3 ../final_project/results/session22/eval_profile.py "$OUT/eval_profile_shared.json"
    step eval_profile_alone 90 python3 ../final_project/results/session22/eval_profile.py "$OUT/eval_profile_alone.json" \
      --no_share_context
    ;;
  *) echo "unknown part $PART"; exit 2 ;;
esac
done
