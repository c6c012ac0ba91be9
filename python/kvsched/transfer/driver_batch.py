"""Batched copies handed to the CUDA driver as C arrays: ``cuMemcpyBatchAsync`` through ctypes.

Why not cuda-bindings' ``cudaMemcpyBatchAsync``: it takes Python lists and converts every element
to a C integer on the submitting thread, 300-430 ns per copy (``bench/batch_args_cost.py``), a
quarter of the copy engine's time for a 64 KiB block and several times it for a 4 KiB block. Here
the destinations, sources and sizes are C arrays of 64-bit integers (:func:`c_array`: the int64
numpy arrays of a large plan, used in place, or an ``array.array`` made from the lists of a small
one), and the driver reads them: the Python cost is one foreign call per batch, whatever its length.

The function pointer comes from the driver itself (``cuGetProcAddress``, through cuda-bindings'
driver module) at the CUDA 12.8 ABI: ``cuMemcpyBatchAsync`` has the ``failIdx`` argument there;
CUDA 13 headers map the name to ``cuMemcpyBatchAsync_v2`` without it. Asking for the 12.8
version gets the same prototype from every driver that has batched copies (12.8 and later), so
the prototype below cannot disagree with the function it calls. The struct and prototype follow
``cuda.h`` / ``cudaTypedefs.h`` (``PFN_cuMemcpyBatchAsync_v12080``, ``CUmemcpyAttributes_v1``).

ctypes releases the GIL for the duration of the call, so other Python threads run while the
driver queues the copies.
"""

from __future__ import annotations

import array
import ctypes
from typing import Any

import numpy as np

from kvsched.transfer.errors import CudaError

__all__ = [
    "DriverBatchCopier",
    "c_array",
    "driver_error_name",
    "is_invalid_context",
    "CUmemLocation",
    "CUmemcpyAttributes",
    "BATCH_PROTOTYPE",
    "ABI_VERSION",
]

ABI_VERSION = 12080  # the CUDA version whose cuMemcpyBatchAsync prototype is declared below
_CU_GET_PROC_ADDRESS_LEGACY_STREAM = 1  # the legacy-stream entry point, not the per-thread one
_CU_MEMCPY_SRC_ACCESS_ORDER_STREAM = 1
_CU_MEMCPY_SRC_ACCESS_ORDER_ANY = 3
_CU_MEMCPY_FLAG_PREFER_OVERLAP_WITH_COMPUTE = 1
_CUDA_ERROR_INVALID_CONTEXT = 201
_SIZE_MAX = 2**64 - 1


