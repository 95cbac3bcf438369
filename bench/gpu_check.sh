#!/usr/bin/env bash
# The one-call GPU check: `bash bench/gpu_check.sh` on a machine with one NVIDIA GPU that already has torch,
# cupy, numba and numba-cuda, and no network. bench/gpu_check.py does the work (its docstring and
# bench/README.md say what it runs, in what budget, and what it leaves in $OUT); this name stays the
# documented entry point. Arguments pass through: --only STAGE,... --budget SECONDS --rehearse --out DIR.
# PYTHON names the interpreter (default python3, the one that holds torch on the GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" bench/gpu_check.py "$@"
