"""The engine simulation's GPU layers: a timed kernel on a compute stream (``--backend cuda``).

Each layer is one launch of a kernel that spins on the GPU's nanosecond clock (``%globaltimer``)
for the layer's compute time: the compute stream is busy for that long, as with a real layer,
and the CPU only launches it. The kernel is a few lines of hand-written PTX (ISA 7.0, sm_70) that
the driver compiles for the GPU at load time (``cuModuleLoadData``), so no compiler, NVRTC, torch
or cupy is needed: cuda-bindings and a driver are enough.

Around the kernels, :class:`GpuCompute` offers what a serving engine does on its compute stream:
wait for a load's completion event before the layer that reads it (``wait_for``), record an event
after a layer for the stores that read its output (``record``), and synchronise once per
iteration (the engine samples tokens on the CPU). Timing events around each layer give the GPU
timeline of a pass (:meth:`GpuCompute.layer_spans`).
"""

from __future__ import annotations

import ctypes
from typing import Any

from ..transfer.cudart import check, load_runtime
from ..transfer.driver_batch import driver_error_name
from ..transfer.errors import CudaError

__all__ = ["GpuCompute", "SPIN_PTX"]

# extern "C" __global__ void kvsched_spin_ns(unsigned long long ns):
#     start = %globaltimer; while (%globaltimer - start < ns) {}
SPIN_PTX = b"""
.version 7.0
.target sm_70
.address_size 64

.visible .entry kvsched_spin_ns(
    .param .u64 kvsched_spin_ns_param_0
)
{
    .reg .pred %p<2>;
    .reg .b64 %rd<5>;

    ld.param.u64 %rd1, [kvsched_spin_ns_param_0];
    mov.u64 %rd2, %globaltimer;
$L_spin:
    mov.u64 %rd3, %globaltimer;
    sub.s64 %rd4, %rd3, %rd2;
    setp.lt.u64 %p1, %rd4, %rd1;
    @%p1 bra $L_spin;
    ret;
}
"""


