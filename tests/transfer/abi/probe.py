"""Run by test_driver_abi.py in a subprocess whose LD_LIBRARY_PATH puts the stand-in
libcuda.so.1 first: kvsched's driver-level calls go through the real cuda-bindings driver module
into C. Prints one JSON object with what came back and what the stand-in saw."""

import ctypes
import json

import numpy as np
from cuda.bindings import driver

from kvsched.bench.gpu_compute import SPIN_PTX
from kvsched.transfer.driver_batch import DriverBatchCopier, c_array


class Seen(ctypes.Structure):
    _fields_ = [("proc_version", ctypes.c_int), ("proc_flags", ctypes.c_ulonglong),
                ("batch_calls", ctypes.c_int), ("count", ctypes.c_size_t), ("order", ctypes.c_int),
                ("flags", ctypes.c_uint), ("num_attrs", ctypes.c_size_t), ("attr_index", ctypes.c_size_t),
                ("stream", ctypes.c_void_p), ("image_head", ctypes.c_char * 32),
                ("function", ctypes.c_char * 64), ("param0", ctypes.c_ulonglong),
                ("launch_stream", ctypes.c_void_p), ("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3)]


lib = ctypes.CDLL("libcuda.so.1")
seen = Seen.in_dll(lib, "kvsched_fake_seen")
out = {}

copier = DriverBatchCopier(driver)
out["proc_version"], out["proc_flags"] = seen.proc_version, seen.proc_flags
src = np.arange(64 * 16, dtype=np.uint8)
dst = np.zeros_like(src)
order = np.random.default_rng(0).permutation(16).astype(np.int64)
srcs = (int(src.ctypes.data) + order * 64).tolist()          # a list: array.array path
dsts = int(dst.ctypes.data) + order[::-1] * 64                # numpy: in place
sizes = np.full(16, 64, dtype=np.int64)
(d, dk), (s, sk), (n, nk) = c_array(dsts), c_array(srcs), c_array(sizes)
rc, fail = copier(d + 8, s + 8, n + 8, 15, 0x5555)            # the last 15: a chunk's offsets
expect = np.zeros_like(src)
for k in range(1, 16):
    expect[order[::-1][k] * 64:order[::-1][k] * 64 + 64] = src[order[k] * 64:order[k] * 64 + 64]
out["copy"] = {"rc": rc, "exact": bool(np.array_equal(dst, expect)), "count": seen.count,
               "order": seen.order, "flags": seen.flags, "num_attrs": seen.num_attrs,
               "attr_index": seen.attr_index, "stream": seen.stream}
out["failure"] = list(copier(d, s, n, 3, 0x5555))
out["error_name"] = copier.error_name(700)

module = driver.cuModuleLoadData(ctypes.create_string_buffer(SPIN_PTX))
function = driver.cuModuleGetFunction(module[1], b"kvsched_spin_ns")
launch = driver.cuLaunchKernel(function[1], 1, 1, 1, 1, 1, 1, 0, driver.CUstream(0x7777),
                               ((123456789,), (ctypes.c_uint64,)), 0)
out["kernel"] = {"load": int(module[0]), "get": int(function[0]), "launch": int(launch[0]),
                 "image_head": seen.image_head.decode(), "function": seen.function.decode(),
                 "param0": seen.param0, "stream": seen.launch_stream,
                 "grid": list(seen.grid), "block": list(seen.block)}
print(json.dumps(out))
