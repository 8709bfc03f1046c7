#!/usr/bin/env bash
# results/imagenet_resnet50.md: the MABN paper's ImageNet table (ResNet-50, 8 GPUs x 32, 100 epochs):
# bn, gn, brn, mabn at normalization batch 1-32, one 8-GPU job per cell. data.root or IMAGENET_ROOT must be
# set.
#   bash scripts/sweeps/imagenet.sh [seed=0,1,2] [extra overrides]
. "$(dirname "$0")/common.sh"
sweep train_imagenet.py experiment=imagenet_resnet50 norm=bn,gn,brn,mabn batch=1,2,4,8,16,32 seed=0 "$@"
