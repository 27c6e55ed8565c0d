#!/usr/bin/env bash
# Create .venv (Python 3.11) with torch, torchvision, detectron2 and this package.
# Idempotent: re-running it only fills in what is missing.
set -euo pipefail

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3.11}
TORCH_VERSION=${TORCH_VERSION:-2.14.1}
TORCHVISION_VERSION=${TORCHVISION_VERSION:-0.29.1}
# Upstream detectron2, pinned (same commit as docker/Dockerfile).
DETECTRON2_REF=${DETECTRON2_REF:-e0ec4e189d438848521aee7926f9900e114229f5}
DETECTRON2_FALLBACK=${DETECTRON2_FALLBACK:-sal-detectron2==0.7.2}

if ! command -v "$PYTHON" >/dev/null 2>&1; then
  PYTHON=python3
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "[bootstrap] creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --quiet --disable-pip-version-check)

if ! "$PY" -c "import torch, torchvision" >/dev/null 2>&1; then
  echo "[bootstrap] installing torch==$TORCH_VERSION torchvision==$TORCHVISION_VERSION"
  "${PIP[@]}" "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
fi

# The project and its declared dependencies (detectron2's runtime deps are declared there too).
echo "[bootstrap] installing d2ops and its dependencies"
"${PIP[@]}" -e ".[dev]"

if ! "$PY" -c "import detectron2" >/dev/null 2>&1; then
  echo "[bootstrap] installing detectron2 from upstream git @ $DETECTRON2_REF"
  if ! timeout 900 "${PIP[@]}" --no-build-isolation \
      "detectron2 @ git+https://github.com/facebookresearch/detectron2.git@$DETECTRON2_REF" 2>/dev/null; then
    echo "[bootstrap] upstream git not reachable; falling back to the PyPI build $DETECTRON2_FALLBACK"
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    "$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
      --python-version 3.10 -d "$tmp" "$DETECTRON2_FALLBACK"
    "$PY" -m installer "$tmp"/*.whl
  fi
fi
"$PY" -c "import detectron2, torch; print('[bootstrap] ready: torch', torch.__version__, 'detectron2', detectron2.__version__)"
