#!/usr/bin/env bash
# The diagnostics of results/diagnostics/ on Fashion-MNIST, on one CPU machine: short traced trainings
# (1000 iterations at device batch 32, one seed) of bn at n = 2, 8, 32, brn and mabn at n = 2 and 32, and
# XBNBlock (bn elsewhere) at n = 2; then the batch-statistics plot, estimation shift and PreciseBN.
#   bash scripts/fmnist_diagnostics.sh [extra overrides...]     (MABN_RUNS picks the run folder, default runs/)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RUNS=${MABN_RUNS:-runs}/diagnostics
OUT=${OUT:-results/diagnostics}
COMMON=(experiment=fmnist epochs=1 train.max_iters_per_epoch=1000 diag.batch_stats=true diag.every=50
        logger=none "$@")
cells=("bn 2 cifar_resnet20" "bn 8 cifar_resnet20" "bn 32 cifar_resnet20" "brn 2 cifar_resnet20"
       "mabn 2 cifar_resnet20" "mabn 32 cifar_resnet20" "bn 2 cifar_resnet20_xbn")
for cell in "${cells[@]}"; do
  read -r norm n model <<<"$cell"
  echo "+ $PY train_imagenet.py ${COMMON[*]} norm=$norm batch=$n model=$model"
  MABN_RUNS=$RUNS "$PY" train_imagenet.py "${COMMON[@]}" "norm=$norm" "batch=$n" "model=$model"
done
"$PY" scripts/plot_batch_stats.py "$RUNS"/fmnist-*/ --out "$OUT"
"$PY" scripts/estimation_shift.py "$RUNS"/fmnist-*/checkpoints/last.pt --batches 100 --out "$OUT"
for run in "$RUNS"/fmnist-*/; do
  "$PY" scripts/precise_bn.py "$run/checkpoints/last.pt" --batch n 128 --images 3200 --out "$OUT/precise_bn/$(basename "$run").json"
done
