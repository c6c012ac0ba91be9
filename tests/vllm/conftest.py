"""tests/vllm: kvsched's vLLM connector against vLLM's real scheduler (skipped without vLLM)."""

import os

# vLLM's CPU platform: without it the platform is "unspecified" (vLLM 0.33). vLLM 0.34 on x86
# refuses it without a CPU build of Triton, and its configs then pin the CPU device explicitly.
try:
    from importlib.metadata import version as _version

    _VLLM = tuple(int(x) for x in _version("vllm").split(".")[:2])
except Exception:  # noqa: BLE001
    _VLLM = (0, 0)  # not installed: test_connector.py skips with the reason
if _VLLM < (0, 34):
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# NIXL's meta-package picks its build (nixl-cu12 / nixl-cu13) from the CUDA stack already
# imported. vLLM imports cuda-python's CUDA 13 bindings even on a CPU machine, while the CPU
# test environment has the nixl-cu12 build (the one whose UCX starts without a driver): import
# NIXL first, so it takes the build that is installed (test_disagg.py; absent: it skips).
try:
    import nixl  # noqa: F401
except Exception:  # noqa: BLE001 - no NIXL: test_disagg.py skips with the reason
    pass
