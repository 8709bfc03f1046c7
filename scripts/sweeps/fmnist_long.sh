#!/usr/bin/env bash
# results/fmnist_long.md: has results/fmnist.md settled? experiment=fmnist_long is its protocol trained twice as
# long (6 epochs), for the cells the MABN paper's claims compare (bn, mabn, brn at n = 2, bn at n = 32) and mabn at
# n = 32 (is MABN's edge at the normal batch a short-training effect?); three seeds, one seed after another (a
# sweep cut short leaves each cell with a run to set beside its 3-epoch runs).
# 15 runs, ~25-30 min each on one CPU thread (minutes each on a GPU):
#   LAUNCHER=joblib JOBS=2 bash scripts/sweeps/fmnist_long.sh
#   python scripts/make_tables.py --collect runs/fmnist_long-*
# A cell recorded in results/records/fmnist_long/ is left out (RECORDS=<dir> reads them from elsewhere,
# RECORDS=none: none are left out), so rerunning the script resumes the sweep.
. "$(dirname "$0")/common.sh"
RECORDS=${RECORDS:-results/records/fmnist_long}
RUN=fmnist_long-fmnist-cifar_resnet20  # the run directories' prefix (configs/experiment/fmnist_long.yaml)

for seed in ${SEEDS:-0 1 2}; do
  norms=$(remaining "$RUN" "$seed" 2 bn mabn brn)
  [ -z "$norms" ] || sweep train_imagenet.py experiment=fmnist_long logger=none norm="$norms" batch=2 seed="$seed" "$@"
  norms=$(remaining "$RUN" "$seed" 32 bn mabn)
  [ -z "$norms" ] || sweep train_imagenet.py experiment=fmnist_long logger=none norm="$norms" batch=32 seed="$seed" "$@"
done
