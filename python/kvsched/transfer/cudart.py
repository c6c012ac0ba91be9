"""Thin, checked access to the CUDA runtime through cuda-python (``cuda.bindings.runtime``).

Every cuda-bindings call returns a tuple whose first item is a ``cudaError_t``; :func:`check`
turns a failure into :class:`CudaError` naming the call and the error (e.g.
``cudaMemcpyAsync failed: cudaErrorInvalidValue (invalid argument)``).

Also here: GPU detection for ``backend="auto"`` (never raises: no cuda-python, no driver or no
device all become a reason string), handle conversion for streams and events coming from torch,
cupy, cuda.core or raw ints, and pinned/device memory helpers.

Nothing imports cuda-python at module import time, so ``import kvsched`` works without it.
"""

from __future__ import annotations

import logging
import math
import threading
import weakref
from typing import Any

import numpy as np

from kvsched.errors import InvalidArgumentError
from kvsched.transfer.errors import CudaError

__all__ = [
    "load_runtime",
    "cuda_available",
    "check",
    "error_name",
    "as_stream_handle",
    "as_event_handle",
    "pinned_empty",
    "pin_array",
    "HostRegistration",
    "DeviceBuffer",
]

log = logging.getLogger("kvsched")

_runtime: Any = None
_runtime_lock = threading.Lock()


def load_runtime() -> Any:
    """Import ``cuda.bindings.runtime`` (cuda-python >= 12.6), or the older ``cuda.cudart``."""
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            try:
                from cuda.bindings import runtime
            except ImportError:
                from cuda import cudart as runtime  # type: ignore[no-redef]  # cuda-python < 12.6
            _runtime = runtime
        return _runtime


def cuda_available(runtime: Any = None) -> tuple[bool, str]:
    """``(True, "N device(s) ...")`` when CUDA is usable, else ``(False, reason)``. Never raises."""
    try:
        rt = runtime if runtime is not None else load_runtime()
    except Exception as exc:
        return False, f"cuda-python is not importable ({type(exc).__name__}: {exc})"
    try:
        res = rt.cudaGetDeviceCount()
    except Exception as exc:  # cuda.pathfinder raises when libcuda cannot be found
        return False, f"cudaGetDeviceCount raised {type(exc).__name__}: {exc}"
    if int(res[0]) != 0:
        return False, f"cudaGetDeviceCount failed: {error_name(rt, res[0])}"
    if int(res[1]) < 1:
        return False, "no CUDA device"
    try:
        rver = check(rt, rt.cudaRuntimeGetVersion(), "cudaRuntimeGetVersion")
        dver = check(rt, rt.cudaDriverGetVersion(), "cudaDriverGetVersion")
        versions = f", runtime {rver}, driver {dver}"
    except Exception:
        versions = ""
    return True, f"{int(res[1])} CUDA device(s){versions}"


def error_name(rt: Any, err: Any) -> str:
    """``"cudaErrorX (description)"`` for a ``cudaError_t``."""
    name = getattr(err, "name", None)
    desc = ""
    try:
        ok, text = rt.cudaGetErrorName(err)[:2]
        if int(ok) == 0 and text:
            name = text.decode() if isinstance(text, bytes) else str(text)
        ok, text = rt.cudaGetErrorString(err)[:2]
        if int(ok) == 0 and text:
            desc = text.decode() if isinstance(text, bytes) else str(text)
    except Exception:
        pass
    name = name or f"cudaError {int(err)}"
    return f"{name} ({desc})" if desc else str(name)


def check(rt: Any, result: Any, what: str) -> Any:
    """Raise :class:`CudaError` unless ``result[0]`` is ``cudaSuccess``; return the payload
    (None, the single value, or a tuple of values)."""
    if not isinstance(result, tuple):
        result = (result,)
    err = result[0]
    if int(err) != 0:
        text = error_name(rt, err)
        raise CudaError(f"{what} failed: {text}", code=int(err), name=text.split(" ", 1)[0])
    if len(result) == 1:
        return None
    if len(result) == 2:
        return result[1]
    return result[1:]


# ---------------------------------------------------------------------------------- handles


def _handle(obj: Any, attrs: tuple[str, ...], what: str) -> int:
    if isinstance(obj, bool):
        raise TypeError(f"{what} must be a CUDA {what} handle, got bool")
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    proto = getattr(obj, "__cuda_stream__", None)  # cuda.core stream protocol: (version, handle)
    if what == "stream" and callable(proto):
        return int(proto()[1])
    for attr in attrs:
        if hasattr(obj, attr):
            return int(getattr(obj, attr))
    try:
        return int(obj)  # cudaStream_t / cudaEvent_t / CUstream / CUevent objects
    except (TypeError, ValueError):
        raise TypeError(
            f"cannot read a CUDA {what} handle from {type(obj).__name__}: pass an int, a "
            f"cuda.bindings handle, or a torch / cupy / cuda.core {what}"
        ) from None


