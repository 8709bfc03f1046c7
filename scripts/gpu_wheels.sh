#!/usr/bin/env bash
# Fetch HERE (a machine with the package index) the wheels that scripts/gpu_check.sh installs on a bare CUDA
# machine (Python 3.12 + torch, no network): what train_imagenet.py and the test helpers import beyond that
# machine's packages. Into the ignored folder .whl/, which the device call carries. Versions: requirements/
# constraints.txt (the one place pins live).
#   bash scripts/gpu_wheels.sh          # idempotent; ~0.4 MB
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
DEST=.whl
# hydra-core, omegaconf: pure Python; antlr4-python3-runtime 4.9.3 (omegaconf's parser) ships as an sdist
# only, so it is built into a wheel here (pure Python too). PyYAML, packaging: already on that machine.
PURE=(hydra-core omegaconf)
SDIST=(antlr4-python3-runtime)

pin() {  # NAME -> NAME==VERSION from the constraints file
  local line; line=$(grep -i "^$1==" requirements/constraints.txt) || { echo "no pin for $1" >&2; exit 1; }
  echo "$line"
}

mkdir -p "$DEST"
for name in "${PURE[@]}"; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform any -d "$DEST" "$(pin "$name")"
done
for name in "${SDIST[@]}"; do
  "$PY" -m pip wheel -q --no-deps -w "$DEST" "$(pin "$name")"
done
echo "[gpu-wheels] $(ls "$DEST" | tr '\n' ' ')"
