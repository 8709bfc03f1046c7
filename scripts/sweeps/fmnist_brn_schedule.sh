#!/usr/bin/env bash
# results/fmnist_brn_schedule.md: is BRN's scaled r/d schedule why brn@2 trails bn@2 in fmnist_cpu?
# experiment=fmnist_brn_schedule (the fmnist_cpu protocol) at n = 2, three seeds: bn; brn as in fmnist_cpu;
# brn with r only (d_max=0); with d only (r_max=1); with neither (schedule_ref_iters=null: the unscaled
# 5k-step warm-up outlasts the 1250-step run, so it must equal bn seed by seed).
# 15 runs, about 40 min on two CPU cores with
#   LAUNCHER=joblib JOBS=2 bash scripts/sweeps/fmnist_brn_schedule.sh
#   python scripts/make_tables.py --collect runs/brn_schedule-*
. "$(dirname "$0")/common.sh"
run=(train_imagenet.py experiment=fmnist_brn_schedule logger=none batch=2)
sweep "${run[@]}" norm=bn,brn seed=0,1,2 "$@"
sweep "${run[@]}" norm=brn norm.d_max=0 seed=0,1,2 "$@"
sweep "${run[@]}" norm=brn norm.r_max=1 seed=0,1,2 "$@"
sweep "${run[@]}" norm=brn norm.schedule_ref_iters=null seed=0,1,2 "$@"
