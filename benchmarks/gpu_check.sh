#!/usr/bin/env bash
# Every GPU measurement, in two parts that each fit one device call (10 minutes at most):
#   bash benchmarks/gpu_check.sh tests   # the kernel and the runtime tested natively, host syncs listed
#   bash benchmarks/gpu_check.sh bench   # the kernel's bandwidth, decode latency on an 8B shape
#   bash benchmarks/gpu_check.sh         # both
# Needs an environment with icecache importable (./scripts/setup.sh, or PYTHON=... pointing at one; on a lent
# machine see benchmarks/gpu_prepare.sh). TOKENIZER=DIR makes the random-weight models prompt with that
# tokenizer folder instead of the embedded model's. Gemma 3 runs only where the model is installed.
# Writes JSON tables under benchmarks/gpu/ (or $OUT when set, e.g. on the device machine).
set -euo pipefail
PART=${1:-all}
PY=${PYTHON:-.venv/bin/python}
OUT_DIR=${OUT:-benchmarks/gpu}
TOK=()
if [ -n "${TOKENIZER:-}" ]; then TOK=(--tokenizer "$TOKENIZER"); fi
GEMMA=$("$PY" -c "from icecache.models import model_spec; print(int(model_spec('gemma3-270m').installed()))")
mkdir -p "$OUT_DIR"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT_DIR/device.txt"
if [ "$PART" = tests ] || [ "$PART" = all ]; then
  # 1) the kernel tests natively (same tests as the CPU interpreter runs), then the runtime on CUDA: a layer
  #    gives what it gives on the CPU, and its step waits for the GPU only where data must cross (every index)
  "$PY" -m pytest -q -p no:cacheprovider tests/test_kernel.py tests/test_cuda_syncs.py | tee "$OUT_DIR/test_kernel.txt"
  # 2) host synchronisations per decode step, by call site, full KV beside every index
  "$PY" -m icecache bench syncs --model random-smollm2-135m ${TOK[@]+"${TOK[@]}"} --context 4096 --steps 4 \
      --out "$OUT_DIR/syncs" | tee "$OUT_DIR/syncs.txt"
  # 3) the long model (Gemma 3 270M: hybrid local/global attention, 1 KV head, head_dim 256): its end-to-end tests
  if [ "$GEMMA" = 1 ]; then
    "$PY" -m pytest -q -p no:cacheprovider tests/test_gemma.py tests/test_hybrid.py | tee "$OUT_DIR/test_gemma.txt"
  else
    echo "gemma3-270m is not installed here: its tests skipped" | tee "$OUT_DIR/test_gemma.txt"
  fi
fi
if [ "$PART" = bench ] || [ "$PART" = all ]; then
  # 4) kernel vs SDPA over the same gathered tokens vs dense decode; bandwidth vs copy bandwidth
  "$PY" -m icecache bench kernel --out "$OUT_DIR" | tee "$OUT_DIR/kernel.txt"
  # 5) decode time per token vs context, full KV beside IceCache, Llama-8B shape with random weights
  "$PY" -m icecache bench latency --model random-llama-8b ${TOK[@]+"${TOK[@]}"} --dtype bfloat16 --contexts 4096 16384 32768 \
      --indexes tree exact --budget 256 --steps 8 --out "$OUT_DIR/llama8b" | tee "$OUT_DIR/latency_llama8b.txt"
  # 6) the same with layer reuse (prefetched follower pages)
  "$PY" -m icecache bench latency --model random-llama-8b ${TOK[@]+"${TOK[@]}"} --dtype bfloat16 --contexts 16384 32768 \
      --indexes tree --budget 256 --steps 8 --select-every 3 --out "$OUT_DIR/llama8b_reuse3" \
      | tee "$OUT_DIR/latency_llama8b_reuse3.txt"
  # 7) Gemma 3 decode latency at 8k and 32k with real weights
  if [ "$GEMMA" = 1 ]; then
    "$PY" -m icecache bench latency --model gemma3-270m --dtype bfloat16 --contexts 8192 32000 \
        --indexes tree exact --budget 256 --steps 8 --out "$OUT_DIR/gemma3" | tee "$OUT_DIR/latency_gemma3.txt"
  fi
fi
# Not here: the vLLM backend on CUDA. The device image has no vLLM, fetches nothing, and its CUDA wheel (vLLM
# 0.34.0: 227 MiB, torch==2.13.0) is over what a command may carry (64 MiB); see docs/vllm.md, "CUDA".
