#!/usr/bin/env bash
# Run here (the CPU machine, after ./scripts/setup.sh) before a session with a lent GPU: writes .gpu/ (git-ignored),
# what benchmarks/gpu_check.sh needs there and the machine lacks. Its image has Python 3.12 with PyTorch, Triton,
# numba, transformers, hypothesis, matplotlib, numpy and pybind11, reaches no package index, and a call carries at
# most 64 MiB, so neither embedded model travels (gpu_check.sh skips Gemma 3 there). .gpu/ holds:
#   faiss-cpu's wheel for Python 3.12 (~19 MB), hnswlib's source (built there against that numpy and pybind11),
#   and the default model's tokenizer (the random-weight timing models make their prompts with it).
# Then, with the device tool, one call per part (a call may run 10 minutes), carry [".gpu"]:
#   python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .gpu/*.whl \
#     .gpu/hnswlib-*.tar.gz && PYTHONPATH=/tmp/site:$PWD PYTHON=python3 TOKENIZER=.gpu/tokenizer \
#     bash benchmarks/gpu_check.sh tests        # then the same with `bench`
# The machine's own transformers is used (5.17 there by the device notes, 5.25 here; icecache asks for >=5,<6):
# if its cache API differs, carry transformers' wheel too (it then needs huggingface-hub >= 2.4 and kernels).
set -euo pipefail
PY=${PYTHON:-.venv/bin/python}
rm -rf .gpu && mkdir -p .gpu
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .gpu "faiss-cpu>=1.8"
# hnswlib ships as source only; pip reads its metadata by running its build, which needs pybind11 and numpy
builder=$(mktemp -d)
python3 -m venv "$builder"
"$builder/bin/pip" install -q pybind11 numpy setuptools wheel
"$builder/bin/pip" download -q --no-deps --no-binary=:all: --no-build-isolation -d .gpu "hnswlib>=0.8"
rm -rf "$builder"
"$PY" -c "from icecache.models import load_tokenizer; load_tokenizer().save_pretrained('.gpu/tokenizer')"
du -sh .gpu
