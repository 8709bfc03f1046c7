#!/usr/bin/env bash
# results/fmnist.md: the full-length Fashion-MNIST reproduction (experiment=fmnist: CIFAR-style ResNet-20, all
# 60k training images, 3 epochs at device batch 32): bn, brn, mabn at normalization batch n = 1, 2, 32 and gn at
# n = 2 (the paper's comparison), then the later norms at n = 2 (a batch-free norm computes the same thing at
# every n); three seeds. 16 cells a seed, one seed after another, so that a sweep cut short leaves every row
# with a run rather than some rows with three: 48 runs, ~10-15 min each on one CPU thread (a day on two cores
# with two cells at a time; minutes each on a GPU):
#   LAUNCHER=joblib JOBS=2 bash scripts/sweeps/fmnist.sh       (here, two cells at a time, one thread each)
#   bash scripts/sweeps/fmnist.sh                              (SLURM: one one-GPU job per cell)
#   python scripts/make_tables.py --collect runs/fmnist-cifar_resnet20-*
# A finished cell is not trained again (its run directory says so), and a cell already recorded in
# results/records/fmnist/ (a run of an earlier session or machine) is left out, so rerunning the script resumes
# the sweep. RECORDS=<dir> reads the recorded cells from elsewhere (RECORDS=none: none are left out).
. "$(dirname "$0")/common.sh"
RECORDS=${RECORDS:-results/records/fmnist}

RUN=fmnist-cifar_resnet20  # the run directories' prefix (configs/train_imagenet.yaml run.name)

for seed in ${SEEDS:-0 1 2}; do
  # one multirun for the batches left with the same norms (all of them, in a fresh sweep: 9 cells at once)
  declare -A batches=()
  order=()
  for n in 2 32 1; do
    norms=$(remaining "$RUN" "$seed" "$n" bn mabn brn)
    [ -n "$norms" ] || continue
    [ -n "${batches[$norms]:-}" ] || order+=("$norms")
    batches[$norms]=${batches[$norms]:+${batches[$norms]},}$n
  done
  for norms in "${order[@]}"; do
    sweep train_imagenet.py experiment=fmnist logger=none norm="$norms" batch="${batches[$norms]}" seed="$seed" "$@"
  done
  unset batches
  # gn, then the later norms (MABN's paper does not report them; results/fmnist.md shows them as rows of our
  # own); cbn last: its Taylor compensation costs two conv weight-gradients per normalization batch
  norms=$(remaining "$RUN" "$seed" 2 gn gnws evonorm_s0 frn ln in cbn)
  [ -z "$norms" ] || sweep train_imagenet.py experiment=fmnist logger=none norm="$norms" batch=2 seed="$seed" "$@"
done
