#!/usr/bin/env bash
# The one-call GPU check (about 7 minutes expected, at most 15 by its timeouts). On a machine with one NVIDIA GPU that already has
# torch, cupy, numba and numba-cuda, and no network:
#   1. installs gpu-ann in place (no dependencies, no build isolation);
#   2. records `gpu-ann info` (backends, device, CUDA versions) and runs the gpu-marked tests;
#   3. runs compute-sanitizer memcheck on a kernel workload (skipped, and said so, where it is missing);
#   4. trains one epoch on the bundled anime data with --backend cuda;
#   5. runs the benchmarks at sizes that fill the chip (MyAnimeList-2020 scale, a 100k catalogue), every
#      training-step variant eagerly;
#   6. the compiled training-step variants at 100k items, with the eager ones at that size again;
#   7. the lazy Adam step variants at 100k items and RowAdam against torch.optim.SparseAdam;
#   8. trains on a synthetic 10^6-item catalogue (sparse path, sampled softmax, lazy Adam by --optimizer auto)
#      and times dense steps beside it;
# and writes logs, results.json and results.md under $OUT (default ./gpu-check-out), printing the
# summary and the results table last. Each stage runs even if an earlier one failed.
#
#   bash bench/gpu_check.sh            # from anywhere; it works in the repository root
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
summary="$OUT/summary.txt"
: >"$summary"
note() { echo "$*" | tee -a "$summary"; }
status=0

note "gpu-ann GPU check, $(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | sed 's/^/device: /' | tee -a "$summary"
python3 -c "import sys, torch, numba, cupy, numba_cuda; print('python', sys.version.split()[0], '| torch', torch.__version__, '| numba', numba.__version__, '| numba-cuda', numba_cuda.__version__, '| cupy', cupy.__version__)" 2>&1 | tee -a "$summary"

if ! pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1; then
  note "install FAILED:"; tail -n 20 "$OUT/install.log"; exit 1
fi

python3 -m gpu_ann info >"$OUT/info.txt" 2>&1
note "gpu-ann info (exit $?):"; sed -n '/^backends/,$p' "$OUT/info.txt" | sed 's/^/  /' | tee -a "$summary"

timeout 150 python3 -m pytest -m gpu -v -p no:cacheprovider >"$OUT/gpu-tests.log" 2>&1
rc=$?; [ $rc -eq 0 ] || status=1
note "gpu tests (exit $rc): $(tail -n 1 "$OUT/gpu-tests.log")"
grep -E "(PASSED|FAILED|ERROR|SKIPPED)" "$OUT/gpu-tests.log" | sed 's/^/  /' | tee -a "$summary"
if grep -q SKIPPED "$OUT/gpu-tests.log"; then
  status=1; note "  gpu tests were SKIPPED on a GPU machine: the cuda backend is not usable here (reason above)"
fi

sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)
if [ -n "$sanitizer" ]; then
  timeout 90 "$sanitizer" --tool memcheck --leak-check no --error-exitcode 9 python3 bench/sanitizer_workload.py >"$OUT/memcheck.log" 2>&1
  rc=$?; [ $rc -eq 0 ] || status=1
  note "compute-sanitizer memcheck (exit $rc): $(grep -E 'ERROR SUMMARY|sanitizer workload' "$OUT/memcheck.log" | tr '\n' ' ')"
else
  note "compute-sanitizer memcheck: SKIPPED (compute-sanitizer not found on this machine)"
fi

timeout 60 python3 -m gpu_ann train --backend cuda --out "$OUT/run" --max-epochs 1 >"$OUT/train.log" 2>&1
rc=$?; [ $rc -eq 0 ] || status=1
note "train --backend cuda, 1 epoch, bundled anime data (exit $rc):"
grep -E "^(done in|validation loss|popularity)" "$OUT/train.log" | sed 's/^/  /' | tee -a "$summary"
[ $rc -eq 0 ] || tail -n 3 "$OUT/train.log" | sed 's/^/  /' | tee -a "$summary"

