#!/usr/bin/env bash
# Set up initstudy in ./.venv from nothing but Python 3.11+ and pip.
# CPU torch by default. A GPU user installs a CUDA build first, e.g.
#   TORCH_SPEC="torch==2.13.0" PIP_INDEX_URL=<PyTorch's CUDA wheel index> bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
.venv/bin/python -m pip install -q "$TORCH_SPEC"
.venv/bin/python -m pip install -q -e '.[test]'
# The reference the muP tests compare with; --no-deps: it requires torchvision, whose wheels pin another torch.
.venv/bin/python -m pip install -q --no-deps mup==1.0.0
echo "initstudy is set up in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
