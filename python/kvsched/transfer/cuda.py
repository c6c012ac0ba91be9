"""cuda backend: block copies on CUDA copy streams, completion reaped by one thread per engine.

Design (SPEC section 4):

* **Streams.** One non-blocking stream per direction: ``h2d`` (loads), ``d2h`` (stores) and
  ``d2d``. Copies never synchronise with the legacy default stream, and loads never queue behind
  stores.
* **Launch on the caller's thread, without blocking.** ``submit`` issues the copies and records
  the job's event before it returns, so a load's completion event exists as soon as ``submit``
  returns and the compute stream can wait on it (:meth:`TransferJob.wait_on`). Host pools are
  page-locked (``cudaHostRegister``, once per pool) so the copies are asynchronous DMA.
* **Bounded submission.** At most ``max_pending`` unfinished jobs, and at most ``max_stream_ops``
  queued operations per stream (CUDA stream queues hold about a thousand entries; past that,
  ``cudaMemcpyAsync`` blocks the calling thread). Over either bound ``submit`` raises
  :class:`TransferQueueFullError` at once and launches nothing: the caller keeps the handle and
  retries later (a job larger than the whole budget is admitted when its stream is idle).
* **Coalescing and batching.** Runs of consecutive blocks are one copy per (layer, piece)
  (:mod:`kvsched.transfer.plan`). Many copies go to the driver in one ``cudaMemcpyBatchAsync``
  call (CUDA >= 12.8; chunks of ``batch_chunk``) when a self-test at start-up passed; else one
  ``cudaMemcpyAsync`` per copy. Batched copies use ``cudaMemcpySrcAccessOrderStream`` so a source
  is read in stream order, after the events the stream waited on. Measured on an H200 (driver
  580, cuda-bindings 13.3): the batched call costs about 0.7-1.7 us per copy on the host, the
  loop about 2.6 us, so scattered 4-16 KiB blocks stay launch-bound (a few GB/s against a 54 GB/s
  peak); larger runs (a block layout that keeps a request's blocks adjacent) are what fix that.
* **GPU-side ordering.** ``compute_event`` (a store must not read a block before the compute
  stream wrote it) and ``wait_event`` (a load must not overwrite a reused block before the compute
  stream's last read of it) are waited on by the copy stream with ``cudaStreamWaitEvent``; the
  CPU never waits. A job's own event can be waited on by the compute stream (``job.wait_on``).
* **Completion.** One event per job (from a recycled pool, ``cudaEventDisableTiming``). One reaper
  thread per engine polls the oldest event of each stream with ``cudaEventQuery`` (jobs on one
  stream finish in order), backing off from ``poll_interval[0]`` to ``poll_interval[1]`` seconds
  while nothing completes and sleeping on a condition when idle. It marks the handles. No thread
  per job, no host callbacks.
* **Errors.** Every CUDA return code is checked; a failure becomes :class:`CudaError` naming the
  call and the error. A failure while launching marks the job failed once the copies that did
  launch have drained (its event still completes in stream order), so the engine never reuses
  blocks a DMA may still be writing.

The runtime module is injectable (``runtime=``) so the logic is testable on machines without a GPU.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections import deque
from typing import Any, Callable, Iterator

import numpy as np

from kvsched.errors import InvalidArgumentError
from kvsched.pool import BlockPool
from kvsched.transfer.cudart import (
    DeviceBuffer,
    HostRegistration,
    as_event_handle,
    as_stream_handle,
    check,
    cuda_available,
    error_name,
    load_runtime,
    pinned_empty,
)
from kvsched.transfer.errors import CudaError, TransferEngineClosedError, TransferQueueFullError
from kvsched.transfer.job import TransferJob

__all__ = ["CudaBackend", "KINDS"]

log = logging.getLogger("kvsched")

KINDS = ("h2d", "d2h", "d2d")


class _GpuState:
    """What the backend tracks for an in-flight job."""

    __slots__ = ("kind", "event", "ops", "error", "done")

    def __init__(self, kind: str, event: Any, ops: int, error: BaseException | None) -> None:
        self.kind = kind
        self.event = event
        self.ops = ops
        self.error = error
        self.done = False


class CudaBackend:
    """Copies between host and device pools of one GPU. See the module docstring."""

    name = "cuda"

    def __init__(
        self,
        *,
        device: int | None = None,
        max_pending: int = 1024,
        max_stream_ops: int = 512,
        batch: bool | str = "auto",
        batch_chunk: int = 4096,
        auto_pin: bool = True,
        poll_interval: tuple[float, float] = (20e-6, 500e-6),
        fault_hook: Callable[[TransferJob], None] | None = None,
        runtime: Any = None,
    ) -> None:
        rt = runtime if runtime is not None else load_runtime()
        ok, reason = cuda_available(rt)
        if not ok:
            raise CudaError(f"no usable CUDA device: {reason}")
        if int(max_pending) < 1 or int(max_stream_ops) < 1 or int(batch_chunk) < 1:
            raise InvalidArgumentError("max_pending, max_stream_ops and batch_chunk must be >= 1")
        self._rt = rt
        self.device = int(device) if device is not None else int(check(rt, rt.cudaGetDevice(), "cudaGetDevice"))
        self.max_pending = int(max_pending)
        self.max_stream_ops = int(max_stream_ops)
        self.batch_chunk = int(batch_chunk)
        self.auto_pin = bool(auto_pin)
        self.fault_hook = fault_hook
        self._poll_min, self._poll_max = (float(poll_interval[0]), float(poll_interval[1]))
        self._memcpy_default = rt.cudaMemcpyKind.cudaMemcpyDefault
        self._not_ready = int(rt.cudaError_t.cudaErrorNotReady)

        self._cond = threading.Condition()  # guards everything below that the reaper touches
        self._launch_lock = threading.Lock()  # launch order on a stream == order in its deque
        self._inflight: dict[str, deque[TransferJob]] = {k: deque() for k in KINDS}
        self._stream_ops = {k: 0 for k in KINDS}
        self._pending = 0
        self._free_events: list[Any] = []
        self._all_events: list[Any] = []
        self._closing = False
        self._stopping = False
        self._closed = False

        self._streams: dict[str, Any] = {}
        with self._on_device():
            for kind in KINDS:
                self._streams[kind] = check(
                    rt, rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking), "cudaStreamCreateWithFlags"
                )
        self.runtime_version = _version(rt, "cudaRuntimeGetVersion")
        self.driver_version = _version(rt, "cudaDriverGetVersion")
        self._batch_attrs: list[Any] = []
        self.batch_enabled, self.batch_reason = self._setup_batch(batch)
        self._reaper = threading.Thread(target=self._reap, name="kvsched-cuda-reaper", daemon=True)
        self._reaper.start()

    # ------------------------------------------------------------------------------ public

    @property
    def pending(self) -> int:
        return self._pending

    def stream(self, kind: str) -> int:
        """Raw handle (int) of the copy stream for ``kind`` ("h2d", "d2h" or "d2d")."""
        return int(self._streams[kind])

    def submit(self, job: TransferJob, compute_event: Any = None, wait_event: Any = None) -> None:
        """Launch ``job``'s copies on its direction's stream and record its event. Raises before
        launching anything on bad arguments or when the bounds are reached."""
        rt, plan, kind = self._rt, job.plan, job.kind
        if kind not in self._streams:
            raise InvalidArgumentError(f"the cuda backend does not run {kind} copies")
        for pool in (plan.src, plan.dst):
            if pool.is_cuda and pool.device_index != self.device:
                raise InvalidArgumentError(
                    f"pool on {pool.device} but this engine drives cuda:{self.device}; use one engine per GPU"
                )
        waits = [rt.cudaEvent_t(as_event_handle(e)) for e in _as_list(compute_event) + _as_list(wait_event)]
        self._prepare(plan.src)
        self._prepare(plan.dst)
        srcs, dsts, sizes = plan.segments()
        count = int(srcs.size)
        batched = self.batch_enabled and count > 1
        ops = len(waits) + (math.ceil(count / self.batch_chunk) if batched else count) + 1

        with self._cond:
            if self._closing:
                raise TransferEngineClosedError("the transfer engine is closed")
            if self._pending >= self.max_pending:
                raise TransferQueueFullError(
                    f"{self._pending} transfers in flight (max_pending={self.max_pending}); "
                    f"request {job.request_id!r} op {job.uuid} was not submitted, retry later"
                )
            queued = self._stream_ops[kind]
            if queued and queued + ops > self.max_stream_ops:
                raise TransferQueueFullError(
                    f"the {kind} copy stream has {queued} queued operations and this job needs {ops} "
                    f"(max_stream_ops={self.max_stream_ops}); request {job.request_id!r} op {job.uuid} "
                    "was not submitted, retry later"
                )
            self._pending += 1
            self._stream_ops[kind] += ops

        job._gpu = self
        stream = self._streams[kind]
        with self._launch_lock:
            launch_error: BaseException | None = None
            event = None
            try:
                with self._on_device():
                    try:
                        if self.fault_hook is not None:
                            self.fault_hook(job)
                        for ev in waits:
                            check(rt, rt.cudaStreamWaitEvent(stream, ev, 0), "cudaStreamWaitEvent")
                        if batched:
                            self._launch_batched(dsts, srcs, sizes, stream)
                        else:
                            self._launch_loop(dsts, srcs, sizes, stream)
                    except Exception as exc:  # noqa: BLE001 - becomes the job's failure
                        launch_error = exc
                    event = self._take_event()
                    check(rt, rt.cudaEventRecord(event, stream), "cudaEventRecord")
            except Exception as exc:  # noqa: BLE001 - no event: finish here, after the stream drained
                self._fail_untracked(job, kind, ops, event, stream, launch_error or exc)
                return
            with self._cond:
                job._cuda = _GpuState(kind, event, ops, launch_error)
                self._inflight[kind].append(job)
                self._cond.notify_all()

    def wait_on(self, job: TransferJob, stream: Any) -> None:
        """Make ``stream`` wait (on the GPU) for ``job``'s copies; no-op once the job completed."""
        rt = self._rt
        handle = rt.cudaStream_t(as_stream_handle(stream))
        with self._cond:
            state = getattr(job, "_cuda", None)
            if state is None or state.done:
                return
            check(rt, rt.cudaStreamWaitEvent(handle, state.event, 0), "cudaStreamWaitEvent")

    def event_of(self, job: TransferJob) -> int | None:
        with self._cond:
            state = getattr(job, "_cuda", None)
            return None if state is None or state.done else int(state.event)

    def wait_idle(self, timeout: float | None = None) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._pending == 0, timeout)

    def close(self, timeout: float | None = None) -> bool:
        """Wait for every in-flight job, stop the reaper, destroy streams and events. Idempotent.
        Returns False (and keeps the resources) if ``timeout`` expired first."""
        with self._cond:
            if self._closed:
                return True
            self._closing = True
            if not self._cond.wait_for(lambda: self._pending == 0, timeout):
                log.warning("kvsched: cuda backend close timed out with %d transfers in flight", self._pending)
                return False
            self._stopping = True
            self._cond.notify_all()
        if self._reaper is not threading.current_thread():
            self._reaper.join()
        rt = self._rt
        with self._cond:
            if self._closed:
                return True
            self._closed = True
            events, self._all_events, self._free_events = self._all_events, [], []
        try:
            with self._on_device():
                for ev in events:
                    _quiet(rt.cudaEventDestroy, ev)
                for stream in self._streams.values():
                    _quiet(rt.cudaStreamDestroy, stream)
        except Exception as exc:  # noqa: BLE001 - never raise from close
            log.warning("kvsched: cuda backend cleanup failed: %s", exc)
        return True

    def abandon(self) -> None:
        """Stop the reaper once idle without waiting (the engine was garbage-collected)."""
        with self._cond:
            self._closing = True
            if self._pending == 0:
                self._stopping = True
            self._cond.notify_all()

    # ------------------------------------------------------------------------------ launching

    def _launch_loop(self, dsts: np.ndarray, srcs: np.ndarray, sizes: np.ndarray, stream: Any) -> None:
        rt, kind = self._rt, self._memcpy_default
        memcpy = rt.cudaMemcpyAsync
        for d, s, n in zip(dsts.tolist(), srcs.tolist(), sizes.tolist()):
            res = memcpy(d, s, n, kind, stream)
            if int(res[0]) != 0:
                check(rt, res, "cudaMemcpyAsync")

    def _launch_batched(self, dsts: np.ndarray, srcs: np.ndarray, sizes: np.ndarray, stream: Any) -> None:
        rt, chunk, attrs = self._rt, self.batch_chunk, self._batch_attrs
        for start in range(0, int(dsts.size), chunk):
            d = dsts[start : start + chunk].tolist()
            s = srcs[start : start + chunk].tolist()
            n = sizes[start : start + chunk].tolist()
            # CUDA 12.8/12.9 bindings return (err, failIdx); CUDA 13 dropped failIdx: (err,).
            res = rt.cudaMemcpyBatchAsync(d, s, n, len(d), attrs, [0], 1, stream)
            if int(res[0]) != 0:
                where = f" (copy {start + int(res[1])})" if len(res) > 1 and res[1] is not None else ""
                raise CudaError(
                    f"cudaMemcpyBatchAsync failed{where}: {error_name(rt, res[0])}",
                    code=int(res[0]),
                    name=error_name(rt, res[0]).split(" ", 1)[0],
                )

    def _take_event(self) -> Any:
        with self._cond:
            if self._free_events:
                return self._free_events.pop()
        rt = self._rt
        event = check(rt, rt.cudaEventCreateWithFlags(rt.cudaEventDisableTiming), "cudaEventCreateWithFlags")
        with self._cond:
            self._all_events.append(event)
        return event

    def _fail_untracked(
        self, job: TransferJob, kind: str, ops: int, event: Any, stream: Any, error: BaseException
    ) -> None:
        """No event could be recorded: wait for the stream here (error path only) so no DMA of
        this job is still running when its handle is marked failed."""
        with contextlib.suppress(Exception):
            self._rt.cudaStreamSynchronize(stream)
        job._cuda = _GpuState(kind, event, ops, error)
        job._cuda.done = True
        with self._cond:
            self._stream_ops[kind] -= ops  # the event (if any) may be broken: not reused
        job._finish(error)
        with self._cond:
            self._pending -= 1
            self._cond.notify_all()

    # ------------------------------------------------------------------------------ reaping

    def _reap(self) -> None:
        delay = self._poll_min
        while True:
            with self._cond:
                while not self._stopping and not any(self._inflight.values()):
                    self._cond.wait()
                    delay = self._poll_min
                if self._stopping and not any(self._inflight.values()):
                    return
                heads = [dq[0] for dq in self._inflight.values() if dq]
            progressed = False
            for job in heads:
                while job is not None:
                    finished, job = self._try_complete(job)
                    if not finished:
                        break
                    progressed = True
            if progressed:
                delay = self._poll_min
            else:
                time.sleep(delay)
                delay = min(delay * 2, self._poll_max)

    def _try_complete(self, job: TransferJob) -> tuple[bool, TransferJob | None]:
        """If ``job`` (the oldest on its stream) is done, finish it; return (done, next job)."""
        rt, state = self._rt, job._cuda
        try:
            res = rt.cudaEventQuery(state.event)
            code = int(res[0] if isinstance(res, tuple) else res)
        except Exception as exc:  # noqa: BLE001
            code, failure = -1, exc
        else:
            if code == self._not_ready:
                return False, None
            failure = None if code == 0 else CudaError(
                f"cudaEventQuery failed: {error_name(rt, res[0])}", code=code
            )
        with self._cond:
            queue = self._inflight[state.kind]
            if queue and queue[0] is job:
                queue.popleft()
            state.done = True
            self._stream_ops[state.kind] -= state.ops
            if code == 0:
                self._free_events.append(state.event)  # a failed event is not reused
            nxt = queue[0] if queue else None
        job._finish(state.error or failure)
        with self._cond:
            self._pending -= 1
            self._cond.notify_all()
        return True, nxt

    # ------------------------------------------------------------------------------ setup

    @contextlib.contextmanager
    def _on_device(self) -> Iterator[None]:
        """Run CUDA calls with this engine's device current, restoring the caller's device."""
        rt = self._rt
        current = int(check(rt, rt.cudaGetDevice(), "cudaGetDevice"))
        if current == self.device:
            yield
            return
        check(rt, rt.cudaSetDevice(self.device), "cudaSetDevice")
        try:
            yield
        finally:
            rt.cudaSetDevice(current)

    def _prepare(self, pool: BlockPool) -> None:
        """Once per pool: check that device pools are on this GPU, page-lock host pools."""
        key = ("cuda_ready", self.device)
        if pool._cache.get(key):
            return
        rt = self._rt
        memory_type = rt.cudaMemoryType
        if pool.is_cuda:
            for layer, ptr in enumerate(pool.layer_ptrs):
                attrs = _pointer_attributes(rt, ptr)
                kind = None if attrs is None else int(attrs.type)
                if kind == int(memory_type.cudaMemoryTypeDevice) or kind == int(memory_type.cudaMemoryTypeManaged):
                    if int(attrs.device) != self.device:
                        raise InvalidArgumentError(
                            f"layer {layer} of a {pool.device} pool lives on cuda:{int(attrs.device)}"
                        )
                else:
                    raise InvalidArgumentError(
                        f"layer {layer} of a {pool.device} pool is not device memory (address {ptr:#x})"
                    )
        else:
            for addr, size in pool.extents():
                attrs = _pointer_attributes(rt, addr)
                if attrs is not None and int(attrs.type) == int(memory_type.cudaMemoryTypeHost):
                    continue  # cudaMallocHost, torch pin_memory, or registered already
                if not self.auto_pin:
                    log.warning(
                        "kvsched: host pool memory at %#x is pageable: copies will be synchronous "
                        "(use kvsched.transfer.pinned_empty or auto_pin=True)",
                        addr,
                    )
                    continue
                try:
                    reg = HostRegistration(rt, addr, size, owner=pool.owners)
                except CudaError as exc:
                    if "AlreadyRegistered" in exc.name:
                        continue
                    log.warning(
                        "kvsched: cudaHostRegister of %d bytes at %#x failed (%s): copies from this "
                        "pageable memory will be synchronous",
                        size,
                        addr,
                        exc,
                    )
                    continue
                # Lives as long as the pool: unregistered when the pool is garbage-collected.
                pool._cache[("cuda_pin", addr)] = reg
                log.info("kvsched: page-locked %d bytes of a host pool for cuda:%d", size, self.device)
        pool._cache[key] = True

    def _setup_batch(self, batch: bool | str) -> tuple[bool, str]:
        if batch is False or batch == "off":
            return False, "disabled (batch=False)"
        if batch not in (True, "auto", "on"):
            raise InvalidArgumentError(f"batch must be 'auto', True or False, got {batch!r}")
        rt = self._rt
        if getattr(rt, "cudaMemcpyBatchAsync", None) is None or getattr(rt, "cudaMemcpyAttributes", None) is None:
            reason = "cuda-bindings has no cudaMemcpyBatchAsync (needs cuda-bindings >= 12.8)"
        elif min(self.runtime_version, self.driver_version) < 12080:
            reason = f"CUDA {self.runtime_version} runtime / {self.driver_version} driver (batched copies need 12.8)"
        else:
            attrs = rt.cudaMemcpyAttributes()
            attrs.srcAccessOrder = rt.cudaMemcpySrcAccessOrder.cudaMemcpySrcAccessOrderStream
            self._batch_attrs = [attrs]
            try:
                self._batch_self_test()
                return True, "cudaMemcpyBatchAsync (self-test passed)"
            except Exception as exc:  # noqa: BLE001
                reason = f"cudaMemcpyBatchAsync self-test failed: {type(exc).__name__}: {exc}"
        if batch in (True, "on"):
            raise CudaError(f"batch=True but batched copies are unusable: {reason}")
        log.info("kvsched: cuda backend copies one cudaMemcpyAsync per run: %s", reason)
        return False, reason

    def _batch_self_test(self) -> None:
        """Copy a known pattern host -> device with two batched copies and read it back."""
        rt, n = self._rt, 256
        host = pinned_empty(2 * n, runtime=rt)
        host[:n] = np.arange(n, dtype=np.uint8)
        host[n:] = 0
        dev = DeviceBuffer(n, device=self.device, runtime=rt)
        try:
            hp = int(host.ctypes.data)
            stream = self._streams["h2d"]
            with self._on_device():
                half = n // 2
                self._launch_batched(
                    np.array([dev.ptr, dev.ptr + half], dtype=np.int64),
                    np.array([hp, hp + half], dtype=np.int64),
                    np.array([half, half], dtype=np.int64),
                    stream,
                )
                check(rt, rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
                check(rt, rt.cudaMemcpy(hp + n, dev.ptr, n, self._memcpy_default), "cudaMemcpy")
            if not np.array_equal(host[:n], host[n:]):
                raise CudaError("data read back differs from data written")
        finally:
            dev.free()


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [v for v in value if v is not None]
    return [value]


def _version(rt: Any, fn: str) -> int:
    try:
        return int(check(rt, getattr(rt, fn)(), fn))
    except Exception:  # noqa: BLE001
        return 0


def _pointer_attributes(rt: Any, ptr: int) -> Any:
    """``cudaPointerAttributes`` of ``ptr``, or None where the runtime does not know it (old
    runtimes return cudaErrorInvalidValue for pageable memory; clear that error)."""
    res = rt.cudaPointerGetAttributes(ptr)
    if int(res[0]) != 0:
        with contextlib.suppress(Exception):
            rt.cudaGetLastError()
        return None
    return res[1]


def _quiet(fn: Callable[..., Any], *args: Any) -> None:
    try:
        fn(*args)
    except Exception:  # noqa: BLE001
        pass
