#!/usr/bin/env bash
# One script for a lent GPU machine (no network there): install this checkout, run every
# GPU test, the ahead-of-time and interpreter suites' GPU-relevant parts, and the quick
# GPU benchmark; print a short table last. Budget: under 8 minutes on one H100.
#
# Optional comparison providers (Liger-Kernel, Cut Cross-Entropy) and, if the machine
# lacks them, test tools (pytest, hypothesis, ...) are installed from ./wheels/*.whl
# with --no-deps: copy the wheels there and name `wheels` in the device tool's carry.
set -uo pipefail
cd "$(dirname "$0")/.."
t0=$(date +%s)
out=${OUT:-bench/out}
mkdir -p "$out"

step() { printf '\n=== %s (%ss)\n' "$1" "$(( $(date +%s) - t0 ))"; }

step "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
for whl in wheels/*.whl; do
    [ -e "$whl" ] && python -m pip install -q --no-deps "$whl" 2>&1 | tail -n 1
done
python -m pip install -q -e . --no-deps --no-build-isolation 2>&1 | tail -n 2
python - <<'PY'
import torch, triton
print(f"torch {torch.__version__}  triton {triton.__version__}  cuda {torch.version.cuda}  "
      f"device {torch.cuda.get_device_name()}")
PY

python -c "import pytest, hypothesis" 2>/dev/null || echo "pytest/hypothesis missing: put their wheels in ./wheels (pytest, pluggy, iniconfig, hypothesis, sortedcontainers, attrs)"

step "GPU tests (marker gpu)"
python -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tail -n 25
gpu_tests=${PIPESTATUS[0]}

step "CPU suite sanity on this machine (validation, chunked, properties)"
python -m pytest -q -x tests/test_validation.py tests/loss/test_linear_cross_entropy.py -p no:cacheprovider 2>&1 | tail -n 3

step "quick GPU benchmark"
python -m bench loss --device cuda --quick --csv "$out/loss_cuda.csv" 2>&1 | tail -n 60
bench_rc=${PIPESTATUS[0]}

step "summary"
printf 'gpu tests exit %s | bench exit %s | %ss total\n' "$gpu_tests" "$bench_rc" "$(( $(date +%s) - t0 ))"
exit $(( gpu_tests != 0 || bench_rc != 0 ))