# Every training-step variant (dense/sparse x full/sampled x fp32/bf16) eagerly here; the compiled ones
# below, in their own run, so that a slow compile cannot take these results with it.
timeout 200 python3 -m pytest bench/test_assembly.py bench/test_train_step.py -q -p no:cacheprovider \
  --backend cuda --scale mal2020 --batch-sizes 256,1024,4096,8192 \
  --train-items 17500,100000 --train-batch-sizes 1024,4096 --train-compiled none --train-optimizers adam \
  --benchmark-json "$OUT/benchmark.json" --results "$OUT" >"$OUT/bench.log" 2>&1
rc=$?; [ $rc -eq 0 ] || status=1
note "benchmarks (exit $rc): $(tail -n 1 "$OUT/bench.log")"

# torch.compile (dense+full and sparse+sampled, bf16) at 100k items, B = 4096, with the eager variants
# at that size measured again in the same run for the ratios. A compile that cannot run is a skip.
timeout 60 python3 -m pytest bench/test_train_step.py -q -p no:cacheprovider -rs \
  --backend cuda --train-items 100000 --train-batch-sizes 4096 \
  --results "$OUT/compiled" >"$OUT/bench-compiled.log" 2>&1
rc=$?; [ $rc -eq 0 ] || status=1
note "training step, compiled (exit $rc): $(tail -n 1 "$OUT/bench-compiled.log")"
grep -E "^SKIPPED" "$OUT/bench-compiled.log" | sed 's/^/  /' | tee -a "$summary"

# Lazy Adam on the device: the bf16 step variants at 100k items, B = 4096, with and without it (the baseline
# measured again in the same run), and RowAdam's step against torch.optim.SparseAdam on 10^6-row tables.
timeout 45 python3 -m pytest bench/test_train_step.py bench/test_optimizer_step.py -q -p no:cacheprovider \
  --backend cuda --train-items 100000 --train-batch-sizes 4096 --train-dtypes bf16 --train-compiled none \
  --results "$OUT/lazy" >"$OUT/bench-lazy.log" 2>&1
rc=$?; [ $rc -eq 0 ] || status=1
note "lazy Adam steps and RowAdam vs SparseAdam (exit $rc): $(tail -n 1 "$OUT/bench-lazy.log")"
grep -E "lazy-adam|row-adam|sparse-adam|SparseAdam" "$OUT/lazy/results.md" 2>/dev/null | sed 's/^/  /' | tee -a "$summary"

# 10^6 items, sparse path + sampled softmax, and 5 dense steps for comparison. The run directory (1.5 GB
# checkpoints) stays out of $OUT; only its JSON record is kept.
large="${TMPDIR:-/tmp}/gpu-ann-large-catalogue"
rm -f "$large/large_catalogue.json"
timeout 60 python3 bench/large_catalogue.py --backend cuda --batch-size 4096 --steps 200 --dense-steps 5 \
  --out "$large" >"$OUT/large-catalogue.log" 2>&1
rc=$?; [ $rc -eq 0 ] || status=1
cp "$large/large_catalogue.json" "$OUT/" 2>/dev/null
note "large catalogue, 10^6 items, --backend cuda (exit $rc):"
grep -E "^(synthetic|memory planner|  batch|  input|trained|validation loss|dense design)" "$OUT/large-catalogue.log" \
  | sed 's/^/  /' | tee -a "$summary"
[ $rc -eq 0 ] || tail -n 3 "$OUT/large-catalogue.log" | sed 's/^/  /' | tee -a "$summary"

echo
echo "==== summary ($OUT/summary.txt) ===="
cat "$summary"
echo
echo "==== results ($OUT/results.md) ===="
cat "$OUT/results.md" 2>/dev/null || { echo "(no results table: see bench.log)"; tail -n 30 "$OUT/bench.log"; }
echo
echo "==== compiled training steps ($OUT/compiled/results.md) ===="
cat "$OUT/compiled/results.md" 2>/dev/null || { echo "(no results table)"; tail -n 30 "$OUT/bench-compiled.log"; }
exit $status
