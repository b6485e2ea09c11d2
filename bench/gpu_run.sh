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
# The whole call fits a time budget (TOTAL_SECONDS, default 560: a time-limited machine's 600 s per
# command, less the copy of $OUT back). The tests get at most half of what the build leaves
# (TEST_SECONDS), the benchmark the rest (BENCH_SECONDS): on SIGTERM it keeps and writes what it
# measured, so a long size sweep still ends with a usable, partial JSON. Without bench arguments
# it runs the end-to-end steps (a quarter of the time left), then the suite at 64M and 256M
# parameters. Failing tests do not stop the benchmark; the exit status reports them.
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
left() { local s=$(( ${TOTAL_SECONDS:-560} - (SECONDS - start) )); echo $(( s > 60 ? s : 60 )); }
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

status=0
if has_stage test; then
  # The GPU-only checks first (host syncs, graph replay), then everything with the GPU visible:
  # every backend-parametrised test also runs the cuda and triton kernels on CUDA tensors.
  tests_end=$(( SECONDS + ${TEST_SECONDS:-$(( $(left) / 2 ))} ))
  until_end() { local s=$(( tests_end - SECONDS )); echo $(( s > 10 ? s : 10 )); }
  timeout -s TERM "$(until_end)" "$PY" -m pytest -q -p no:cacheprovider tests/backends/test_gpu.py \
    >"$OUT/tests_gpu.log" 2>&1 || status=1
  tail -3 "$OUT/tests_gpu.log"
  # test_triton_compile.py compiles the Triton kernels for GPUs without one: here they run.
  timeout -s TERM "$(until_end)" "$PY" -m pytest -q -p no:cacheprovider tests \
    --ignore=tests/backends/test_gpu.py --ignore=tests/backends/test_triton_compile.py \
    >"$OUT/tests.log" 2>&1 || status=1
  grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -30 || true
  tail -3 "$OUT/tests.log"
  log "tests $([ $status = 0 ] && echo passed || echo 'FAILED or cut off (see the logs)')"
fi

if has_stage bench; then
  name=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' /' '--')
  bench() {  # bench SECONDS JSON-NAME [flatfused bench arguments]
    local seconds=$1 json=$2
    shift 2
    timeout -s TERM "$seconds" "$PY" -m flatfused.cli bench --device cuda --no-progress \
      --output "$OUT/${json}_cuda_${name}.json" "$@" | tee "$OUT/${json}.log" | tail -45 || true
    log "bench written to $OUT/${json}_cuda_${name}.json"
  }
  if [ "$#" -gt 0 ]; then
    bench "${BENCH_SECONDS:-$(left)}" suite "$@"
  else
    # What one lease can hold: the end-to-end steps first (seconds on a GPU), then the optimizer
    # suite at the sizes the 80%-of-copy-bandwidth target is about, until the budget ends.
    bench "$(( $(left) / 4 ))" e2e --full --e2e
    bench "${BENCH_SECONDS:-$(left)}" suite --full --no-e2e --sizes 64M,256M
  fi
fi
exit $status
