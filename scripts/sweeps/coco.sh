#!/usr/bin/env bash
# results/coco_2x_scratch.md: the MABN paper's COCO table, Mask R-CNN R50-FPN from scratch, 2x schedule,
# 8 GPUs x 2 images: bn, brn, syncbn, mabn (and gn, the detectron2 baseline), one 8-GPU job per norm.
# data.root or COCO_ROOT must be set.
#   bash scripts/sweeps/coco.sh [extra overrides]
. "$(dirname "$0")/common.sh"
sweep train_coco.py experiment=coco_2x_scratch norm=bn,gn,brn,syncbn,mabn seed=0 "$@"
