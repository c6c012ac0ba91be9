"""tests/vllm: kvsched's vLLM connector against vLLM's real scheduler (skipped without vLLM)."""

import os

import pytest

# vLLM's CPU platform: without it the platform is "unspecified" (vLLM 0.33). vLLM 0.34 on x86
# refuses it without a CPU build of Triton, and its configs then pin the CPU device explicitly.
try:
    from importlib.metadata import version as _version

    _VLLM = tuple(int(x) for x in _version("vllm").split(".")[:2])
except Exception:  # noqa: BLE001 - not installed: the importorskip below says so
    _VLLM = (0, 0)
if _VLLM < (0, 34):
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

if os.environ.get("KVSCHED_REQUIRE_VLLM"):  # CI's vLLM environment: a missing vLLM is a failure
    import torch  # noqa: F401
    import vllm  # noqa: F401

pytest.importorskip("torch", reason="the vLLM connector tests need torch and vLLM: pip install \"kvsched[vllm]\"")
pytest.importorskip("vllm", reason="vLLM is not installed: pip install \"kvsched[vllm]\" (CI builds a CPU vLLM env)")
