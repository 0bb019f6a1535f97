#!/usr/bin/env bash
# Set up (or refresh) .venv with somelvlm and its test extras. Safe to run again: it only installs
# what is missing. torch is pinned to the pair that works with timm's torchvision import; set
# TORCH_SPEC to choose another build (e.g. TORCH_SPEC="torch==2.14.1" on a CUDA machine you manage).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  echo "installing $TORCH_SPEC"
  # shellcheck disable=SC2086
  "${pip[@]}" $TORCH_SPEC
fi
before=$(.venv/bin/python -c "import torch; print(torch.__version__)")
"${pip[@]}" -e ".[dev]" "torch==${before%%+*}"
after=$(.venv/bin/python -c "import torch; print(torch.__version__)")
if [ "$before" != "$after" ]; then
  echo "error: installing somelvlm replaced torch $before with $after" >&2
  exit 1
fi
echo "ready: .venv (torch $after)"