class CUmemLocation(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class CUmemcpyAttributes(ctypes.Structure):
    _fields_ = [
        ("srcAccessOrder", ctypes.c_int),
        ("srcLocHint", CUmemLocation),
        ("dstLocHint", CUmemLocation),
        ("flags", ctypes.c_uint),
    ]


# CUresult cuMemcpyBatchAsync(CUdeviceptr *dsts, CUdeviceptr *srcs, size_t *sizes, size_t count,
#     CUmemcpyAttributes *attrs, size_t *attrsIdxs, size_t numAttrs, size_t *failIdx, CUstream hStream)
# (CUDAAPI is the default calling convention on Linux; CFUNCTYPE releases the GIL during the call.)
BATCH_PROTOTYPE = ctypes.CFUNCTYPE(
    ctypes.c_int,
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.POINTER(CUmemcpyAttributes),
    ctypes.POINTER(ctypes.c_size_t),
    ctypes.c_size_t,
    ctypes.POINTER(ctypes.c_size_t),
    ctypes.c_void_p,
)


class DriverBatchCopier:
    """Calls the driver's ``cuMemcpyBatchAsync`` with C arrays of addresses and sizes.

    ``driver`` is cuda-bindings' driver module (``cuda.bindings.driver``) or a stand-in with the
    same ``cuGetProcAddress`` and ``cuGetErrorName``. Raises :class:`CudaError` when the driver has
    no batched copies. Every copy in a batch reads its source in stream order
    (``CU_MEMCPY_SRC_ACCESS_ORDER_STREAM``), after the events its stream waited on.
    """

    def __init__(self, driver: Any) -> None:
        self._driver = driver
        flags = getattr(getattr(driver, "CUdriverProcAddress_flags", None), "CU_GET_PROC_ADDRESS_LEGACY_STREAM",
                        _CU_GET_PROC_ADDRESS_LEGACY_STREAM)
        res = driver.cuGetProcAddress(b"cuMemcpyBatchAsync", ABI_VERSION, flags)
        res = res if isinstance(res, tuple) else (res,)
        if int(res[0]) != 0:
            raise CudaError(f"cuGetProcAddress(cuMemcpyBatchAsync) failed: {self.error_name(int(res[0]))}",
                            code=int(res[0]))
        address = int(res[1]) if len(res) > 1 and res[1] is not None else 0
        if address == 0:
            status = f" (symbol status {res[2]})" if len(res) > 2 else ""
            raise CudaError(f"the driver has no cuMemcpyBatchAsync at the CUDA {ABI_VERSION} ABI{status}")
        self._fn = BATCH_PROTOTYPE(address)
        # One attribute set for every copy of a call, one per setting (a DmaSettings of
        # kvsched.transfer.copy_path). Read by the driver during the call only, never written:
        # shared by concurrent callers safely. PREFER_OVERLAP_WITH_COMPUTE is a hint (cuda.h) that
        # the copies should overlap the compute stream's kernels; the default, until
        # bench/cuda_calibrate.py measures otherwise.
        self._attr_sets = {
            (overlap, order): CUmemcpyAttributes(
                srcAccessOrder=_CU_MEMCPY_SRC_ACCESS_ORDER_ANY if order == "any" else _CU_MEMCPY_SRC_ACCESS_ORDER_STREAM,
                flags=_CU_MEMCPY_FLAG_PREFER_OVERLAP_WITH_COMPUTE if overlap else 0)
            for overlap in (True, False) for order in ("stream", "any")
        }
        self._attrs = self._attr_sets[(True, "stream")]
        self._attr_index = (ctypes.c_size_t * 1)(0)

    def __call__(self, dsts: int, srcs: int, sizes: int, count: int, stream: int,
                 settings: Any = None) -> tuple[int, int]:
        """Queue ``count`` copies on ``stream``; returns ``(CUresult, index of the failed copy)``
        (the index is ``count`` or more when the error is not tied to one copy: the driver then
        leaves SIZE_MAX).

        ``dsts``, ``srcs`` and ``sizes`` are addresses of C arrays of ``count`` 64-bit integers
        (see :func:`c_array`), alive during the call: the driver has read them when it returns.
        ``settings``: a ``DmaSettings`` (its ``prefer_overlap`` and ``src_order``); None for the
        default (overlap hint on, stream order)."""
        attrs = self._attrs if settings is None else self._attr_sets[(bool(settings.prefer_overlap),
                                                                      settings.src_order)]
        fail = ctypes.c_size_t(_SIZE_MAX)  # stays SIZE_MAX where the driver names no copy
        rc = self._fn(dsts, srcs, sizes, count, ctypes.byref(attrs), self._attr_index, 1,
                      ctypes.byref(fail), stream)
        return int(rc), int(fail.value)

    def error_name(self, code: int) -> str:
        """``"CUDA_ERROR_X (description)"`` for a ``CUresult``."""
        return driver_error_name(self._driver, code)


def driver_error_name(driver: Any, code: int) -> str:
    """``"CUDA_ERROR_X (description)"`` for a driver ``CUresult``; never raises."""
    name, desc = f"CUresult {code}", ""
    try:
        err, text = driver.cuGetErrorName(driver.CUresult(code))[:2]
        if int(err) == 0 and text:
            name = text.decode() if isinstance(text, bytes) else str(text)
        err, text = driver.cuGetErrorString(driver.CUresult(code))[:2]
        if int(err) == 0 and text:
            desc = text.decode() if isinstance(text, bytes) else str(text)
    except Exception:  # noqa: BLE001 - naming an error must never raise
        pass
    return f"{name} ({desc})" if desc else name


def c_array(values: Any) -> tuple[int, Any]:
    """``(address, owner)`` of a C array of 64-bit integers holding ``values`` (a list of ints or
    an integer numpy array); keep ``owner`` alive while the address is used. A contiguous int64
    or uint64 array is used in place; a list becomes an ``array.array`` (cheaper than numpy for
    the few dozen entries of a typical job)."""
    if isinstance(values, np.ndarray):
        if values.ndim != 1 or values.dtype.kind not in "iu":
            raise ValueError("a C array of copies needs a 1-D integer array")
        arr = np.ascontiguousarray(values, dtype=np.uint64 if values.dtype.kind == "u" else np.int64)
        return int(arr.ctypes.data), arr
    arr = array.array("q", values)
    return arr.buffer_info()[0], arr


def is_invalid_context(code: int) -> bool:
    """True for CUDA_ERROR_INVALID_CONTEXT: the calling thread has no current CUDA context yet."""
    return code == _CUDA_ERROR_INVALID_CONTEXT
