#!/usr/bin/env bash
# The distributed tests (tests/test_distributed.py) with NCCL on GPUs, one rank per GPU, for
# whoever has several: the 2-rank cases need 2 GPUs, the 2x2-mesh and 4-rank cases 4. On the CPU
# the same tests run with gloo in `make test`. Not yet run: no machine lent to this project has
# had more than one GPU.
#   benchmarks/dist_nccl.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
n=$($PY -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
if [ "$n" -lt 2 ]; then
    echo "dist_nccl.sh: needs at least 2 CUDA GPUs, found $n" >&2
    exit 2
fi
select=()
if [ "$n" -lt 4 ]; then
    select=(-k "not mesh and not world4 and not four_ranks")
    echo "dist_nccl.sh: $n GPUs: the 4-rank cases are left out" >&2
fi
OPFORGE_DIST_BACKEND=nccl exec $PY -m pytest -q -p no:xdist tests/test_distributed.py "${select[@]}" "$@"
