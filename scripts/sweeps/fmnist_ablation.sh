#!/usr/bin/env bash
# results/fmnist_ablation.md: MABN's ablations under experiment=fmnist_ablation (the fmnist_cpu protocol:
# ResNet-8, 1250 iterations of device batch 32), three seeds per cell. At normalization batch 1 and 2: bn,
# mabn, and mabn with Ψ̄ of the current batch (backward_stat=batch), χ̄² of the current batch
# (forward_stat=batch), both, no weight centering, EMAs instead of SMAs (average=ema); at n = 32: bn, mabn,
# mabn without weight centering and with both statistics of the current batch. (At n = 32 the default window
# is 32 / n = 1, so "both batch" computes what mabn computes: a control, its seeds must match mabn's.)
# Then bn with centered filters (norm.weight_centering=true) at n = 32 and 2.
# 60 runs, about 1.6 h on two CPU cores with
#   LAUNCHER=joblib JOBS=2 bash scripts/sweeps/fmnist_ablation.sh      (two cells at a time, one thread each)
#   python scripts/make_tables.py --collect runs/ablation-fmnist-*
. "$(dirname "$0")/common.sh"
run=(train_imagenet.py experiment=fmnist_ablation logger=none)
sweep "${run[@]}" norm=bn,mabn batch=2,1,32 seed=0,1,2 "$@"
sweep "${run[@]}" norm=mabn norm.backward_stat=batch batch=2,1 seed=0,1,2 "$@"
sweep "${run[@]}" norm=mabn norm.forward_stat=batch batch=2,1 seed=0,1,2 "$@"
sweep "${run[@]}" norm=mabn norm.forward_stat=batch norm.backward_stat=batch batch=2,1,32 seed=0,1,2 "$@"
sweep "${run[@]}" norm=mabn norm.weight_centering=false batch=2,1,32 seed=0,1,2 "$@"
sweep "${run[@]}" norm=mabn norm.average=ema batch=2,1 seed=0,1,2 "$@"
# bn with MABN's centered filters: is the centering what makes mabn@32 beat bn@32?
sweep "${run[@]}" norm=bn norm.weight_centering=true batch=32,2 seed=0,1,2 "$@"
