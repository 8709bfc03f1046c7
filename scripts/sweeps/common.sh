# Sourced by the sweep scripts: cluster settings from the environment or a git-ignored local file, and a
# `sweep` function that prints the exact command it submits, then runs it (DRY_RUN=1: print only).
#   SLURM_PARTITION, SLURM_ACCOUNT   -> hydra.launcher.partition / account (configs/launcher/slurm.yaml)
#   SLURM_TIME_MIN                   -> launcher.timeout_min (per job; requeued at the limit)
#   LAUNCHER=local                   -> run the cells one after another here instead of submitting them
#   LAUNCHER=joblib JOBS=8           -> run 8 cells at a time here (small runs sharing one GPU); unless
#                                       OMP_NUM_THREADS is set, each cell gets CPUs / JOBS threads
#   scripts/sweeps/local.env         -> sourced first when present (git-ignored; see local.env.example)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
[ -f scripts/sweeps/local.env ] && . scripts/sweeps/local.env
PY=${PY:-.venv/bin/python}
LAUNCHER=${LAUNCHER:-slurm}

sweep() {  # sweep ENTRY_SCRIPT OVERRIDE... : one Hydra multirun, one job per cell
  local entry=$1; shift
  local cmd=("$PY" "$entry" -m "launcher=$LAUNCHER" "$@")
  if [ "$LAUNCHER" = joblib ]; then
    cmd+=("launcher.n_jobs=${JOBS:-4}")
    # cells share the CPUs: without this each would start one thread per core and they would thrash
    local cpus; cpus=$(getconf _NPROCESSORS_ONLN)
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cpus / ${JOBS:-4} > 0 ? cpus / ${JOBS:-4} : 1 ))}
  fi
  if [ "$LAUNCHER" = slurm ]; then
    [ -n "${SLURM_TIME_MIN:-}" ] && cmd+=("launcher.timeout_min=$SLURM_TIME_MIN")
    if [ -z "${SLURM_PARTITION:-}" ]; then
      echo "note: SLURM_PARTITION is not set; the cluster's default partition is used" >&2
    fi
  fi
  local env_shown="${SLURM_PARTITION:+SLURM_PARTITION=$SLURM_PARTITION }"
  env_shown+="${SLURM_ACCOUNT:+SLURM_ACCOUNT=$SLURM_ACCOUNT }"
  echo "+ $env_shown${cmd[*]}"
  [ "${DRY_RUN:-0}" = 1 ] && return 0
  SLURM_PARTITION=${SLURM_PARTITION:-} SLURM_ACCOUNT=${SLURM_ACCOUNT:-} "${cmd[@]}"
}

remaining() {  # remaining RUN SEED N NORM... : the norms whose cell RUN-<norm>-n<N>-b32-s<SEED> has no record in
  # $RECORDS yet (a run of an earlier session or machine), comma-separated; RECORDS=none: none are recorded
  local run=$1 seed=$2 n=$3 out=() norm; shift 3
  for norm in "$@"; do
    [ -f "$RECORDS/$run-$norm-n$n-b32-s$seed/summary.json" ] || out+=("$norm")
  done
  (IFS=,; echo "${out[*]}")
}
