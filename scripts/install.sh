#!/usr/bin/env bash
# Idempotent install of everything the project needs into ./.venv (see README "Install").
#   - Debian's dataset-fashion-mnist (real demo data) when apt is usable as root; skipped with a message otherwise
#   - torch/torchvision (PyPI standard builds) + the package with its extras, pinned by requirements/constraints.txt
#   - detectron2: official source install where reachable, else PyPI's redistribution sal-detectron2==0.7.2
# Re-running is a no-op while the inputs (this script, constraints, pyproject) are unchanged;
# `scripts/install.sh --check` only reports whether that is the case.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${MABN_VENV:-$ROOT/.venv}
PY=${PYTHON:-python3}
CONSTRAINTS=$ROOT/requirements/constraints.txt
D2_SOURCE=${MABN_D2_SOURCE:-auto}          # auto | official | pypi | skip
D2_OFFICIAL=https://github.com/facebookresearch/detectron2.git
D2_REDIST=sal-detectron2==0.7.2            # upstream commit a59f056, Apache-2.0, wheel tagged cp310
FMNIST_DIR=/usr/share/datasets/fashion-mnist

log() { printf '[install] %s\n' "$*"; }

stamp_key=$(cat "$0" "$CONSTRAINTS" pyproject.toml | sha256sum | cut -c1-16)
STAMP=$VENV/.mabn-installed-$stamp_key

install_fmnist() {
  if [ -f "$FMNIST_DIR/train-images-idx3-ubyte.gz" ] || [ -f "$FMNIST_DIR/train-images-idx3-ubyte" ]; then
    log "Fashion-MNIST present in $FMNIST_DIR"; return
  fi
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    log "SKIP Fashion-MNIST: needs root and apt-get (Debian package dataset-fashion-mnist)."
    log "     The tests do not need it; the demo does (or point data.root at the IDX files)."
    return
  fi
  log "apt-get install dataset-fashion-mnist"
  # another apt or dpkg (an unattended upgrade, a parallel job) may hold the locks: wait for them, up to 10 min
  local tries=0 out
  while ! out=$(apt-get -o DPkg::Lock::Timeout=600 update -qq 2>&1); do  # update ignores the lock timeout
    printf '%s\n' "$out" >&2
    grep -q "Could not get lock" <<<"$out" && (( ++tries < 60 )) || break
    sleep 10
  done
  if ! DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq dataset-fashion-mnist \
      >/dev/null; then
    log "SKIP Fashion-MNIST: apt-get failed (see above); the tests do not need it."
  fi
}

install_detectron2() {
  if "$VENV/bin/python" -c "import detectron2" 2>/dev/null; then log "detectron2 already installed"; return; fi
  case "$D2_SOURCE" in
    skip) log "SKIP detectron2 (MABN_D2_SOURCE=skip): the detectron2 tests will be skipped"; return ;;
    auto|official)
      if timeout 20 git ls-remote "$D2_OFFICIAL" HEAD >/dev/null 2>&1; then
        log "detectron2: official source install from $D2_OFFICIAL"
        "$VENV/bin/pip" install -c "$CONSTRAINTS" --no-build-isolation "git+$D2_OFFICIAL"
        return
      fi
      [ "$D2_SOURCE" = official ] && { log "ERROR: $D2_OFFICIAL unreachable and MABN_D2_SOURCE=official"; exit 1; }
      log "detectron2: official source unreachable; using the PyPI redistribution $D2_REDIST" ;;
    pypi) log "detectron2: PyPI redistribution $D2_REDIST" ;;
    *) log "ERROR: MABN_D2_SOURCE=$D2_SOURCE; valid: auto, official, pypi, skip"; exit 2 ;;
  esac
  # The wheel is tagged cp310 but is pure Python apart from _C (which does not load on 3.11 and is not
  # needed for Mask R-CNN). Retag it py3-none-any with `wheel tags` so pip (and `pip check`) accept it.
  local wdir=$ROOT/.cache/wheels
  mkdir -p "$wdir"
  "$VENV/bin/pip" download "$D2_REDIST" --python-version 3.10 --only-binary=:all: --no-deps -d "$wdir" -q
  # Its filename says cp310-none-any while its WHEEL file says cp310-cp310-linux_x86_64, which `wheel tags`
  # refuses; so unpack, set the WHEEL tag, and `wheel pack` (which rewrites RECORD and the filename).
  local src; src=$(ls "$wdir"/sal_detectron2-0.7.2-cp310-*.whl | head -1)
  rm -rf "$wdir/unpacked" && "$VENV/bin/wheel" unpack -d "$wdir/unpacked" "$src" >/dev/null
  sed -i 's/^Tag: .*/Tag: py3-none-any/' "$wdir"/unpacked/sal_detectron2-0.7.2/sal_detectron2-0.7.2.dist-info/WHEEL
  "$VENV/bin/wheel" pack -d "$wdir" "$wdir/unpacked/sal_detectron2-0.7.2" >/dev/null
  "$VENV/bin/pip" install -q -c "$CONSTRAINTS" "$wdir/sal_detectron2-0.7.2-py3-none-any.whl" fvcore "iopath<0.1.10"
}

if [ "${1:-}" = --check ]; then  # report only: 0 when an install with these inputs is in place
  if [ -f "$STAMP" ]; then log "up to date ($VENV)"; exit 0; fi
  log "not installed or out of date ($VENV)"; exit 1
fi
if [ -f "$STAMP" ]; then log "up to date ($VENV)"; exit 0; fi
start=$(date +%s)
install_fmnist
if [ ! -x "$VENV/bin/python" ]; then log "creating $VENV with $($PY --version)"; "$PY" -m venv "$VENV"; fi
log "pip install -e .[train,detection,dev] (torch/torchvision: PyPI standard builds, pinned)"
"$VENV/bin/pip" install -q -c "$CONSTRAINTS" -e ".[train,detection,dev]"
install_detectron2
"$VENV/bin/pip" check
rm -f "$VENV"/.mabn-installed-*
touch "$STAMP"
log "done in $(( $(date +%s) - start )) s; venv size $(du -sh "$VENV" | cut -f1)"
