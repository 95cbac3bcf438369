#!/usr/bin/env bash
# The one-call GPU check: on a machine with one NVIDIA GPU, torch, cupy, numba and numba-cuda already
# installed and no network. Installs gpu-ann in place, runs the gpu-marked tests, then a short training
# run on the bundled anime data with --backend cuda. Logs and a summary go to $OUT (default ./gpu-check-out);
# the summary is printed last.
#
#   bash bench/gpu_check.sh            # from the repository root
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
summary="$OUT/summary.txt"
: >"$summary"
note() { echo "$*" | tee -a "$summary"; }

note "gpu-ann GPU check, $(date -u +%Y-%m-%dT%H:%MZ)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | sed 's/^/device: /' | tee -a "$summary"
python3 -c "import torch, numba, cupy; print('torch', torch.__version__, '| numba', numba.__version__, '| cupy', cupy.__version__)" 2>&1 | tee -a "$summary"

pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { note "install FAILED (see install.log)"; cat "$OUT/install.log"; exit 1; }

python3 -m pytest -m gpu -v -p no:cacheprovider >"$OUT/gpu-tests.log" 2>&1
tests_rc=$?
note "gpu tests: $(tail -n 1 "$OUT/gpu-tests.log") (exit $tests_rc)"

timeout 300 python3 -m gpu_ann train --backend cuda --out "$OUT/run" --max-epochs 1 >"$OUT/train.log" 2>&1
train_rc=$?
note "train --backend cuda, 1 epoch on the bundled anime data (exit $train_rc):"
grep -E "^(done in|validation loss|popularity)" "$OUT/train.log" | sed 's/^/  /' | tee -a "$summary"

echo
echo "==== summary ($OUT/summary.txt) ===="
cat "$summary"
[ "$tests_rc" -eq 0 ] && [ "$train_rc" -eq 0 ]
