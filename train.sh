#!/usr/bin/env bash
# Train folds of an experiment:
#   bash train.sh [config=configs/X.yaml] [fold=0|0..4|0,2|full|all] [key=value ...]
# Every key of configs/default.yaml can be overridden as key=value; relative paths are taken
# from the current folder. PYTHON picks the interpreter (default: python on PATH). The package
# is taken from this checkout's src/ whether or not it is installed.
set -euo pipefail
repo="$(cd "$(dirname "$0")" && pwd)"
export PYTHONPATH="$repo/src${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python}" -m jaguar_reid.train "$@"
