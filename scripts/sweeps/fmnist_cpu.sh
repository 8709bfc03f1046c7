#!/usr/bin/env bash
# results/fmnist_cpu.md: the Fashion-MNIST reproduction cut to a CPU budget (experiment=fmnist_cpu: ResNet-8,
# 1250 iterations of device batch 32): bn, gn, brn, mabn at normalization batch 1, 2, 4, 8, 32, three seeds,
# then the later norms: cbn at every n, the batch-free ln, in, gnws, evonorm_s0, frn at n = 2 and 32.
# Multiruns ordered so that the cells the paper's claim rests on (n = 2 and 32) finish first; a batch-free
# norm computes the same thing at every n (gn's n = 2 and n = 32 runs of a seed are identical), so it is run
# at those two only: 51 + 45 runs, about 1.5 h + 1.3 h on two CPU cores with
#   LAUNCHER=joblib JOBS=2 bash scripts/sweeps/fmnist_cpu.sh      (two cells at a time, one thread each)
#   python scripts/make_tables.py --collect runs/fmnist-cifar_resnet8-*
. "$(dirname "$0")/common.sh"
sweep train_imagenet.py experiment=fmnist_cpu logger=none norm=bn,gn,brn,mabn batch=2,32 seed=0,1,2 "$@"
for batches in 1 4,8; do
  sweep train_imagenet.py experiment=fmnist_cpu logger=none norm=bn,brn,mabn batch=$batches seed=0,1,2 "$@"
done
# the later norms (MABN's paper does not report them; results/fmnist_cpu.md shows them as rows of our own)
# (cbn last: its Taylor compensation costs two conv weight-gradients per normalization batch)
sweep train_imagenet.py experiment=fmnist_cpu logger=none norm=ln,in,gnws,evonorm_s0,frn batch=2,32 seed=0,1,2 "$@"
sweep train_imagenet.py experiment=fmnist_cpu logger=none norm=cbn batch=2,32,1,4,8 seed=0,1,2 "$@"
