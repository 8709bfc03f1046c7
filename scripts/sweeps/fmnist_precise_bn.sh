#!/usr/bin/env bash
# results/fmnist_precise_bn.md: Wu & Johnson's treatments of the inference statistics on the CPU protocol.
# experiment=fmnist_precise_bn evaluates each run four ways at its end (EMA, PreciseBN at B = n, 10, 100, N,
# mini-batch statistics); experiment=fmnist_frozen_bn trains with the norms frozen for the last 20 %.
# bn at n = 1, 2, 4, 8, 16, 32; mabn and brn at n = 2 and 32; three seeds; the n = 2 and 32 cells first:
# 30 + 18 runs, about 3.5 min each on one core, with
#   LAUNCHER=joblib JOBS=2 bash scripts/sweeps/fmnist_precise_bn.sh
#   python scripts/make_tables.py --collect runs/fmnist_precise_bn-* runs/fmnist_frozen_bn-* --table fmnist_precise_bn
. "$(dirname "$0")/common.sh"
common=(logger=none seed=0,1,2)
sweep train_imagenet.py experiment=fmnist_precise_bn norm=bn,mabn,brn batch=2,32 "${common[@]}" "$@"
sweep train_imagenet.py experiment=fmnist_frozen_bn norm=bn batch=2,32 "${common[@]}" "$@"
sweep train_imagenet.py experiment=fmnist_precise_bn norm=bn batch=1,4,8,16 "${common[@]}" "$@"
sweep train_imagenet.py experiment=fmnist_frozen_bn norm=bn batch=1,4,8,16 "${common[@]}" "$@"
