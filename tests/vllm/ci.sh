#!/usr/bin/env bash
# CI for the vLLM connector: for each tested vLLM version, a CPU test environment (torch's CPU
# build, vLLM without its dependencies, then vLLM's requirements minus the GPU-only ones), and
# tests/vllm in it with KVSCHED_REQUIRE_VLLM=1 (a missing vLLM fails, never skips; tests/offload
# runs in the main suite).
# Called by .ci/run; KVSCHED_VLLM_VERSIONS overrides the versions.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)
wheels="$root/build/ci-vllm-wheel"
rm -rf "$wheels"
python3 -m pip wheel -q --no-deps -w "$wheels" .   # kvsched built once for every environment
for version in ${KVSCHED_VLLM_VERSIONS:-0.33.0 0.34.0}; do
  start=$(date +%s)
  venv="$root/.venv-ci-vllm-$version"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/pip" install -q torch==2.13.0
  "$venv/bin/pip" install -q --no-deps "vllm==$version"
  "$venv/bin/python" tests/vllm/slim_requirements.py > "$venv/slim-requirements.txt"
  "$venv/bin/pip" install -q -r "$venv/slim-requirements.txt"
  "$venv/bin/pip" install -q "$(ls "$wheels"/kvsched-*.whl)[test]"
  echo "vLLM $version CPU test environment: $(( $(date +%s) - start )) s"
  KVSCHED_REQUIRE_VLLM=1 "$venv/bin/python" -m pytest -q -p no:cacheprovider -rs tests/vllm
done
