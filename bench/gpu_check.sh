#!/usr/bin/env bash
# GPU check: what the recipe costs on this GPU, and every CUDA code path run once; one
# Markdown report on stdout (and in $OUT/gpu_check.md when OUT is set). Under 8 minutes on
# one H100 / H200; exit status 1 when a functional check failed.
#   bash bench/gpu_check.sh            # on a GPU
#   bash bench/gpu_check.sh --smoke    # the same script on the CPU, tiny settings
# PYTHON picks the interpreter (default: python on PATH); the package is taken from this
# checkout's src/, as train.sh does.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHONPATH="$repo/src${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python}" "$repo/bench/gpu_check.py" "$@"
