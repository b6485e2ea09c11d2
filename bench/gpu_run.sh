#!/usr/bin/env bash
# Build, check and time flatfused on a GPU machine in one call (docs/benchmarks.md, "On a GPU").
#
#   bash bench/gpu_run.sh [STAGES] [-- FLATFUSED BENCH ARGS]
#
# STAGES: a comma-separated subset of build,test,bench (default: all three, in that order).
# Logs, the pytest summaries and the benchmark's JSON and plot go to $OUT (default
# bench/results/gpu_run); copy the JSON to bench/results/ under the GPU's name to record it.
# Nothing is installed from a registry: the machine's python (PYTHON, default python3) must
# already hold torch, triton, pytest and pytest-benchmark.
# The benchmark runs under a time limit (BENCH_SECONDS, default 480): on SIGTERM it keeps and
# writes what it measured, so a long size sweep still ends with a usable, partial JSON.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
PY=${PYTHON:-python3}
OUT=${OUT:-bench/results/gpu_run}
mkdir -p "$OUT"
stages=build,test,bench
if [ "$#" -gt 0 ] && [ "$1" != "--" ]; then stages=$1; shift; fi
if [ "${1:-}" = "--" ]; then shift; fi
log() { echo "gpu_run: $* (after $((SECONDS - start)) s)"; }
has_stage() { [[ ",$stages," == *",$1,"* ]]; }

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv \
  | tee "$OUT/nvidia-smi.csv"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

if has_stage build; then
  # TORCH_CUDA_ARCH_LIST unset: setup.py compiles for the visible GPU's architecture.
  export FLATFUSED_BUILD_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
  if ! "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . >"$OUT/build.log" 2>&1; then
    tail -40 "$OUT/build.log"
    exit 1
  fi
  log "built"
fi
"$PY" - <<'PY'
from flatfused import _extension, backends
assert _extension.load_error() is None, _extension.load_error()
assert _extension.has_cuda_kernels(), "the CUDA kernels were not built"
print("gpu_run: backends on cuda:", backends.available("cuda"))
PY

if has_stage test; then
  # The GPU-only checks first (host syncs, graph replay), then everything with the GPU visible:
  # every backend-parametrised test also runs the cuda and triton kernels on CUDA tensors.
  status=0
  "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py >"$OUT/tests_gpu.log" 2>&1 || status=1
  tail -3 "$OUT/tests_gpu.log"
  "$PY" -m pytest -q -p no:cacheprovider tests >"$OUT/tests.log" 2>&1 || status=1
  grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -30 || true
  tail -3 "$OUT/tests.log"
  log "tests $([ $status = 0 ] && echo passed || echo FAILED)"
  [ $status = 0 ] || exit 1
fi

if has_stage bench; then
  name=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' /' '--')
  timeout -s TERM "${BENCH_SECONDS:-480}" "$PY" -m flatfused.cli bench --device cuda --no-progress \
    --output "$OUT/suite_cuda_${name}.json" "$@" | tee "$OUT/bench.log" | tail -60 || true
  log "bench written to $OUT/suite_cuda_${name}.json"
fi
