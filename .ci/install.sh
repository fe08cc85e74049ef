#!/usr/bin/env bash
# Create .venv with everything the project needs. CPU machines get the local CPU build of torch
# (an unpinned torch would pull a multi-GB CUDA build). `--browser` also installs Debian's Chromium.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then pip install -q "torch>=2.4"; else pip install -q torch==2.13.0; fi
fi
pip install -q -e ".[toy,notebooks,test]"
python -m ipykernel install --sys-prefix --name l2p --display-name "Python (l2p)" >/dev/null
if [ "${1:-}" = "--browser" ]; then
  if ! command -v chromium >/dev/null 2>&1; then
    (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "chromium could not be installed; browser test will skip"
  fi
fi
