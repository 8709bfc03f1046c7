#!/usr/bin/env bash
# results/fmnist.md: the Fashion-MNIST reproduction (experiment=fmnist, CIFAR-style ResNet-20, device
# batch 32): bn, gn, brn, mabn at normalization batch 1, 2, 4, 8, 32, three seeds = 60 one-GPU jobs.
#   bash scripts/sweeps/fmnist.sh [extra overrides]
#   then: python scripts/make_tables.py --collect runs/fmnist-*
. "$(dirname "$0")/common.sh"
sweep train_imagenet.py experiment=fmnist norm=bn,gn,brn,mabn batch=1,2,4,8,32 seed=0,1,2 "$@"
