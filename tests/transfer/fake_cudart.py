"""A fake ``cuda.bindings.runtime`` for testing the cuda backend's logic on a CPU-only machine.

It mirrors the call signatures and return conventions of cuda-bindings 13 (every call returns a
tuple whose first item is a ``cudaError_t``; ``cudaMemcpyBatchAsync`` takes 8 arguments and
returns ``(err,)``), checks argument types strictly, and moves bytes with ``ctypes.memmove``
(its "device memory" is host memory from ``cudaMalloc``). Copies happen at once; an event
reports ``cudaErrorNotReady`` for ``not_ready_polls`` queries after each record, so the reaper's
polling path runs. Errors can be injected per function with :meth:`FakeRuntime.fail`.

:class:`FakeDriver` stands in for ``cuda.bindings.driver`` where the backend needs the driver
itself: its ``cuMemcpyBatchAsync`` is a real C function pointer (a ctypes callback) that reads the
C arrays it is given, so the ctypes call path runs for real.

It cannot model the GPU-side ordering of streams; that is what ``test_cuda_backend.py`` checks
on a real GPU.
"""

from __future__ import annotations

import ctypes
import enum
import sys
import itertools
import threading
from collections import Counter


class cudaError_t(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorInsufficientDriver = 35
    cudaErrorInvalidResourceHandle = 400
    cudaErrorNotReady = 600
    cudaErrorIllegalAddress = 700
    cudaErrorHostMemoryAlreadyRegistered = 712
    cudaErrorNotSupported = 801


_DESCRIPTIONS = {
    cudaError_t.cudaSuccess: "no error",
    cudaError_t.cudaErrorInvalidValue: "invalid argument",
    cudaError_t.cudaErrorNotReady: "device not ready",
    cudaError_t.cudaErrorIllegalAddress: "an illegal memory access was encountered",
}


class cudaMemcpyKind(enum.IntEnum):
    cudaMemcpyHostToHost = 0
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2
    cudaMemcpyDeviceToDevice = 3
    cudaMemcpyDefault = 4


class cudaMemoryType(enum.IntEnum):
    cudaMemoryTypeUnregistered = 0
    cudaMemoryTypeHost = 1
    cudaMemoryTypeDevice = 2
    cudaMemoryTypeManaged = 3


class cudaMemcpySrcAccessOrder(enum.IntEnum):
    cudaMemcpySrcAccessOrderInvalid = 0
    cudaMemcpySrcAccessOrderStream = 1
    cudaMemcpySrcAccessOrderDuringApiCall = 2
    cudaMemcpySrcAccessOrderAny = 3


class cudaDeviceAttr(enum.IntEnum):
    cudaDevAttrUnifiedAddressing = 41
    cudaDevAttrCanUseHostPointerForRegisteredMem = 91


class _Handle:
    def __init__(self, init_value: int = 0) -> None:
        self._value = int(init_value)

    def __int__(self) -> int:
        return self._value

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._value:#x}>"


class cudaStream_t(_Handle):
    pass


class cudaEvent_t(_Handle):
    pass


class cudaMemcpyAttributes:
    def __init__(self) -> None:
        self.srcAccessOrder = cudaMemcpySrcAccessOrder.cudaMemcpySrcAccessOrderInvalid
        self.flags = 0


class cudaPointerAttributes:
    def __init__(self, type_: cudaMemoryType, device: int) -> None:
        self.type = type_
        self.device = device


_OK = cudaError_t.cudaSuccess


class FakeRuntime:
    """One fake CUDA runtime with ``num_devices`` devices. ``calls`` counts calls by name."""

    cudaError_t = cudaError_t
    cudaMemcpyKind = cudaMemcpyKind
    cudaMemoryType = cudaMemoryType
    cudaMemcpySrcAccessOrder = cudaMemcpySrcAccessOrder
    cudaStream_t = cudaStream_t
    cudaEvent_t = cudaEvent_t
    cudaMemcpyAttributes = cudaMemcpyAttributes
    cudaDeviceAttr = cudaDeviceAttr
    cudaStreamNonBlocking = 1
    cudaEventDisableTiming = 2
    cudaHostRegisterDefault = 0

    def __init__(self, num_devices: int = 1, *, not_ready_polls: int = 2, batch: bool = True,
                 version: int = 13000) -> None:
        self.num_devices = num_devices
        self.not_ready_polls = not_ready_polls
        self.version = version
        if not batch:  # like cuda-bindings < 12.8: no batched copies
            self.cudaMemcpyBatchAsync = None
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._ids = itertools.count(0x1000, 0x10)
        self._device = threading.local()
        self._buffers: dict[int, ctypes.Array] = {}
        self._device_of: dict[int, tuple[int, int]] = {}  # base -> (size, device)
        self._pinned: dict[int, int] = {}  # base -> size (cudaMallocHost or registered)
        self.streams: set[int] = set()
        self.events: dict[int, int] = {}  # event -> polls left until ready
        self.destroyed_streams: set[int] = set()
        self.destroyed_events: set[int] = set()
        self.waits: list[tuple[int, int]] = []  # (stream, event) of cudaStreamWaitEvent
        self.copies: list[tuple[int, int, int]] = []  # (dst, src, size), in launch order
        self.batches: list[int] = []  # copies per cudaMemcpyBatchAsync call
        self.trace: list[tuple[str, int]] = []  # ("wait" | "copy" | "record", stream) in call order
        self._failures: dict[str, list[cudaError_t]] = {}
        self.bound_threads: set[int] = set()  # threads whose CUDA context is current (cudaFree(0))
        self.device_attrs: dict[cudaDeviceAttr, int] = {a: 1 for a in cudaDeviceAttr}

    # --------------------------------------------------------------------------- test controls

    def fail(self, name: str, error: cudaError_t = cudaError_t.cudaErrorInvalidValue, times: int = 1) -> None:
        """Make the next ``times`` calls of ``name`` return ``error``."""
        self._failures.setdefault(name, []).extend([error] * times)

    def _result(self, name: str) -> cudaError_t:
        self.calls[name] += 1
        queue = self._failures.get(name)
        if queue:
            return queue.pop(0)
        return _OK

    # --------------------------------------------------------------------------- device & errors

    def cudaGetDeviceCount(self):
        err = self._result("cudaGetDeviceCount")
        return (err, self.num_devices if err == _OK else None)

    def cudaRuntimeGetVersion(self):
        return (self._result("cudaRuntimeGetVersion"), self.version)

    def cudaDriverGetVersion(self):
        return (self._result("cudaDriverGetVersion"), self.version)

    def cudaGetDevice(self):
        return (self._result("cudaGetDevice"), getattr(self._device, "value", 0))

    def cudaSetDevice(self, device: int):
        if not 0 <= device < self.num_devices:
            return (cudaError_t.cudaErrorInvalidValue,)
        err = self._result("cudaSetDevice")
        if err == _OK:
            self._device.value = device
        return (err,)

    def cudaGetErrorName(self, err):
        return (_OK, cudaError_t(int(err)).name.encode())

    def cudaGetErrorString(self, err):
        return (_OK, _DESCRIPTIONS.get(cudaError_t(int(err)), "error").encode())

    def cudaGetLastError(self):
        return (_OK,)

    def cudaDeviceGetAttribute(self, attr, device):
        assert isinstance(attr, cudaDeviceAttr) and isinstance(device, int)
        err = self._result("cudaDeviceGetAttribute")
        return (err, self.device_attrs[attr] if err == _OK else None)

    # --------------------------------------------------------------------------- memory

    def _alloc(self, size: int) -> int:
        buf = (ctypes.c_ubyte * size)()
        ptr = ctypes.addressof(buf)
        self._buffers[ptr] = buf
        return ptr

    def cudaMalloc(self, size: int):
        err = self._result("cudaMalloc")
        if err != _OK:
            return (err, None)
        ptr = self._alloc(size)
        self._device_of[ptr] = (size, getattr(self._device, "value", 0))
        return (_OK, ptr)

    def cudaFree(self, ptr):
        self.calls["cudaFree"] += 1
        if int(ptr) == 0:  # the idiom that makes the device's primary context current
            self.bound_threads.add(threading.get_ident())
            return (_OK,)
        self._device_of.pop(int(ptr), None)
        self._buffers.pop(int(ptr), None)
        return (_OK,)

    def cudaMallocHost(self, size: int):
        err = self._result("cudaMallocHost")
        if err != _OK:
            return (err, None)
        ptr = self._alloc(size)
        self._pinned[ptr] = size
        return (_OK, ptr)

    def cudaFreeHost(self, ptr):
        self.calls["cudaFreeHost"] += 1
        self._pinned.pop(int(ptr), None)
        self._buffers.pop(int(ptr), None)
        return (_OK,)

    def cudaHostRegister(self, ptr, size, flags):
        err = self._result("cudaHostRegister")
        if err != _OK:
            return (err,)
        if self._find(self._pinned, int(ptr)) is not None:
            return (cudaError_t.cudaErrorHostMemoryAlreadyRegistered,)
        self._pinned[int(ptr)] = int(size)
        return (_OK,)

    def cudaHostUnregister(self, ptr):
        self.calls["cudaHostUnregister"] += 1
        self._pinned.pop(int(ptr), None)
        return (_OK,)

    @staticmethod
    def _find(table: dict[int, object], ptr: int):
        for base, info in table.items():
            size = info[0] if isinstance(info, tuple) else info
            if base <= ptr < base + size:
                return base
        return None

    def addressable(self, ptr: int, size: int) -> bool:
        """True when a kernel could touch ``[ptr, ptr + size)``: inside one device allocation or one
        page-locked host range."""
        for base, buf in list(self._buffers.items()):
            if base <= ptr and ptr + size <= base + len(buf) and (base in self._device_of or base in self._pinned):
                return True
        base = self._find(self._pinned, ptr)
        return base is not None and ptr + size <= base + self._pinned[base]

    def cudaPointerGetAttributes(self, ptr):
        self.calls["cudaPointerGetAttributes"] += 1
        ptr = int(ptr)
        base = self._find(self._device_of, ptr)
        if base is not None:
            return (_OK, cudaPointerAttributes(cudaMemoryType.cudaMemoryTypeDevice, self._device_of[base][1]))
        if self._find(self._pinned, ptr) is not None:
            return (_OK, cudaPointerAttributes(cudaMemoryType.cudaMemoryTypeHost, -2))
        return (_OK, cudaPointerAttributes(cudaMemoryType.cudaMemoryTypeUnregistered, -2))

    # --------------------------------------------------------------------------- streams & events

    def cudaStreamCreateWithFlags(self, flags: int):
        err = self._result("cudaStreamCreateWithFlags")
        if err != _OK:
            return (err, None)
        handle = next(self._ids)
        self.streams.add(handle)
        return (_OK, cudaStream_t(handle))

    def cudaStreamDestroy(self, stream):
        self.calls["cudaStreamDestroy"] += 1
        self._check_stream(stream)
        self.destroyed_streams.add(int(stream))
        return (_OK,)

    def cudaStreamSynchronize(self, stream):
        self._check_stream(stream)
        return (self._result("cudaStreamSynchronize"),)

    def cudaEventCreateWithFlags(self, flags: int):
        err = self._result("cudaEventCreateWithFlags")
        if err != _OK:
            return (err, None)
        handle = next(self._ids)
        with self._lock:
            self.events[handle] = 0
        return (_OK, cudaEvent_t(handle))

    def cudaEventDestroy(self, event):
        self.calls["cudaEventDestroy"] += 1
        self.destroyed_events.add(int(event))
        return (_OK,)

    def cudaEventRecord(self, event, stream):
        self._check_stream(stream)
        assert isinstance(event, cudaEvent_t), f"event must be a cudaEvent_t, got {type(event)}"
        err = self._result("cudaEventRecord")
        if err == _OK:
            with self._lock:
                self.events[int(event)] = self.not_ready_polls
            self.trace.append(("record", int(stream)))
        return (err,)

    def cudaEventQuery(self, event):
        assert isinstance(event, cudaEvent_t)
        err = self._result("cudaEventQuery")
        if err != _OK:
            return (err,)
        with self._lock:
            left = self.events[int(event)]
            if left > 0:
                self.events[int(event)] = left - 1
                return (cudaError_t.cudaErrorNotReady,)
        return (_OK,)

    def cudaStreamWaitEvent(self, stream, event, flags):
        assert isinstance(stream, cudaStream_t), f"stream must be a cudaStream_t, got {type(stream)}"
        assert isinstance(event, cudaEvent_t), f"event must be a cudaEvent_t, got {type(event)}"
        assert isinstance(flags, int)
        err = self._result("cudaStreamWaitEvent")
        if err == _OK:
            self.waits.append((int(stream), int(event)))
            self.trace.append(("wait", int(stream)))
        return (err,)

    def _check_stream(self, stream) -> None:
        assert isinstance(stream, cudaStream_t), f"stream must be a cudaStream_t, got {type(stream)}"
        assert int(stream) in self.streams, "unknown stream"
        assert int(stream) not in self.destroyed_streams, "stream used after destroy"

    # --------------------------------------------------------------------------- copies

    def cudaMemcpy(self, dst, src, count, kind):
        err = self._result("cudaMemcpy")
        if err == _OK:
            ctypes.memmove(int(dst), int(src), int(count))
        return (err,)

    def cudaMemcpyAsync(self, dst, src, count, kind, stream):
        assert isinstance(dst, int) and isinstance(src, int) and isinstance(count, int)
        assert kind == cudaMemcpyKind.cudaMemcpyDefault
        self._check_stream(stream)
        err = self._result("cudaMemcpyAsync")
        if err == _OK:
            ctypes.memmove(dst, src, count)
            self.copies.append((dst, src, count))
            self.trace.append(("copy", int(stream)))
        return (err,)

    def cudaMemcpyBatchAsync(self, dsts, srcs, sizes, count, attrs, attrsIdxs, numAttrs, stream):
        assert isinstance(dsts, list) and isinstance(srcs, list) and isinstance(sizes, list)
        assert len(dsts) == len(srcs) == len(sizes) == count
        assert isinstance(attrs, list) and len(attrs) == numAttrs and list(attrsIdxs)[0] == 0
        assert all(isinstance(a, cudaMemcpyAttributes) for a in attrs)
        assert attrs[0].srcAccessOrder == cudaMemcpySrcAccessOrder.cudaMemcpySrcAccessOrderStream
        self._check_stream(stream)
        err = self._result("cudaMemcpyBatchAsync")
        if err == _OK:
            for d, s, n in zip(dsts, srcs, sizes):
                ctypes.memmove(d, s, n)
                self.copies.append((d, s, n))
            self.batches.append(count)
            self.trace.append(("copy", int(stream)))
        return (err,)


# ------------------------------------------------------------------------------------ driver


class CUresult(enum.IntEnum):
    CUDA_SUCCESS = 0
    CUDA_ERROR_INVALID_VALUE = 1
    CUDA_ERROR_INVALID_CONTEXT = 201
    CUDA_ERROR_NOT_FOUND = 500
    CUDA_ERROR_ILLEGAL_ADDRESS = 700
    CUDA_ERROR_NOT_SUPPORTED = 801


class CUdriverProcAddress_flags(enum.IntEnum):
    CU_GET_PROC_ADDRESS_DEFAULT = 0
    CU_GET_PROC_ADDRESS_LEGACY_STREAM = 1
    CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM = 2


class FakeDriver:
    """``cuGetProcAddress`` hands out a C-callable ``cuMemcpyBatchAsync`` (CUDA 12.8 prototype)
    that copies between the fake runtime's buffers. It refuses calls from threads without a
    current context (``CUDA_ERROR_INVALID_CONTEXT``, as the driver API does) and records what it
    was given. A problem seen inside the callback is kept in ``errors`` (an exception cannot cross
    the C boundary) and returned as ``CUDA_ERROR_INVALID_VALUE``."""

    CUresult = CUresult
    CUdriverProcAddress_flags = CUdriverProcAddress_flags

    def __init__(self, runtime: FakeRuntime, *, has_batch: bool = True) -> None:
        from kvsched.transfer.driver_batch import BATCH_PROTOTYPE

        self.rt = runtime
        self.has_batch = has_batch
        self.batches: list[int] = []  # copies per call
        self.errors: list[str] = []
        self.fail_at: list[tuple[CUresult, int]] = []  # (error, index) for the next calls
        self.lookups: list[tuple[bytes, int, int]] = []
        self.flags_seen: list[int] = []  # the attributes' flags of each batch call
        self._function = BATCH_PROTOTYPE(self._batch)  # kept alive as long as the driver
        # The SM copy kernel: module loading and a C-callable cuLaunchKernel that does what the
        # kernel does (reads the descriptor table through the parameter pointers, copies).
        from kvsched.transfer.sm_copy import LAUNCH_PROTOTYPE

        self.has_launch = True
        self.calls: list[str] = []  # module calls, in order
        self.images: list[bytes] = []  # what cuModuleLoadData was given
        self.modules: set[int] = set()
        self.functions: dict[int, bytes] = {}  # handle -> kernel name
        self.launches: list[dict] = []  # grid, block, shared, stream, count, table of each launch
        self.launch_fail: list[CUresult] = []  # results of the next launches
        self.corrupt_next = 0  # the next kernels leave this many bytes of their last copy unwritten
        self.load_error: CUresult | None = None
        self._ids = itertools.count(0x7000, 0x10)
        self._launch = LAUNCH_PROTOTYPE(self._kernel_launch)

    def drop_context(self) -> None:
        """Every thread loses its current context (as after another library switched it)."""
        self.rt.bound_threads.clear()

    def cuGetProcAddress(self, symbol, cuda_version, flags):
        self.lookups.append((symbol, int(cuda_version), int(flags)))
        if not isinstance(symbol, bytes):
            raise TypeError("expected bytes")  # as cuda-bindings does
        if symbol == b"cuLaunchKernel" and self.has_launch:
            return (CUresult.CUDA_SUCCESS, ctypes.cast(self._launch, ctypes.c_void_p).value, 0)
        if symbol != b"cuMemcpyBatchAsync" or not self.has_batch:
            return (CUresult.CUDA_SUCCESS, 0, 1)  # CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND
        return (CUresult.CUDA_SUCCESS, ctypes.cast(self._function, ctypes.c_void_p).value, 0)

    # ------------------------------------------------------------------------- modules, kernels

    def cuModuleLoadData(self, image):
        self.calls.append("cuModuleLoadData")
        assert threading.get_ident() in self.rt.bound_threads, "module loaded without a current context"
        data = bytes(image)
        assert data.endswith(b"\0"), "the PTX image must be NUL-terminated"
        self.images.append(data)
        if self.load_error is not None:
            return (self.load_error, None)
        handle = next(self._ids)
        self.modules.add(handle)
        return (CUresult.CUDA_SUCCESS, handle)

    def cuModuleGetFunction(self, module, name):
        self.calls.append("cuModuleGetFunction")
        assert isinstance(name, bytes)
        if int(module) not in self.modules:
            return (CUresult.CUDA_ERROR_INVALID_VALUE, None)
        if name.decode() not in self.images[-1].decode(errors="replace"):
            return (CUresult.CUDA_ERROR_NOT_FOUND, None)
        handle = next(self._ids)
        self.functions[handle] = name
        return (CUresult.CUDA_SUCCESS, handle)

    def cuModuleUnload(self, module):
        self.calls.append("cuModuleUnload")
        self.modules.discard(int(module))
        return (CUresult.CUDA_SUCCESS,)

    def _kernel_launch(self, function, gx, gy, gz, bx, by, bz, shared, stream, params, extra):
        try:
            if threading.get_ident() not in self.rt.bound_threads:
                return int(CUresult.CUDA_ERROR_INVALID_CONTEXT)
            assert function in self.functions, "unknown function"
            assert stream in self.rt.streams and stream not in self.rt.destroyed_streams, "bad stream"
            assert gy == gz == by == bz == 1 and 1 <= gx and 32 <= bx <= 1024 and bx % 32 == 0, "launch shape"
            assert not extra, "parameters go through kernelParams"
            table = ctypes.c_uint64.from_address(params[0]).value
            count = ctypes.c_uint64.from_address(params[1]).value
            self.launches.append({"grid": gx, "block": bx, "shared": shared, "stream": stream,
                                  "count": count, "table": table})
            self.calls.append("cuLaunchKernel")
            if self.launch_fail:
                return int(self.launch_fail.pop(0))
            words = (ctypes.c_uint64 * (3 * count)).from_address(table)
            for i in range(count):
                d, s, n = words[i], words[count + i], words[2 * count + i]
                if not (self.rt.addressable(d, n) and self.rt.addressable(s, n)):
                    return int(CUresult.CUDA_ERROR_ILLEGAL_ADDRESS)  # what a kernel's bad access does
                if i == count - 1 and self.corrupt_next:
                    n = max(0, n - self.corrupt_next)
                    self.corrupt_next = 0
                ctypes.memmove(d, s, n)
                self.rt.copies.append((d, s, n))
            self.rt.trace.append(("kernel", int(stream)))
            return 0
        except Exception as exc:  # noqa: BLE001 - reported through errors
            self.errors.append(f"{type(exc).__name__}: {exc}")
            print(f"FakeDriver: {exc}", file=sys.stderr)
            return int(CUresult.CUDA_ERROR_INVALID_VALUE)

    def cuGetErrorName(self, code):
        return (CUresult.CUDA_SUCCESS, CUresult(int(code)).name.encode())

    def cuGetErrorString(self, code):
        return (CUresult.CUDA_SUCCESS, b"fake driver error")

    def _batch(self, dsts, srcs, sizes, count, attrs, attr_idxs, num_attrs, fail_idx, stream):
        try:
            if threading.get_ident() not in self.rt.bound_threads:
                return int(CUresult.CUDA_ERROR_INVALID_CONTEXT)
            assert num_attrs == 1 and attr_idxs[0] == 0, "one attribute set for all copies"
            assert attrs[0].srcAccessOrder == 1, "sources must be read in stream order"
            assert attrs[0].flags in (0, 1), "flags: 0 or PREFER_OVERLAP_WITH_COMPUTE"
            self.flags_seen.append(int(attrs[0].flags))
            assert stream in self.rt.streams and stream not in self.rt.destroyed_streams, "bad stream"
            assert count > 0 and dsts and srcs and sizes
            d = (ctypes.c_uint64 * count).from_address(dsts)
            s = (ctypes.c_uint64 * count).from_address(srcs)
            n = (ctypes.c_size_t * count).from_address(sizes)
            if self.fail_at:
                error, index = self.fail_at.pop(0)
                if index is not None:  # None: an error the driver ties to no copy
                    fail_idx[0] = index
                return int(error)
            for i in range(count):
                ctypes.memmove(d[i], s[i], n[i])
                self.rt.copies.append((d[i], s[i], n[i]))
            self.batches.append(count)
            self.rt.trace.append(("copy", int(stream)))
            return 0
        except Exception as exc:  # noqa: BLE001 - reported through errors
            self.errors.append(f"{type(exc).__name__}: {exc}")
            print(f"FakeDriver: {exc}", file=sys.stderr)
            return int(CUresult.CUDA_ERROR_INVALID_VALUE)
