#!/usr/bin/env bash
# One script for a lent GPU machine (no network there): install this checkout, run every
# GPU test, the ahead-of-time and interpreter suites' GPU-relevant parts, the quick GPU
# benchmarks (loss, sample, topk) and a 20-step trainer smoke run; print a summary line
# last. Budget: under 8 minutes on one H100; each sampling-side step has its own time
# limit so that a hung step still leaves a summary.
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

step "GPU tests (marker gpu), loss core"
# The sampling core's GPU tests (also marker gpu) run after the loss benchmark below.
python -m pytest -q -m gpu tests --ignore=tests/sampling/test_gpu_sampling.py -p no:cacheprovider 2>&1 | tail -n 25
gpu_tests=${PIPESTATUS[0]}

step "CPU suite sanity on this machine (validation, chunked, properties)"
python -m pytest -q -x tests/test_validation.py tests/loss/test_linear_cross_entropy.py -p no:cacheprovider 2>&1 | tail -n 3

step "quick GPU benchmark: loss"
python -m bench loss --device cuda --quick --csv "$out/loss_cuda.csv" 2>&1 | tail -n 60
bench_rc=${PIPESTATUS[0]}

step "GPU tests (marker gpu), sampling core"
# -s: the tests print the differing-draw counts and the temporary memory at B=64.
timeout 300 python -m pytest -q -s -m gpu tests/sampling/test_gpu_sampling.py -p no:cacheprovider \
    >"$out/sampling_tests.log" 2>&1
sampling_tests=$?
grep -E "temporary [0-9.]+ MiB" "$out/sampling_tests.log"
tail -n 25 "$out/sampling_tests.log"

step "quick GPU benchmark: sample"
timeout 180 python -m bench sample --device cuda --quick --csv "$out/sample_cuda.csv" >"$out/sample_bench.log" 2>&1
sample_rc=$?
grep -vE '^sample: .* \.\.\.$' "$out/sample_bench.log" | tail -n 30

step "quick GPU benchmark: topk"
timeout 180 python -m bench topk --device cuda --quick --csv "$out/topk_cuda.csv" >"$out/topk_bench.log" 2>&1
topk_rc=$?
grep -vE '^topk: .* \.\.\.$' "$out/topk_bench.log" | tail -n 25
targets=$(cat "$out/sample_bench.log" "$out/topk_bench.log" | grep -cE '^PASS ')
misses=$(cat "$out/sample_bench.log" "$out/topk_bench.log" | grep -cE '^FAIL ')

step "trainer smoke (20 steps on cuda)"
python -c "import transformers, matplotlib" 2>/dev/null \
    || echo "transformers or matplotlib missing: the trainer needs both (curves.png)"
timeout 240 python -m distil train --device cuda --steps 20 --warmup-steps 20 --eval-every 10 \
    --out "$out/trainer" --no-progress 2>&1 | tail -n 12
trainer_rc=${PIPESTATUS[0]}

step "summary"
printf 'loss gpu tests exit %s | loss bench exit %s | sampling gpu tests exit %s | sample bench exit %s | ' \
    "$gpu_tests" "$bench_rc" "$sampling_tests" "$sample_rc"
printf 'topk bench exit %s | targets %s PASS %s FAIL | trainer exit %s | %ss total (124: timed out)\n' \
    "$topk_rc" "$targets" "$misses" "$trainer_rc" "$(( $(date +%s) - t0 ))"
exit $(( gpu_tests != 0 || bench_rc != 0 || sampling_tests != 0 || sample_rc != 0 || topk_rc != 0 \
         || trainer_rc != 0 ))
