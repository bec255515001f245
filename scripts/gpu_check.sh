#!/usr/bin/env bash
# chiasm's training and generation speed on one CUDA GPU (H100/H200 class) in under 8 minutes:
# SigLIP-B/16-shaped tower + MLP bridge + SmolLM2-360M-shaped LM from random weights (no download),
# align and instruct steps with activation checkpointing off and on, then KV-cache generation.
# Usage: bash scripts/gpu_check.sh [OUT.json] [more benchmarks/gpu_check.py options, e.g. --lm qwen2-0.5b]
# Fails (exit status != 0) when CUDA is not available; it never falls back to the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
out=${1:-gpu_check.json}
shift || true
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
export HF_HUB_OFFLINE=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 480 "$PY" benchmarks/gpu_check.py --device cuda --out "$out" "$@"