def as_stream_handle(obj: Any) -> int:
    """Raw ``cudaStream_t`` (int) of an int, torch.cuda.Stream, cupy Stream or cuda.core Stream."""
    return _handle(obj, ("cuda_stream", "ptr", "handle"), "stream")


def as_event_handle(obj: Any) -> int:
    """Raw ``cudaEvent_t`` (int) of an int, torch.cuda.Event, cupy Event or cuda.core Event.

    Raises ``InvalidArgumentError`` for a null handle (a torch event that was never recorded)."""
    value = _handle(obj, ("cuda_event", "ptr", "handle"), "event")
    if value == 0:
        raise InvalidArgumentError(
            f"{type(obj).__name__} has no CUDA event yet: record it on the compute stream first"
        )
    return value


# ---------------------------------------------------------------------------------- memory


class _PinnedAllocation:
    """Pinned host memory from ``cudaMallocHost``; numpy views keep it alive, GC frees it."""

    def __init__(self, rt: Any, nbytes: int, shape: tuple[int, ...], dtype: np.dtype) -> None:
        ptr = check(rt, rt.cudaMallocHost(max(nbytes, 1)), "cudaMallocHost")
        self.ptr = int(ptr)
        self.nbytes = nbytes
        self.__array_interface__ = {
            "data": (self.ptr, False),
            "shape": shape,
            "typestr": dtype.str,
            "version": 3,
        }
        weakref.finalize(self, _free_host, rt, self.ptr)


def _free_host(rt: Any, ptr: int) -> None:
    try:
        rt.cudaFreeHost(ptr)
    except Exception:  # interpreter shutdown
        pass


def pinned_empty(shape: Any, dtype: Any = np.uint8, *, runtime: Any = None) -> np.ndarray:
    """A numpy array in page-locked memory (``cudaMallocHost``), so host<->device copies are truly
    asynchronous DMA. Freed when the last view is garbage-collected."""
    rt = runtime if runtime is not None else load_runtime()
    shape = (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(int(s) for s in shape)
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    return np.asarray(_PinnedAllocation(rt, nbytes, shape, dtype))


def pinned_zeros(shape: Any, dtype: Any = np.uint8, *, runtime: Any = None) -> np.ndarray:
    arr = pinned_empty(shape, dtype, runtime=runtime)
    arr.fill(0)
    return arr


class HostRegistration:
    """Page-locks an existing host range with ``cudaHostRegister``; :meth:`close` (or GC of this
    object) unregisters it. Keep the memory alive at least as long as this object."""

    def __init__(self, rt: Any, ptr: int, nbytes: int, owner: Any = None) -> None:
        check(rt, rt.cudaHostRegister(ptr, nbytes, rt.cudaHostRegisterDefault), "cudaHostRegister")
        self.ptr, self.nbytes, self._owner = ptr, nbytes, owner
        self._finalizer = weakref.finalize(self, _unregister, rt, ptr)

    def close(self) -> None:
        self._finalizer()


def _unregister(rt: Any, ptr: int) -> None:
    try:
        rt.cudaHostUnregister(ptr)
    except Exception:
        pass


def pin_array(arr: np.ndarray, *, runtime: Any = None) -> HostRegistration:
    """Page-lock the memory of an existing numpy array (``cudaHostRegister``)."""
    rt = runtime if runtime is not None else load_runtime()
    if not isinstance(arr, np.ndarray):
        raise TypeError(f"pin_array needs a numpy array, got {type(arr).__name__}")
    return HostRegistration(rt, int(arr.ctypes.data), max(int(arr.nbytes), 1), owner=arr)


class DeviceBuffer:
    """``cudaMalloc``'d device memory exposing ``__cuda_array_interface__`` (so
    ``BlockPool.from_array`` takes it); freed when garbage-collected. For tools and tests that
    should not need torch or cupy."""

    def __init__(self, shape: Any, dtype: Any = np.uint8, *, device: int = 0, runtime: Any = None) -> None:
        rt = runtime if runtime is not None else load_runtime()
        self.shape = (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.nbytes = math.prod(self.shape) * self.dtype.itemsize
        self.device = device
        prev = check(rt, rt.cudaGetDevice(), "cudaGetDevice")
        check(rt, rt.cudaSetDevice(device), "cudaSetDevice")
        try:
            self.ptr = int(check(rt, rt.cudaMalloc(max(self.nbytes, 1)), "cudaMalloc"))
        finally:
            rt.cudaSetDevice(prev)
        self._finalizer = weakref.finalize(self, _free_device, rt, self.ptr)

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        return {
            "data": (self.ptr, False),
            "shape": self.shape,
            "typestr": self.dtype.str,
            "strides": None,
            "version": 3,
        }

    def free(self) -> None:
        self._finalizer()


def _free_device(rt: Any, ptr: int) -> None:
    try:
        rt.cudaFree(ptr)
    except Exception:
        pass
