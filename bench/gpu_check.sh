#!/usr/bin/env bash
# One prepared GPU check, for a machine with a CUDA device and NO network (see README):
# builds kvsched, runs the cuda tests and the whole suite, then kvsched-bench on the cuda backend.
# Everything lands in $OUT (default ./out): logs, JSON, PNG. Each step has its own timeout so one
# hang cannot eat the budget; the script goes on after a failed step and reports all of them.
#
#   OUT=/tmp/out bash bench/gpu_check.sh
# Optional: WHEELS=dir with wheels of the pure-Python extras (rich, pytest, pytest-timeout,
# hypothesis, matplotlib) when the image lacks them.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-./out}
mkdir -p "$OUT"
status=0
step() {  # step NAME TIMEOUT CMD...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc in $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
  [[ $rc -eq 0 ]] || status=1
  return 0
}
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
  python -c "import sys; print(sys.version)"
} >"$OUT/machine.txt"

if [[ -n "${WHEELS:-}" && -d "$WHEELS" ]]; then
  step wheels 120 python -m pip install --no-index --find-links "$WHEELS" rich pytest pytest-timeout hypothesis matplotlib
fi
step build 300 python -m pip install --no-build-isolation --no-deps -v .
step cuda_tests 240 python -m pytest tests/transfer -q -rs -p no:cacheprovider --junitxml="$OUT/cuda_tests.xml"
step all_tests 300 python -m pytest tests -q -rs -x -p no:cacheprovider --ignore=tests/transfer
step bench_cuda 240 python -m kvsched.bench --backend cuda --json "$OUT/bench_cuda.json" --plot "$OUT/bench_cuda.png"
step bench_host 120 python -m kvsched.bench --quick --backend host --json "$OUT/bench_host_quick.json"
cat "$OUT/summary.txt"
exit $status
