#!/usr/bin/env bash
# Set up leanconv on this machine: a Python venv with torch + torchvision (CPU or CUDA build,
# whatever pip resolves for torch==2.14.1), the package in editable mode with its dev extras,
# and the embedded Fashion-MNIST data (Debian's dataset-fashion-mnist).
# The venv lives in $LEANCONV_VENV (default ~/.cache/leanconv/venv) so that clones share it;
# ./.venv links to it. Safe to re-run: finished steps are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${LEANCONV_VENV:-$HOME/.cache/leanconv/venv}"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating venv at $VENV"
  mkdir -p "$(dirname "$VENV")"
  "$PY" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import torch, torchvision" >/dev/null 2>&1; then
  echo "[setup] installing torch 2.14.1 + torchvision 0.29.1 (several minutes the first time)"
  "$VENV/bin/pip" install -q torch==2.14.1 torchvision==0.29.1
fi
echo "[setup] installing leanconv (editable, dev extras)"
"$VENV/bin/pip" install -q -e ".[dev]"
ln -sfn "$VENV" .venv

FMNIST=/usr/share/datasets/fashion-mnist
if [ ! -f "$FMNIST/train-images-idx3-ubyte.gz" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[setup] installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
    apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null
  else
    echo "[setup] Fashion-MNIST not found at $FMNIST: run 'sudo apt-get install dataset-fashion-mnist'" \
         "or pass --data-dir to a folder with the four IDX files" >&2
  fi
fi
echo "[setup] done: $(.venv/bin/python -c 'import torch, leanconv; print("torch", torch.__version__, "| leanconv", leanconv.__version__)')"
