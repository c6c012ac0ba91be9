#!/usr/bin/env bash
# CI for the vLLM connector: a CPU test environment (torch's CPU build) and, for each tested vLLM
# version in turn, vLLM without its dependencies, then vLLM's requirements minus the GPU-only
# ones, then kvsched, and tests/vllm with KVSCHED_REQUIRE_VLLM=1 and KVSCHED_REQUIRE_NIXL=1 (a
# missing vLLM or NIXL fails, never skips; tests/offload runs in the main suite).
# Called by .ci/run; KVSCHED_VLLM_VERSIONS overrides the versions.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)
wheels="$root/build/ci-vllm-wheel"
rm -rf "$wheels"
python3 -m pip wheel -q --no-deps -w "$wheels" .   # kvsched built once for every environment
# One environment for every version: torch is installed once, then each version replaces the
# previous vLLM (pip installs only the requirements that changed), which saves about
# three minutes of CI per extra version against a fresh environment each.
venv="$root/.venv-ci-vllm"
start=$(date +%s)
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/pip" install -q torch==2.13.0
# NIXL for the disaggregated roles (tests/vllm/test_disagg.py), installed as tests/remote/ci.sh
# does: the meta-package and its cu12 build without their dependencies (no CUDA torch).
"$venv/bin/pip" install -q --no-deps "nixl==${KVSCHED_NIXL_VERSION:-1.5.1}" "nixl-cu12==${KVSCHED_NIXL_VERSION:-1.5.1}"
echo "CPU test environment (torch, NIXL): $(( $(date +%s) - start )) s"
for version in ${KVSCHED_VLLM_VERSIONS:-0.33.0 0.34.0}; do
  start=$(date +%s)
  "$venv/bin/pip" install -q --no-deps "vllm==$version"
  "$venv/bin/python" tests/vllm/slim_requirements.py > "$venv/slim-requirements.txt"
  "$venv/bin/pip" install -q -r "$venv/slim-requirements.txt"
  "$venv/bin/pip" install -q "$(ls "$wheels"/kvsched-*.whl)[test]"   # after vLLM's pins, as a user would
  "$venv/bin/python" -c "import vllm, sys; assert vllm.__version__ == sys.argv[1], vllm.__version__" "$version"
  echo "vLLM $version installed: $(( $(date +%s) - start )) s"
  KVSCHED_REQUIRE_VLLM=1 KVSCHED_REQUIRE_NIXL=1 UCX_TLS=tcp "$venv/bin/python" -m pytest -q -p no:cacheprovider -rs tests/vllm
done
