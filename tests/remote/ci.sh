#!/usr/bin/env bash
# CI for the nixl backend: a test environment with NIXL and tests/remote in it with
# KVSCHED_REQUIRE_NIXL=1 (a missing NIXL fails, never skips). Called by .ci/run.
#
# The lean install: `nixl` (a meta-package) and `nixl-cu12` without their dependencies, then
# numpy. A plain `pip install nixl` pulls an unpinned torch, which on a machine with no torch is
# a CUDA build of several GB; NIXL's Python API imports torch only when given tensors, which
# kvsched never passes (it describes memory by address). nixl-cu12 is the build whose bundled
# UCX needs no CUDA driver to start here.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)
start=$(date +%s)
venv="$root/.venv-ci-nixl"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/pip" install -q --no-deps "nixl==${KVSCHED_NIXL_VERSION:-1.5.1}" "nixl-cu12==${KVSCHED_NIXL_VERSION:-1.5.1}"
# kvsched itself: the wheel tests/vllm/ci.sh built, else built here.
wheels="$root/build/ci-vllm-wheel"
if ! ls "$wheels"/kvsched-*.whl >/dev/null 2>&1; then
  wheels="$root/build/ci-nixl-wheel"
  rm -rf "$wheels"
  "$venv/bin/python" -m pip wheel -q --no-deps -w "$wheels" .
fi
"$venv/bin/pip" install -q "$(ls "$wheels"/kvsched-*.whl)[test]"
echo "NIXL test environment: $(( $(date +%s) - start )) s"
KVSCHED_REQUIRE_NIXL=1 UCX_TLS=tcp "$venv/bin/python" -m pytest -q -p no:cacheprovider -rs tests/remote
