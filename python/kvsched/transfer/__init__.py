"""Transfer backends: move KV blocks between block pools and mark scheduler handles (contract
section 4, docs/contract.md).

``TransferEngine`` (engine.py) validates requests and routes them to the host backend (host.py,
numpy on worker threads) or the cuda backend (cuda.py, copy streams + one reaper thread).
``plan.py`` validates and coalesces block pairs, ``job.py`` is the per-transfer record,
``cudart.py`` wraps cuda-python calls and pinned/device memory, ``interop.py`` reads array layouts.

Attributes are loaded lazily (PEP 562): ``import kvsched.transfer`` imports neither numpy-heavy
modules nor cuda-python, and ``kvsched.pool`` can use ``kvsched.transfer.interop`` without an
import cycle.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "TransferEngine",
    "TransferJob",
    "HostBackend",
    "CudaBackend",
    "TransferError",
    "TransferQueueFullError",
    "TransferEngineClosedError",
    "CudaError",
    "cuda_available",
    "pinned_empty",
    "pinned_zeros",
    "pin_array",
    "DeviceBuffer",
]

_WHERE = {
    "TransferEngine": "engine",
    "TransferJob": "job",
    "HostBackend": "host",
    "CudaBackend": "cuda",
    "TransferError": "errors",
    "TransferQueueFullError": "errors",
    "TransferEngineClosedError": "errors",
    "CudaError": "errors",
    "cuda_available": "cudart",
    "pinned_empty": "cudart",
    "pinned_zeros": "cudart",
    "pin_array": "cudart",
    "DeviceBuffer": "cudart",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'kvsched.transfer' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"kvsched.transfer.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
