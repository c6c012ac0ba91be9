"""Read the memory layout of an array from whatever protocol it speaks.

A :class:`~kvsched.pool.BlockPool` needs only raw facts about each array: its data pointer, shape,
byte strides, item size, dtype name and device. Engines hand us numpy arrays (host pools), torch
tensors or cupy arrays (GPU pools), so this module understands, in this order:

1. numpy arrays and anything with ``__array_interface__`` or the buffer protocol (host memory);
2. ``__cuda_array_interface__`` (cupy, numba, torch CUDA tensors of most dtypes);
3. DLPack (``__dlpack__``): torch tensors on any device, including bfloat16, which the CUDA array
   interface cannot describe.

Nothing here imports torch or cupy: every protocol is duck-typed, so ``import kvsched`` never needs a
GPU stack. The objects that own the memory are returned in :attr:`ArrayInfo.owners`; a pool keeps
them referenced so the memory outlives the pool.
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["ArrayInfo", "describe_array"]


@dataclass(frozen=True)
class ArrayInfo:
    """Raw layout of one array. ``strides`` are in bytes; ``device`` is ``"cpu"`` or ``"cuda:N"``."""

    ptr: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    itemsize: int
    dtype: str | None
    device: str
    readonly: bool = False
    owners: tuple[Any, ...] = field(default=(), repr=False, compare=False)


def describe_array(obj: Any) -> ArrayInfo:
    """Return the layout of ``obj`` without copying it.

    Raises ``TypeError`` when ``obj`` speaks none of the supported protocols."""
    if isinstance(obj, np.ndarray) or hasattr(obj, "__array_interface__"):
        return _from_numpy(np.asarray(obj), obj)
    cai_error: Exception | None = None
    if hasattr(type(obj), "__cuda_array_interface__") or hasattr(obj, "__cuda_array_interface__"):
        try:
            info = _from_cuda_array_interface(obj)
        except Exception as exc:  # torch raises for tensors that require grad (older: bfloat16)
            cai_error = exc
        else:
            # The CUDA array interface has no bfloat16 (torch exports it as raw 2-byte items):
            # DLPack names it, so prefer DLPack when the dtype came out unknown.
            if info.dtype is not None or not hasattr(obj, "__dlpack__"):
                return info
    if hasattr(obj, "__dlpack__"):
        return _from_dlpack(obj)
    if cai_error is not None:
        raise TypeError(f"cannot read __cuda_array_interface__ of {type(obj).__name__}: {cai_error}")
    try:
        view = memoryview(obj)
    except TypeError:
        raise TypeError(
            f"{type(obj).__name__} is not an array: expected a numpy array, an object with "
            "__array_interface__, __cuda_array_interface__ or __dlpack__, or a buffer"
        ) from None
    return _from_numpy(np.asarray(view), obj)


# --------------------------------------------------------------------------------------------
# numpy / __array_interface__ / buffer protocol


def _from_numpy(arr: np.ndarray, source: Any) -> ArrayInfo:
    if arr.dtype.hasobject:
        raise TypeError("arrays of Python objects cannot back a block pool")
    return ArrayInfo(
        ptr=int(arr.__array_interface__["data"][0]),
        shape=tuple(int(s) for s in arr.shape),
        strides=tuple(int(s) for s in arr.strides),
        itemsize=int(arr.itemsize),
        dtype=arr.dtype.name,
        device="cpu",
        readonly=not arr.flags.writeable,
        owners=(source, arr),
    )


# --------------------------------------------------------------------------------------------
# __cuda_array_interface__


def _from_cuda_array_interface(obj: Any) -> ArrayInfo:
    cai = obj.__cuda_array_interface__
    shape = tuple(int(s) for s in cai["shape"])
    dtype = np.dtype(cai["typestr"])
    ptr, readonly = cai["data"]
    strides = cai.get("strides")
    if strides is None:
        strides = _c_strides(shape, dtype.itemsize)
    ptr = int(ptr or 0)
    return ArrayInfo(
        ptr=ptr,
        shape=shape,
        strides=tuple(int(s) for s in strides),
        itemsize=int(dtype.itemsize),
        dtype=None if dtype.kind == "V" else dtype.name,
        device=f"cuda:{_cuda_device_of(obj, ptr)}",
        readonly=bool(readonly),
        owners=(obj,),
    )


def _cuda_device_of(obj: Any, ptr: int) -> int:
    """The CUDA array interface carries no device; ask the object, then the driver."""
    dev = getattr(obj, "device", None)
    if isinstance(dev, int) and not isinstance(dev, bool):
        return dev
    for attr in ("id", "index"):  # cupy: .device.id; torch: .device.index
        value = getattr(dev, attr, None)
        if isinstance(value, int):
            return value
    try:  # numba and others: the pointer knows its device
        from cuda.bindings import runtime as rt

        err, attrs = rt.cudaPointerGetAttributes(ptr)
        if int(err) == 0 and attrs is not None:
            return int(attrs.device)
    except Exception:
        pass
    return 0


# --------------------------------------------------------------------------------------------
# DLPack (legacy, unversioned capsules: every producer returns one when max_version is not given)


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", _DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", _DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


class _DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", ctypes.c_void_p)]


_DL_CPU, _DL_CUDA, _DL_CUDA_HOST, _DL_CUDA_MANAGED = 1, 2, 3, 13
_DL_KINDS = {0: "int", 1: "uint", 2: "float", 4: "bfloat", 5: "complex", 6: "bool"}

_capsule_get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_get_pointer.restype = ctypes.c_void_p
_capsule_get_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
_capsule_is_valid = ctypes.pythonapi.PyCapsule_IsValid
_capsule_is_valid.restype = ctypes.c_int
_capsule_is_valid.argtypes = [ctypes.py_object, ctypes.c_char_p]


def _from_dlpack(obj: Any) -> ArrayInfo:
    source = obj
    if getattr(obj, "requires_grad", False) and hasattr(obj, "detach"):
        obj = obj.detach()  # same storage; DLPack export refuses tensors that require grad
    capsule = obj.__dlpack__()
    if not _capsule_is_valid(capsule, b"dltensor"):
        raise TypeError(f"{type(source).__name__}.__dlpack__() did not return an unused 'dltensor' capsule")
    managed = ctypes.cast(_capsule_get_pointer(capsule, b"dltensor"), ctypes.POINTER(_DLManagedTensor))
    t = managed.contents.dl_tensor
    if t.dtype.lanes != 1:
        raise TypeError("vector dtypes (lanes > 1) are not supported")
    itemsize = max(1, (t.dtype.bits * t.dtype.lanes) // 8)
    kind = _DL_KINDS.get(t.dtype.code)
    dtype = None if kind is None else ("bool" if kind == "bool" else f"{kind}{t.dtype.bits}")
    ndim = int(t.ndim)
    shape = tuple(int(t.shape[i]) for i in range(ndim))
    if t.strides:
        strides = tuple(int(t.strides[i]) * itemsize for i in range(ndim))
    else:
        strides = _c_strides(shape, itemsize)
    dev_type, dev_id = int(t.device.device_type), int(t.device.device_id)
    if dev_type in (_DL_CPU, _DL_CUDA_HOST):
        device = "cpu"
    elif dev_type in (_DL_CUDA, _DL_CUDA_MANAGED):
        device = f"cuda:{dev_id}"
    else:
        raise TypeError(f"DLPack device type {dev_type} is neither CPU nor CUDA")
    # The capsule stays unconsumed and referenced by the pool: when the pool goes away, the
    # capsule's destructor calls the producer's deleter, which releases the producer's memory.
    return ArrayInfo(
        ptr=int(t.data or 0) + int(t.byte_offset),
        shape=shape,
        strides=strides,
        itemsize=itemsize,
        dtype=dtype,
        device=device,
        readonly=False,
        owners=(source, obj, capsule),
    )


def _c_strides(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    strides, acc = [], itemsize
    for dim in reversed(shape):
        strides.append(acc)
        acc *= max(int(dim), 1)
    return tuple(reversed(strides))


def c_contiguous_nbytes(shape: tuple[int, ...], strides: tuple[int, ...], itemsize: int) -> int | None:
    """Bytes spanned by dims ``shape`` if they are C-contiguous (dims of size 1 ignored), else None."""
    expected = itemsize
    for dim, stride in zip(reversed(shape), reversed(strides)):
        if dim == 1:
            continue
        if stride != expected:
            return None
        expected *= dim
    return itemsize * math.prod(shape)