class GpuCompute:
    """A compute stream running timed "layers". Create and use it on one thread (the forward
    thread); :meth:`close` releases the stream, events and module. Events live until close:
    a pass makes three per layer (start and end for the timeline, one for the layer's stores)."""

    def __init__(self, device: int | None = None) -> None:
        """``device``: the GPU (default: the calling thread's current one, as TransferEngine's)."""
        from cuda.bindings import driver

        self._rt, self._drv = load_runtime(), driver
        rt = self._rt
        previous = int(check(rt, rt.cudaGetDevice(), "cudaGetDevice"))
        self.device = previous if device is None else int(device)
        self._all: list[Any] = []      # every event made, destroyed by close()
        self._spans: list[tuple[Any, Any]] = []  # timing events around each layer of this pass
        self._timing_spare: list[Any] = []  # made by start_pass, never recorded yet
        self._plain_spare: list[Any] = []
        self._origin: Any = None
        self._module: Any = None
        self.stream: Any = None
        try:
            check(rt, rt.cudaSetDevice(self.device), "cudaSetDevice")
            # The driver API has no implicit context: make the device's primary context (the one
            # the runtime and the transfer engine's streams use) current on this thread.
            check(rt, rt.cudaFree(0), "cudaFree(0)")
            image = ctypes.create_string_buffer(SPIN_PTX)  # NUL-terminated, as cuModuleLoadData wants
            self._module = self._check(driver.cuModuleLoadData(image), "cuModuleLoadData (the spin kernel's PTX)")
            self._kernel = self._check(driver.cuModuleGetFunction(self._module, b"kvsched_spin_ns"),
                                       "cuModuleGetFunction")
            self.stream = check(rt, rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking),
                                "cudaStreamCreateWithFlags")
        except BaseException:
            self.close()
            raise
        finally:
            # Launches and records name the stream, which carries its device: the caller's
            # current device can stay what it was.
            rt.cudaSetDevice(previous)

    # ------------------------------------------------------------------------------ per layer

    def start_pass(self, layers: int = 0) -> None:
        """Forget the previous pass's spans, make the events for ``layers`` layers now (so the
        forward thread does not create them layer by layer), and mark time zero on the stream."""
        self._spans = []
        self._timing_spare = [self._new_event(self._rt.cudaEventDefault) for _ in range(2 * layers)]
        self._plain_spare = [self._new_event(self._rt.cudaEventDisableTiming) for _ in range(layers)]
        self._origin = self._new_event(self._rt.cudaEventDefault)
        check(self._rt, self._rt.cudaEventRecord(self._origin, self.stream), "cudaEventRecord")

    def wait_for(self, job: Any) -> None:
        """The compute stream waits (on the GPU) for a load's copies; the CPU does not."""
        if job is not None:
            job.wait_on(self.stream)

    def layer(self, seconds: float) -> None:
        """Launch one layer: the kernel keeps the compute stream busy for ``seconds``."""
        rt, drv = self._rt, self._drv
        start, end = self._timing_event(), self._timing_event()
        check(rt, rt.cudaEventRecord(start, self.stream), "cudaEventRecord")
        ns = max(0, int(seconds * 1e9))
        self._check(drv.cuLaunchKernel(self._kernel, 1, 1, 1, 1, 1, 1, 0, self.stream,
                                       ((ns,), (ctypes.c_uint64,)), 0), "cuLaunchKernel")
        check(rt, rt.cudaEventRecord(end, self.stream), "cudaEventRecord")
        self._spans.append((start, end))

    def record(self) -> Any:
        """An event recorded on the compute stream now (after the layers launched so far): what a
        store of those layers' blocks passes as ``compute_event``."""
        # An event never recorded before: a store decided late may still be submitted with it
        # after the iteration's sync, so re-recording a used one could move what it waits for.
        rt = self._rt
        event = self._plain_spare.pop() if self._plain_spare else self._new_event(rt.cudaEventDisableTiming)
        check(rt, rt.cudaEventRecord(event, self.stream), "cudaEventRecord")
        return event

    def synchronize(self) -> None:
        check(self._rt, self._rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def layer_spans(self) -> list[tuple[float, float]]:
        """(start, end) seconds of each layer of this pass on the GPU, from :meth:`start_pass`.
        Synchronises the stream."""
        rt = self._rt
        self.synchronize()
        out = []
        for start, end in self._spans:
            a = check(rt, rt.cudaEventElapsedTime(self._origin, start), "cudaEventElapsedTime")
            b = check(rt, rt.cudaEventElapsedTime(self._origin, end), "cudaEventElapsedTime")
            out.append((float(a) / 1e3, float(b) / 1e3))
        return out

    # ------------------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Wait for the stream, then release it, the events and the kernel's module. Idempotent."""
        rt = self._rt
        try:
            if self.stream is not None:
                rt.cudaStreamSynchronize(self.stream)
        finally:
            for event in self._all:
                rt.cudaEventDestroy(event)
            self._all, self._spans, self._timing_spare, self._plain_spare = [], [], [], []
            if self.stream is not None:
                rt.cudaStreamDestroy(self.stream)
                self.stream = None
            if self._module is not None:
                self._drv.cuModuleUnload(self._module)
                self._module = None

    def __enter__(self) -> "GpuCompute":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------------------ helpers

    def _timing_event(self) -> Any:
        return self._timing_spare.pop() if self._timing_spare else self._new_event(self._rt.cudaEventDefault)

    def _new_event(self, flags: Any) -> Any:
        # An event belongs to the device current when it is made: this stream's, for the caller's
        # current device may be another.
        rt = self._rt
        current = int(check(rt, rt.cudaGetDevice(), "cudaGetDevice"))
        if current != self.device:
            check(rt, rt.cudaSetDevice(self.device), "cudaSetDevice")
        try:
            event = check(rt, rt.cudaEventCreateWithFlags(flags), "cudaEventCreateWithFlags")
        finally:
            if current != self.device:
                rt.cudaSetDevice(current)
        self._all.append(event)
        return event

    def _check(self, result: Any, what: str) -> Any:
        """The payload of a driver call's result tuple, or CudaError naming the call and error."""
        result = result if isinstance(result, tuple) else (result,)
        if int(result[0]) != 0:
            text = driver_error_name(self._drv, int(result[0]))
            raise CudaError(f"{what} failed: {text}", code=int(result[0]), name=text.split(" ", 1)[0])
        return result[1] if len(result) == 2 else None
