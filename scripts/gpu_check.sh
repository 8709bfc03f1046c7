#!/usr/bin/env bash
# The prepared GPU check: on one CUDA machine (an H100/H200: ~8 minutes), in ONE call,
#   1. install the carried wheels (.whl/, made by scripts/gpu_wheels.sh) into /tmp/site, no network;
#   2. every GPU-marked test (pytest -m gpu): no host sync + bf16/fp16 autocast + channels_last for every
#      registered norm, fused == torch path, compiled == eager, CUDA graph == eager, one NCCL process;
#   3. the three benchmarks, sized to fit -> results/performance/{layer,model,inference}.json;
#   4. results/performance.md regenerated from the records; one summary printed.
# Needs only Python 3.12 with torch (and the usual scientific packages) on that machine. Each step has its
# own time limit, and a failed step does not stop the later ones. With OUT set (the device tool), the records,
# the page, the log and the test report are copied there too.
#   bash scripts/gpu_check.sh             # run it
#   bash scripts/gpu_check.sh --dry-run   # list the steps (any machine)
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
SITE=${MABN_GPU_SITE:-/tmp/site}
RECORDS=results/performance
LOG=$RECORDS/gpu_check.log
REPORT=$RECORDS/gpu_tests.xml
DRY=0
[ "${1:-}" = --dry-run ] && DRY=1

PIP="$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE"
PYTEST="$PY -m pytest -m gpu -p no:cacheprovider -n 4 --timeout=140 -q -rfEs --junitxml=$REPORT"
GPU_TEST_FILES="\$(grep -l 'mark.gpu' tests/test_*.py)"  # only these are collected: no detectron2 needed
# bf16 + channels_last, device batch 32, n = 2 and 32: each ResNet-50 norm shape and the whole train step on the
# fused path, the torch path, compiled, and nn.BatchNorm2d (torch-bn; bn at the whole batch), beside a copy of
# each activation (the bandwidth the floor is judged against, measured in the same run)
PATHS="bn,bn[fused],bn[torch],mabn[fused],mabn[torch],mabn[compiled],brn[fused],brn[torch],gn"
STEPS=(  # name|time limit (s)|command; the limits add up to 450 s: the check ends within 8 minutes
  "wheels|20|$PIP .whl/*.whl"
  "gpu-tests|150|$PYTEST $GPU_TEST_FILES"
  "bench-layer|90|$PY scripts/bench_layer.py --device cuda --variants fused,torch,compiled --repeats 20 --warmup 5"
  "bench-model|160|$PY scripts/bench_model.py --device cuda --batches 32 --norms '$PATHS' --repeats 10 --warmup 3"
  "bench-inference|20|$PY scripts/bench_inference.py --device cuda --repeats 20 --warmup 5"
  "performance-page|10|$PY scripts/make_performance.py"
)

if [ $DRY = 1 ]; then
  echo "gpu_check steps (each under its time limit; PYTHONPATH=$SITE:<repo>):"
  for step in "${STEPS[@]}"; do
    IFS='|' read -r name limit cmd <<<"$step"
    printf '  %-17s %4ss  %s\n' "$name" "$limit" "$cmd"
  done
  echo "then: the summary (each step's status and time, the targets of results/performance.md);"
  echo "      with OUT set, the records, the page, the log and the test report are copied to \$OUT"
  exit 0
fi

export PYTHONPATH=$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 WANDB_MODE=disabled
if ! ls .whl/*.whl >/dev/null 2>&1; then
  echo "[gpu-check] no wheels in .whl/: run 'bash scripts/gpu_wheels.sh' where pip works, and carry .whl"
  exit 2
fi
$PY - <<'PY' || { echo "[gpu-check] no CUDA device visible to torch: nothing to check here"; exit 2; }
import sys, torch
print(f"[gpu-check] python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}")
assert torch.cuda.is_available()
print(f"[gpu-check] device {torch.cuda.get_device_name(0)}")
PY

mkdir -p "$RECORDS"
exec > >(tee "$LOG") 2>&1

declare -A STATUS TIME
for step in "${STEPS[@]}"; do
  IFS='|' read -r name limit cmd <<<"$step"
  echo "[gpu-check] == $name (limit ${limit}s): $cmd"
  start=$SECONDS
  timeout --signal=TERM --kill-after=10 "$limit" bash -c "$cmd"
  code=$?
  TIME[$name]=$((SECONDS - start))
  case $code in
    0) STATUS[$name]=ok ;;
    124|137) STATUS[$name]="TIMED OUT" ;;
    *) STATUS[$name]="FAILED ($code)" ;;
  esac
done

echo
echo "[gpu-check] ===== summary ====="
failed=0
for step in "${STEPS[@]}"; do
  IFS='|' read -r name _ _ <<<"$step"
  printf '  %-17s %-12s %4ss\n' "$name" "${STATUS[$name]}" "${TIME[$name]}"
  [ "${STATUS[$name]}" = ok ] || failed=1
done
grep -E '^[0-9]+ (passed|failed|error|skipped|deselected)|no tests ran' "$LOG" | tail -1 |
  sed 's/^/  tests: /'
echo "  targets (results/performance.md):"
sed -n '/^## Targets/,/^## Layer/p' results/performance.md | grep '^| ' | tail -n +2 |
  awk -F'|' '{gsub(/^ +| +$/, "", $2); gsub(/^ +| +$/, "", $4); printf "    [%s] %s\n", $4, $2}'
if [ -n "${OUT:-}" ]; then
  cp $RECORDS/{layer,model,inference}.json results/performance.md "$LOG" "$OUT"/ 2>/dev/null
  cp "$REPORT" "$OUT"/ 2>/dev/null
  echo "  copied records, page, log and test report to \$OUT"
fi
exit $failed
