#!/usr/bin/env bash
# The lent GPU machine runs torch 2.11 / triton 3.6, not this project's pins (torch 2.14.1 / triton 3.8).
# This checks, on a CPU, in a throwaway venv holding that torch and its triton, what gpu_check.sh relies on:
#   1. mabn.norms imports and its torch.library ops register;
#   2. the fused interpreter suite (tests/fused_cases.py, TRITON_INTERPRET=1) passes;
#   3. every kernel variant the layers launch compiles ahead of time for sm_80 and sm_90 without spills;
#   4. gpu_check.sh --dry-run passes.
#   bash scripts/check_gpu_pins.sh                  # TORCH=2.11.0 TRITON=3.6.0 VENV=/tmp/venv-gpu-pins
# About 5 GB of downloads (PyPI's torch is a CUDA build) and 10 minutes on two cores. Prints one PASS/FAIL line
# per step and exits non-zero if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
TORCH=${TORCH:-2.11.0}
TRITON=${TRITON:-3.6.0}
VENV=${VENV:-/tmp/venv-gpu-pins}
if [ ! -x "$VENV/bin/python" ]; then
  # numpy as this project pins it: triton 3.6's interpreter calls int() on one-element arrays, which numpy 2.4
  # refuses ("only 0-dimensional arrays can be converted"; triton 3.8 no longer does; compiled kernels never do)
  NUMPY=$(grep -E '^numpy==' requirements/constraints.txt)
  python3 -m venv "$VENV" && "$VENV/bin/pip" install -q "torch==$TORCH" "triton==$TRITON" "$NUMPY" pytest \
    pytest-timeout || { echo "FAIL install torch==$TORCH triton==$TRITON"; exit 2; }
fi
"$VENV/bin/pip" install -q "$(grep -E '^numpy==' requirements/constraints.txt)" >/dev/null
PY=$VENV/bin/python
export PYTHONPATH=$(pwd) OMP_NUM_THREADS=1
VARIANTS=$(mktemp --suffix .json)
declare -a RESULT
step() {  # step NAME COMMAND...
  local name=$1; shift
  local start=$SECONDS
  if "$@" > "/tmp/gpu-pins-$name.log" 2>&1; then RESULT+=("PASS $name ($((SECONDS - start)) s)")
  else RESULT+=("FAIL $name ($((SECONDS - start)) s): tail /tmp/gpu-pins-$name.log"); fi
}
step versions "$PY" -c "import torch, triton; print(torch.__version__, triton.__version__)
assert torch.__version__.startswith('$TORCH') and triton.__version__ == '$TRITON'"
step import "$PY" -c "import torch, mabn.norms
from mabn.norms import build_norm
for op in ('forward_state', 'update_ring_gz', 'normalize', 'renorm_state'):
    assert hasattr(torch.ops.mabn, op), op
x = torch.randn(4, 8, 5, 5, requires_grad=True)
for name in ('bn', 'brn', 'mabn', 'cbn', 'gn'):
    build_norm(name).ctor(8)(x).sum().backward()
print('ops and layers ok')"
step interpreter env TRITON_INTERPRET=1 "$PY" -m pytest -q -p no:cacheprovider tests/fused_cases.py
step capture env TRITON_INTERPRET=1 "$PY" -m mabn.norms._aot capture "$VARIANTS"
step compile "$PY" -m mabn.norms._aot compile "$VARIANTS" --arch 80 90
step gpu-check-dry-run env PYTHON="$PY" bash scripts/gpu_check.sh --dry-run
echo "torch $TORCH, triton $TRITON ($VENV):"
printf '  %s\n' "${RESULT[@]}"
for line in "${RESULT[@]}"; do [[ $line == PASS* ]] || exit 1; done
