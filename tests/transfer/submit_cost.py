"""Host CPU time of ``TransferEngine.submit`` on the cuda backend, without a GPU.

A development measurement, not a test (it lives beside the test suite's stand-ins for the CUDA
runtime and driver, ``fake_cudart.py``, which it uses, and pytest does not collect it); it reaches into the engine to swap the driver
function and to abandon the jobs that never complete.

The CUDA runtime and driver are the stand-ins of the test suite
with the copy calls made free of the driver's work: what is timed is the submitting thread's work
per job (checks, planning, addresses, the batch call's host side, event bookkeeping) for the two
batch paths side by side: "C arrays" (``cuMemcpyBatchAsync`` through ctypes; the stand-in driver
function is a C function that returns at once) and "lists" (cuda-bindings' real
``cudaMemcpyBatchAsync``, which converts its three Python lists before it finds that there is no
driver; see ``bench/batch_args_cost.py``). Runs only where no CUDA device is usable.

    python tests/transfer/submit_cost.py
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import tempfile
import threading
import time
from typing import Any, Callable

import numpy as np

# Run as a script, so its own directory (tests/transfer) is on sys.path.
from fake_cudart import FakeDriver, FakeRuntime
from transfer_helpers import FakeHandle

from kvsched.pool import BlockPool
from kvsched.transfer.cudart import DeviceBuffer, cuda_available, pinned_empty
from kvsched.transfer.driver_batch import BATCH_PROTOTYPE, DriverBatchCopier
from kvsched.transfer.engine import TransferEngine


class _FreeDriver(FakeDriver):
    """cuMemcpyBatchAsync is a C function that returns CUDA_SUCCESS at once (compiled here with
    the system C compiler; a ctypes callback into Python would cost ~10 us per call itself)."""

    def __init__(self, rt: FakeRuntime) -> None:
        super().__init__(rt)
        self._lib = _compile_nothing()
        self._function = BATCH_PROTOTYPE(ctypes.cast(self._lib.kvsched_nothing, ctypes.c_void_p).value)


def _compile_nothing() -> ctypes.CDLL:
    tmp = tempfile.mkdtemp()
    src, lib = os.path.join(tmp, "nothing.c"), os.path.join(tmp, "libnothing.so")
    with open(src, "w") as f:
        f.write("#include <stddef.h>\n"  # cuMemcpyBatchAsync's prototype (CUDA 12.8 ABI)
                "int kvsched_nothing(void *dsts, void *srcs, void *sizes, size_t count, void *attrs,\n"
                "                    void *attr_idxs, size_t num_attrs, void *fail_idx, void *stream)\n"
                "{ return 0; }\n")
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        raise SystemExit("needs a C compiler (cc) for the free stand-in driver call")
    subprocess.run([cc, "-O2", "-shared", "-fPIC", src, "-o", lib], check=True)
    return ctypes.CDLL(lib)


def _converting_batch_call() -> Callable[..., tuple[int]]:
    """The Python-list batch call as it costs on a GPU machine minus the driver: cuda-bindings'
    real ``cudaMemcpyBatchAsync`` converts the three lists, then finds no driver. Only where no
    CUDA device works (elsewhere the made-up addresses would be copied for real)."""
    from cuda.bindings import runtime as real

    if cuda_available(real)[0]:
        raise SystemExit("a CUDA device is usable here: this measurement is for machines without one")
    attrs = [real.cudaMemcpyAttributes()]

    def call(d: list, s: list, n: list, count: int, a: Any, i: Any, na: int, stream: Any) -> tuple[int]:
        real.cudaMemcpyBatchAsync(d, s, n, count, attrs, i, na, 0)
        return (0,)

    return call


def main() -> None:
    rt = FakeRuntime(not_ready_polls=10**9)  # jobs stay in flight: the reaper stays out of the way
    rt.bound_threads.add(threading.get_ident())
    engines = {}
    for mode in ("driver", "bindings"):
        engines[mode] = TransferEngine(None, backend="cuda", runtime=rt, driver=FakeDriver(rt), batch=mode,
                                       max_pending=10**6, max_stream_ops=10**9, poll_interval=(1e-2, 1e-2))
    engines["driver"]._cuda._copier = DriverBatchCopier(_FreeDriver(rt))  # after the self-tests
    rt.cudaMemcpyBatchAsync = _converting_batch_call()
    print(f"{'copies':>7} {'C arrays us':>12} {'lists us':>10} {'C arrays ns/copy':>17} {'lists ns/copy':>14}")
    for n in (4, 32, 256, 1024, 16384):
        host = pinned_empty((1, 2 * n, 64), runtime=rt)
        dev = DeviceBuffer((1, 2 * n, 64), runtime=rt)
        hp, dp = BlockPool.from_array(host), BlockPool.from_array(dev)
        rng = np.random.default_rng(0)
        pairs = np.stack([rng.permutation(2 * n)[:n], rng.permutation(2 * n)[:n]], 1)
        best = {mode: float("inf") for mode in engines}
        reps = max(3, 2000 // n)
        for _ in range(7):  # rounds alternate the two paths, so drift hits both alike
            for mode, eng in engines.items():
                handles = [FakeHandle() for _ in range(reps)]
                t0 = time.perf_counter()
                for h in handles:
                    eng.submit(h, hp, dp, pairs)
                best[mode] = min(best[mode], (time.perf_counter() - t0) / reps)
        d, b = best["driver"], best["bindings"]
        print(f"{n:7d} {d * 1e6:12.1f} {b * 1e6:10.1f} {d / n * 1e9:17.0f} {b / n * 1e9:14.0f}")
    print("per job, best of 7 rounds; the stand-in runtime's device query and event record are Python")
    print("calls where cuda-bindings has compiled ones, and the driver's own work is left out")
    for eng in engines.values():  # the jobs never complete on the stand-in: abandon them
        eng._cuda._inflight = {k: type(v)() for k, v in eng._cuda._inflight.items()}
        eng._cuda._pending = 0
        eng.close(timeout=1)


if __name__ == "__main__":
    main()
