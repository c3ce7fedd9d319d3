#!/usr/bin/env bash
# The device check, as one prepared run (for a session that is lent a GPU machine).
#
# The GPU image has torch 2.11, Triton 3.6, pytest, pytest-xdist, click, rich, networkx,
# filelock and matplotlib (device/KINDS.md lists them), but not lark or platformdirs, and reaches
# no registry. So, first, here:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl lark==1.3.1 platformdirs==4.14.7 fla-core==0.6.0 einops==0.8.2
# then, through the device tool:
#   run(command="bash benchmarks/gpu_check.sh all", carry=[".whl"], timeout_s=590)
# Stages: tests (tests/test_gpu.py: every example op natively, bf16, the layouts, triton_op
# under torch.compile), kernels, fusion, layouts, attention, recurrences (opforge bench
# groups), or all. Results land
# in $OUT (JSON, plots, logs); commit them under benchmarks/results/ with the device named.
set -uo pipefail
OUT=${OUT:-/tmp/opforge-gpu}
mkdir -p "$OUT" /tmp/opforge-pkg
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
ln -sfn "$PWD" /tmp/opforge-pkg/opforge        # the repository root is the package
export PYTHONPATH=/tmp/opforge-pkg:/tmp/site PYTHONUNBUFFERED=1 OPFORGE_CACHE_DIR=/tmp/opforge-cache
unset OPFORGE_INTERPRET TRITON_INTERPRET

{ nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/device.txt"

stage=${1:-all}
status=0
if [[ $stage == tests || $stage == all ]]; then
    timeout 200 python3 -m pytest -q -n 8 -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/tests.log" | tail -40
    status=$((status | ${PIPESTATUS[0]}))
fi
for group in layouts kernels fusion attention recurrences; do
    if [[ $stage == "$group" || $stage == all ]]; then
        timeout 240 python3 -m opforge.cli bench --only "$group" --out "$OUT/$group.json" --plot "$OUT/$group.png" \
            2>&1 | tee "$OUT/bench-$group.log" | tail -40
        status=$((status | ${PIPESTATUS[0]}))
    fi
done
exit $status
