"""The SM copy path: scattered block copies done by a small kernel instead of the copy engine.

Why: the copy engine spends about 1 us per copy, so small blocks are launch-bound however they are
batched (4-7 GB/s at 4-16 KiB on an H100 against ~50 GB/s for one contiguous copy: vLLM PR #42212;
docs/gpu_copies.md). A kernel with a few CTAs moves many small blocks at once over the same link,
reading or writing page-locked host memory through its device mapping.

The kernel (``kernels/sm_copy.cu``, shipped as PTX in ``kernels/sm_copy.ptx``) takes one table of
``3 * count`` 64-bit words: the copies' destinations, then sources, then sizes, i.e. the three
arrays the batched DMA path hands to ``cuMemcpyBatchAsync``, back to back. The table lives in
page-locked host memory that the kernel reads through the same mapping (one round trip per 32
copies per warp), so a launch needs no upload; each in-flight job holds its table until its event
completes (:class:`DescriptorTables`).

What this module does not do: choose the path (:mod:`kvsched.transfer.copy_path`), wait for
events or record them (the backend does both around :meth:`SmCopier.launch`, exactly as around a
batched DMA), or validate block ids (the plan did; :func:`check_bounds` is a second check of the
final addresses, because a kernel writing out of bounds corrupts memory silently).

``cuLaunchKernel`` is called through ctypes with a pointer from ``cuGetProcAddress``, as the batched
DMA path calls ``cuMemcpyBatchAsync``: a launch costs one foreign call, and ctypes releases the GIL
during it. Loading the module goes through cuda-bindings (once per backend).
"""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path
from typing import Any

import numpy as np

from kvsched.transfer.cudart import check, pinned_empty
from kvsched.transfer.driver_batch import driver_error_name
from kvsched.transfer.errors import CudaError

__all__ = [
    "SmCopier",
    "DescriptorTables",
    "KERNEL_NAME",
    "THREADS",
    "DEFAULT_CTAS",
    "LAUNCH_PROTOTYPE",
    "ptx_image",
    "launch_config",
    "pack_descriptors",
    "check_bounds",
    "device_maps_host_memory",
]

KERNEL_NAME = b"kvsched_sm_copy"
PTX_PATH = Path(__file__).resolve().parent / "kernels" / "sm_copy.ptx"
#: threads per CTA: 8 warps, one copy per warp at a time
THREADS = 256
#: CTAs of one launch. vLLM caps its copy kernel at 12 CTAs, "the smallest SM slice within 5 % of
#: peak at 8-32 KB" on an H100 (PR #42212); LMCache's uncapped kernels waited ~1.6 ms for SMs
#: during prefill. Unmeasured here until bench/cuda_calibrate.py runs (bench/RESULTS.md).
DEFAULT_CTAS = 12
MAX_CTAS = 1024
_LAUNCH_ABI = 4000  # cuLaunchKernel's prototype has not changed since CUDA 4.0
_CU_GET_PROC_ADDRESS_LEGACY_STREAM = 1

# CUresult cuLaunchKernel(CUfunction f, unsigned gridDimX, gridDimY, gridDimZ, blockDimX, blockDimY,
#     blockDimZ, unsigned sharedMemBytes, CUstream hStream, void **kernelParams, void **extra)
LAUNCH_PROTOTYPE = ctypes.CFUNCTYPE(
    ctypes.c_int,
    ctypes.c_void_p,
    ctypes.c_uint, ctypes.c_uint, ctypes.c_uint,
    ctypes.c_uint, ctypes.c_uint, ctypes.c_uint,
    ctypes.c_uint,
    ctypes.c_void_p,
    ctypes.POINTER(ctypes.c_void_p),
    ctypes.POINTER(ctypes.c_void_p),
)

_ptx_lock = threading.Lock()
_ptx: bytes | None = None


def ptx_image() -> bytes:
    """The shipped PTX, NUL-terminated (``cuModuleLoadData`` reads a C string)."""
    global _ptx
    with _ptx_lock:
        if _ptx is None:
            _ptx = PTX_PATH.read_bytes() + b"\0"
        return _ptx


