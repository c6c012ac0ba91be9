"""Transfer backends: move KV blocks between block pools and mark scheduler handles (contract
section 4, docs/contract.md).

``TransferEngine`` (engine.py) validates requests and routes them to the host backend (host.py,
numpy on worker threads), the cuda backend (cuda.py, copy streams + one reaper thread) or the
nixl backend (nixl.py, a NIXL agent + one completion thread; remote pools in remote.py).
``plan.py`` validates and coalesces block pairs, ``job.py`` is the per-transfer record, ``cudart.py`` wraps cuda-python calls and
pinned/device memory. Array layouts are read by ``kvsched.interop``, next to the pools that use it.

Importing this package never imports cuda-python or NIXL: those modules load them on first use.
"""

from __future__ import annotations

from kvsched.transfer.cuda import CudaBackend
from kvsched.transfer.cudart import DeviceBuffer, cuda_available, pin_array, pinned_empty, pinned_zeros
from kvsched.transfer.engine import TransferEngine
from kvsched.transfer.errors import (
    CudaError,
    TransferEngineClosedError,
    TransferError,
    TransferQueueFullError,
)
from kvsched.transfer.host import HostBackend
from kvsched.transfer.job import TransferJob
from kvsched.transfer.options import CudaOptions, HostOptions, NixlOptions
from kvsched.transfer.remote import RemotePool

__all__ = [
    "TransferEngine",
    "HostOptions",
    "CudaOptions",
    "NixlOptions",
    "RemotePool",
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
