#!/usr/bin/env bash
# One prepared GPU check, for a machine with a CUDA device and NO network (see README):
# builds kvsched, runs the cuda tests (the SM copy kernel's among them), the calibration of the
# copy paths (every path side by side: bench/cuda_calibrate.py), the transfer benchmark on the
# default, SM-forced and calibrated engines, the interference of each path with a concurrent GEMM
# (bench/copy_interference.py) and kvsched-bench on the cuda backend, then the rest of the suite.
# Everything lands in $OUT (default ./out): logs, JSON, PNG, summary.txt and gpu_check.json (rc
# and seconds of every step). See docs/gpu_copies.md for what the copy-path steps decide.
#
#   OUT=/tmp/out bash bench/gpu_check.sh
#
# Each step has its own timeout, and all steps share one budget (GPU_CHECK_BUDGET seconds,
# default 470, i.e. inside 8 minutes): a step gets at most what is left, and steps are
# skipped once it is spent, so one hang cannot eat the machine's time. The script goes on after a
# failed step and reports all of them; it exits 1 if any step failed or was skipped.
# Optional: WHEELS=dir with wheels of the pure-Python extras (rich, pytest, pytest-timeout,
# hypothesis, matplotlib) when the image lacks them; fetch them where there is network, e.g.
#   pip download -d build/wheels --only-binary=:all: --python-version 3.12 \
#     --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
#     rich pytest pytest-timeout hypothesis matplotlib && rm build/wheels/numpy-*
# (the image's own numpy stays) and carry build/wheels to the GPU machine.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-./out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
BUDGET=${GPU_CHECK_BUDGET:-470}
PY=${PYTHON:-python}
status=0
STEPS=()
: >"$OUT/summary.txt"

step() {  # step NAME TIMEOUT CMD...   (output in $OUT/NAME.log)
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - SECONDS))
  if ((left < 10)); then
    echo "$name: skipped (budget of ${BUDGET} s spent)" | tee -a "$OUT/summary.txt"
    STEPS+=("\"$name\": {\"rc\": null, \"seconds\": 0, \"skipped\": true}")
    status=1
    return 0
  fi
  ((limit > left)) && limit=$left
  echo "$name: running (timeout ${limit} s)" >&2
  local t0=$SECONDS
  timeout -k 5 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  local note=""
  ((rc == 124 || rc == 137)) && note=" (timed out)"
  echo "$name: rc=$rc in $((SECONDS - t0)) s$note" | tee -a "$OUT/summary.txt"
  tail -n 3 "$OUT/$name.log" | sed 's/^/    /' >&2
  STEPS+=("\"$name\": {\"rc\": $rc, \"seconds\": $((SECONDS - t0))}")
  [[ $rc -eq 0 ]] || status=1
  return 0
}

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.current,pcie.link.width.current \
    --format=csv,noheader 2>&1
  $PY -c "import sys; print(sys.version)"
  $PY -m pip list 2>/dev/null | grep -i -E "^(cuda|cupy|torch|numpy|pybind11|scikit.build|pytest|rich|hypothesis)" || true
  # kvsched's own GPU detection (pure Python, works before the build)
  PYTHONPATH=python $PY -c "from kvsched.transfer.cudart import cuda_available as c; print('kvsched cuda_available:', *c())" 2>&1 | tail -1
} >"$OUT/machine.txt" 2>&1

if [[ -n "${WHEELS:-}" && -d "$WHEELS" ]]; then
  step wheels 60 $PY -m pip install --no-index --find-links "$WHEELS" rich pytest pytest-timeout hypothesis matplotlib
fi
step build 150 $PY -m pip install --no-build-isolation --no-deps --no-index -v .
# From here on `kvsched` is the installed package (python/ is not on sys.path).
step import 20 bash -c "cd /tmp && $PY -c 'import kvsched, kvsched._core, kvsched._bench, kvsched.transfer.engine; print(kvsched.__file__)'"
step cuda_tests 120 $PY -m pytest tests/transfer -m gpu -v -rs -p no:cacheprovider --junitxml="$OUT/cuda_tests.xml"
# The copy paths side by side: writes cuda_calibrate.json (measurements, the derived calibration
# table, issue 12's aims) and cuda_calibrate.png. Grid sized to finish in about a minute on an H200.
step cuda_calibrate 100 $PY bench/cuda_calibrate.py --out "$OUT" --budget 70 \
  --blocks 4K,8K,16K,32K,64K,256K,2M --copies 64,1024,16384 --sm-ctas 4,12,32
# The offload worker (the vLLM connector's engine-independent part) on torch CUDA tensors with the
# cuda backend: gated stores, layerwise loads waited on by the stream, byte-exact (no vLLM needed).
step offload_gpu 120 $PY -m pytest -q -rs -p no:cacheprovider tests/offload/test_gpu_worker.py
step transfer_bench_cuda 75 $PY bench/transfer_bench.py --backend cuda --sizes 4K,8K,16K,32K,64K,256K,2M \
  --total 64M --repeats 5 --json "$OUT/transfer_bench_cuda.json"
# The same benchmark with every load and store on the SM kernel, then with the calibrated choice.
step transfer_bench_cuda_sm 40 $PY bench/transfer_bench.py --backend cuda --sm-copy force \
  --sizes 4K,8K,16K,32K,64K --directions h2d,d2h,both --total 64M --repeats 3 \
  --json "$OUT/transfer_bench_cuda_sm.json"
if [[ -f "$OUT/cuda_calibrate.json" ]]; then
  step transfer_bench_cuda_calibrated 40 $PY bench/transfer_bench.py --backend cuda --sm-copy auto \
    --calibration "$OUT/cuda_calibrate.json" --sizes 4K,16K,64K,2M --total 64M --repeats 3 \
    --json "$OUT/transfer_bench_cuda_calibrated.json"
fi
# The compute kernel's slowdown while each path copies (aim for the SM path: <= 5 %).
step copy_interference 60 $PY bench/copy_interference.py --out "$OUT" --paths dma,loop,sm-4,sm-12,sm-32 \
  --blocks 4K,64K --directions h2d,d2h --iters 10
step bench_cuda 90 $PY -m kvsched.bench --backend cuda --json "$OUT/bench_cuda.json" --plot "$OUT/bench_cuda.png"
step transfer_bench_cuda_nobatch 30 $PY bench/transfer_bench.py --backend cuda --batch off --sizes 4K,64K \
  --directions h2d,d2h --total 64M --repeats 2 --json "$OUT/transfer_bench_cuda_nobatch.json"
step bench_host 40 $PY -m kvsched.bench --quick --backend host --json "$OUT/bench_host_quick.json"
# Last: the CPU suite needs no GPU and can be rerun anywhere, so GPU steps go first.
step all_tests 150 $PY -m pytest tests -q -rs -p no:cacheprovider -m "not gpu and not slow" --junitxml="$OUT/all_tests.xml"

{
  echo "{"
  echo "  \"budget_s\": $BUDGET, \"elapsed_s\": $SECONDS, \"status\": $status,"
  echo "  \"steps\": {"
  for i in "${!STEPS[@]}"; do
    sep=","; ((i == ${#STEPS[@]} - 1)) && sep=""
    echo "    ${STEPS[$i]}$sep"
  done
  echo "  }"
  echo "}"
} >"$OUT/gpu_check.json"
cat "$OUT/summary.txt"
exit $status
