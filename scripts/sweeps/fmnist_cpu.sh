#!/usr/bin/env bash
# results/fmnist_cpu.md: the Fashion-MNIST reproduction cut to a CPU budget (experiment=fmnist_cpu: ResNet-8,
# 1250 iterations of device batch 32): bn, gn, brn, mabn at normalization batch 1, 2, 4, 8, 32, three seeds.
# Three multiruns, ordered so that the cells the paper's claim rests on (n = 2 and 32) finish first:
#   LAUNCHER=joblib JOBS=2 bash scripts/sweeps/fmnist_cpu.sh      (two cells at a time, one thread each)
#   python scripts/make_tables.py --collect runs/fmnist-cifar_resnet8-*
. "$(dirname "$0")/common.sh"
for batches in 2,32 1 4,8; do
  sweep train_imagenet.py experiment=fmnist_cpu logger=none norm=bn,gn,brn,mabn batch=$batches seed=0,1,2 "$@"
done
