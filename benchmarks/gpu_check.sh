#!/usr/bin/env bash
# The prepared GPU check (benchmarks/gpu_check.py) with the python3 found on the machine:
#   bash benchmarks/gpu_check.sh [--out DIR] [options]      (PYTHON=... picks another interpreter)
set -euo pipefail
py="${PYTHON:-python3}"
exec "$py" "$(dirname "$0")/gpu_check.py" --python "$py" "$@"