def launch_config(count: int, max_ctas: int = DEFAULT_CTAS, threads: int = THREADS) -> tuple[int, int]:
    """``(CTAs, threads per CTA)`` for ``count`` copies: one warp per copy, so no more CTAs than
    the copies fill, and never more than ``max_ctas``."""
    if count < 1:
        raise ValueError("a launch needs at least one copy")
    if threads < 32 or threads % 32 or threads > 1024:
        raise ValueError(f"threads per CTA must be a multiple of 32 in [32, 1024], got {threads}")
    warps = threads // 32
    return max(1, min(int(max_ctas), -(-int(count) // warps))), threads


def pack_descriptors(table: np.ndarray, dsts: Any, srcs: Any, sizes: Any) -> int:
    """Write the copies into ``table`` (a uint64 array of at least ``3 * count`` words) in the
    kernel's layout: destinations, then sources, then sizes. Returns ``count``."""
    count = len(sizes)
    if len(dsts) != count or len(srcs) != count:
        raise ValueError("dsts, srcs and sizes differ in length")
    if table.dtype != np.uint64 or table.size < 3 * count:
        raise ValueError(f"table holds {table.size} words; {count} copies need {3 * count}")
    table[:count] = dsts
    table[count:2 * count] = srcs
    table[2 * count:3 * count] = sizes
    return count


def check_bounds(addrs: Any, sizes: Any, starts: np.ndarray, ends: np.ndarray) -> int:
    """Index of the first copy whose ``[addr, addr + size)`` lies outside every ``[starts[i],
    ends[i])`` (sorted, disjoint extents of a pool), or -1 when all are inside."""
    a = np.asarray(addrs, dtype=np.int64)
    n = np.asarray(sizes, dtype=np.int64)
    at = np.searchsorted(starts, a, side="right") - 1
    ok = (at >= 0) & (n > 0)
    safe = np.where(at >= 0, at, 0)
    ok &= a + n <= ends[safe]
    bad = np.flatnonzero(~ok)
    return int(bad[0]) if bad.size else -1


class DescriptorTables:
    """Page-locked descriptor tables, recycled: :meth:`take` one per job, :meth:`give` it back when
    the job's event has completed (the kernel reads it until then). Capacities are powers of two
    copies (at least 256), so a few sizes serve every job. Thread-safe."""

    def __init__(self, runtime: Any, *, keep: int = 8) -> None:
        self._rt = runtime
        self._keep = keep
        self._free: dict[int, list[np.ndarray]] = {}
        self._lock = threading.Lock()

    def take(self, count: int) -> np.ndarray:
        capacity = max(256, 1 << (int(count) - 1).bit_length())
        with self._lock:
            free = self._free.get(capacity)
            if free:
                return free.pop()
        return pinned_empty(3 * capacity, np.uint64, runtime=self._rt)

    def give(self, table: np.ndarray) -> None:
        capacity = table.size // 3
        with self._lock:
            free = self._free.setdefault(capacity, [])
            if len(free) < self._keep:
                free.append(table)  # beyond that, dropped: freed by the GC (cudaFreeHost)

    def clear(self) -> None:
        with self._lock:
            self._free.clear()


class SmCopier:
    """The SM copy kernel, loaded for the current device's primary context.

    ``driver``: cuda-bindings' driver module (or a stand-in with ``cuModuleLoadData``,
    ``cuModuleGetFunction``, ``cuModuleUnload``, ``cuGetProcAddress`` and ``cuGetErrorName``).
    The caller makes the device's context current first (``cudaFree(0)``, as for the batched DMA
    path). Raises :class:`CudaError` when the module cannot be loaded.
    """

    def __init__(self, driver: Any, *, max_ctas: int = DEFAULT_CTAS, threads: int = THREADS,
                 image: bytes | None = None) -> None:
        if not 1 <= int(max_ctas) <= MAX_CTAS:
            raise ValueError(f"sm_ctas must be in [1, {MAX_CTAS}], got {max_ctas}")
        launch_config(1, max_ctas, threads)  # checks threads
        self._driver = driver
        self.max_ctas, self.threads = int(max_ctas), int(threads)
        self._module: Any = None
        image = ctypes.create_string_buffer(image if image is not None else ptx_image()[:-1])
        self._module = self._check(driver.cuModuleLoadData(image), "cuModuleLoadData (the SM copy kernel's PTX)")
        try:
            function = self._check(driver.cuModuleGetFunction(self._module, KERNEL_NAME), "cuModuleGetFunction")
            self._function = ctypes.c_void_p(int(function))
            flags = getattr(getattr(driver, "CUdriverProcAddress_flags", None), "CU_GET_PROC_ADDRESS_LEGACY_STREAM",
                            _CU_GET_PROC_ADDRESS_LEGACY_STREAM)
            res = driver.cuGetProcAddress(b"cuLaunchKernel", _LAUNCH_ABI, flags)
            res = res if isinstance(res, tuple) else (res,)
            address = int(res[1]) if int(res[0]) == 0 and len(res) > 1 and res[1] is not None else 0
            if address == 0:
                raise CudaError("cuGetProcAddress(cuLaunchKernel) found no function")
            self._launch = LAUNCH_PROTOTYPE(address)
        except BaseException:
            self.close()
            raise

    def launch(self, table: int, count: int, stream: int) -> int:
        """Queue the kernel for ``count`` copies described at ``table`` (device-readable, see the
        module docstring) on ``stream``; returns the ``CUresult``. Arguments are not checked here."""
        grid, threads = launch_config(count, self.max_ctas, self.threads)
        table_arg, count_arg = ctypes.c_uint64(table), ctypes.c_uint64(count)
        params = (ctypes.c_void_p * 2)(ctypes.addressof(table_arg), ctypes.addressof(count_arg))
        return int(self._launch(self._function, grid, 1, 1, threads, 1, 1, 0, stream, params, None))

    def error_name(self, code: int) -> str:
        return driver_error_name(self._driver, code)

    def close(self) -> None:
        """Unload the module. Idempotent; only once no launch of it can still be running."""
        module, self._module = self._module, None
        if module is not None:
            try:
                self._driver.cuModuleUnload(module)
            except Exception:  # noqa: BLE001 - never raise from close
                pass

    def _check(self, result: Any, what: str) -> Any:
        result = result if isinstance(result, tuple) else (result,)
        if int(result[0]) != 0:
            text = driver_error_name(self._driver, int(result[0]))
            raise CudaError(f"{what} failed: {text}", code=int(result[0]), name=text.split(" ", 1)[0])
        return result[1] if len(result) == 2 else None


def device_maps_host_memory(rt: Any, device: int) -> tuple[bool, str]:
    """Whether kernels on ``device`` can use page-locked host addresses as they are (unified
    addressing, and registered memory usable through its host pointer). Never raises."""
    attr = getattr(rt, "cudaDeviceAttr", None)
    if attr is None:
        return False, "the runtime has no cudaDeviceGetAttribute"
    for name in ("cudaDevAttrUnifiedAddressing", "cudaDevAttrCanUseHostPointerForRegisteredMem"):
        try:
            value = check(rt, rt.cudaDeviceGetAttribute(getattr(attr, name), device), "cudaDeviceGetAttribute")
        except Exception as exc:  # noqa: BLE001
            return False, f"{name}: {exc}"
        if not int(value):
            return False, f"cuda:{device} lacks {name}"
    return True, "host memory is device-mapped"
