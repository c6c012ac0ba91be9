"""cuda backend: block copies on CUDA copy streams, completion reaped by one thread per engine.

Design (contract section 4, docs/contract.md):

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
  (:mod:`kvsched.transfer.plan`). Many copies go to the driver in one batched call (CUDA >= 12.8)
  when a self-test at start-up passed, tried in this order (:attr:`CudaBackend.batch_mode`):
  ``"driver"``: ``cuMemcpyBatchAsync`` called through ctypes with C arrays of the copies'
  addresses and sizes (:mod:`kvsched.transfer.driver_batch`; no Python object per copy); ``"bindings"``:
  cuda-bindings' ``cudaMemcpyBatchAsync``, which converts three Python lists (300-430 ns per copy
  on the submitting thread); ``"loop"``: one ``cudaMemcpyAsync`` per copy. A job's copies go out
  in chunks that start small and double up to ``batch_chunk``, so the copy engine starts on the
  first blocks while the driver still queues the rest. Batched copies read their sources in
  stream order (``SrcAccessOrderStream``), after the events the stream waited on. Measured on an
  H200 with the "bindings" mode (driver 580, cuda-bindings 13.3): 0.7-1.7 us per copy on the
  host against about 2.6 us for the loop, so scattered 4-16 KiB blocks were launch-bound.
* **The SM copy path.** Off by default (``sm_copy=False``). With ``sm_copy="auto"`` (or True to
  require it) a small copy kernel (:mod:`kvsched.transfer.sm_copy`) is loaded from shipped PTX and
  self-tested at start-up; a load or store then goes to it instead of the copy engine where the
  calibration (``calibration=``, :mod:`kvsched.transfer.copy_path`) measured it faster, and only
  when both pools are addressable by kernels (device memory, page-locked host memory).
  ``sm_copy="force"`` sends every load and store to it (benchmarks, tests). It is launched on the
  same copy stream after the same event waits, so ordering and completion are the DMA path's. The
  calibration also picks the DMA path's settings per regime. See docs/gpu_copies.md.
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
import threading
import time
from collections import deque
from typing import Any, Callable, Iterator

import numpy as np

from kvsched.errors import InvalidArgumentError
from kvsched.pool import BlockPool
from kvsched.transfer.backend import event_list
from kvsched.transfer.copy_path import CopyChoice, DmaSettings, choose_path, load_calibration
from kvsched.transfer.driver_batch import DriverBatchCopier, c_array, is_invalid_context
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
from kvsched.transfer.plan import LIST_SEGMENTS
from kvsched.transfer.sm_copy import (
    DEFAULT_CTAS,
    DescriptorTables,
    SmCopier,
    check_bounds,
    device_maps_host_memory,
    pack_descriptors,
)

__all__ = ["CudaBackend", "KINDS"]

log = logging.getLogger("kvsched")

KINDS = ("h2d", "d2h", "d2d")


class _GpuState:
    """What the backend tracks for an in-flight job."""

    __slots__ = ("kind", "event", "ops", "error", "done", "table")

    def __init__(self, kind: str, event: Any, ops: int, error: BaseException | None, table: Any = None) -> None:
        self.kind = kind
        self.event = event
        self.ops = ops
        self.error = error
        self.done = False
        self.table = table  # the SM path's descriptor table, read by the kernel until the event


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
        sm_copy: bool | str = False,
        sm_ctas: int = DEFAULT_CTAS,
        calibration: Any = None,
        fault_hook: Callable[[TransferJob], None] | None = None,
        runtime: Any = None,
        driver: Any = None,
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
        self._copier: DriverBatchCopier | None = None
        self._bound_threads = threading.local()  # threads whose CUDA context is known current
        self.batch_mode = "loop"  # set by _setup_batch: "driver", "bindings" or "loop"
        self.batch_reason = self._setup_batch(batch, driver, injected=runtime is not None)
        self.calibration = load_calibration(calibration)
        self._sm: SmCopier | None = None
        self._tables = DescriptorTables(rt)
        self.sm_mode = "off"  # set by _setup_sm: "off", "auto" or "force"
        self.jobs_by_path = {"dma": 0, "loop": 0, "sm": 0}  # statistic only
        try:
            self.sm_reason = self._setup_sm(sm_copy, sm_ctas, driver, injected=runtime is not None)
        except BaseException:
            with self._on_device():
                for stream in self._streams.values():
                    _quiet(rt.cudaStreamDestroy, stream)
            raise
        self._reaper = threading.Thread(target=self._reap, name="kvsched-cuda-reaper", daemon=True)
        self._reaper.start()

    # ------------------------------------------------------------------------------ public

    @property
    def pending(self) -> int:
        return self._pending

    @property
    def batch_enabled(self) -> bool:
        """True when copies go to the driver in batches (``batch_mode`` is not "loop")."""
        return self.batch_mode != "loop"

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
        waits = [rt.cudaEvent_t(as_event_handle(e)) for e in event_list(compute_event) + event_list(wait_event)]
        self._prepare(plan.src)
        self._prepare(plan.dst)
        # Python lists for small jobs (cheaper than a dozen numpy calls), numpy arrays for large.
        srcs, dsts, sizes = plan.segment_lists() if plan.num_copies <= LIST_SEGMENTS else plan.segments()
        count = len(srcs)
        choice = self._choose(job, kind, count)
        table = None
        if choice.path == "sm":
            table = self._sm_table(job, srcs, dsts, sizes)  # raises before anything is counted
            batched, chunks = False, []
            ops = len(waits) + 2
        else:
            batched = self.batch_enabled and count > 1
            chunks = _chunk_bounds(count, self.batch_chunk, one_call=choice.dma.one_call) if batched else []
            ops = len(waits) + (len(chunks) if batched else count) + 1
        path = "sm" if table is not None else "dma" if batched else "loop"

        try:
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
                self.jobs_by_path[path] += 1
        except BaseException:
            if table is not None:
                self._tables.give(table)
            raise

        job.attach(None, waiter=self)
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
                        if table is not None:
                            self._launch_sm(table, count, stream)
                        elif batched:
                            self._launch_batched(dsts, srcs, sizes, stream, chunks, choice.dma)
                        else:
                            self._launch_loop(dsts, srcs, sizes, stream)
                    except Exception as exc:  # noqa: BLE001 - becomes the job's failure
                        launch_error = exc
                    event = self._take_event()
                    check(rt, rt.cudaEventRecord(event, stream), "cudaEventRecord")
            except Exception as exc:  # noqa: BLE001 - no event: finish here, after the stream drained
                self._fail_untracked(job, kind, ops, event, stream, launch_error or exc, table)
                return
            with self._cond:
                job.attach(_GpuState(kind, event, ops, launch_error, table))
                self._inflight[kind].append(job)
                self._cond.notify_all()

    def wait_on(self, job: TransferJob, stream: Any) -> None:
        """Make ``stream`` wait (on the GPU) for ``job``'s copies; no-op once the job completed."""
        rt = self._rt
        handle = rt.cudaStream_t(as_stream_handle(stream))
        with self._cond:
            state: _GpuState | None = job.backend_state
            if state is None or state.done:
                return
            check(rt, rt.cudaStreamWaitEvent(handle, state.event, 0), "cudaStreamWaitEvent")

    def event_of(self, job: TransferJob) -> int | None:
        with self._cond:
            state: _GpuState | None = job.backend_state
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
                if self._sm is not None:  # every launch has drained: no job is pending
                    self._sm.close()
            self._tables.clear()
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

    def _launch_loop(self, dsts: Any, srcs: Any, sizes: Any, stream: Any) -> None:
        rt, kind = self._rt, self._memcpy_default
        memcpy = rt.cudaMemcpyAsync
        for d, s, n in zip(_ints(dsts), _ints(srcs), _ints(sizes)):
            res = memcpy(d, s, n, kind, stream)
            if int(res[0]) != 0:
                check(rt, res, "cudaMemcpyAsync")

    def _launch_batched(self, dsts: Any, srcs: Any, sizes: Any, stream: Any, chunks: list[tuple[int, int]],
                        settings: DmaSettings = DmaSettings()) -> None:
        """Queue the copies ``srcs[i] -> dsts[i]`` of ``sizes[i]`` bytes (lists of ints or integer
        numpy arrays) on ``stream`` in batch calls bounded by ``chunks``."""
        if self.batch_mode == "driver":
            self._launch_driver(dsts, srcs, sizes, stream, chunks, settings)
        else:
            self._launch_bindings(dsts, srcs, sizes, stream, chunks, settings)

    def _launch_driver(self, dsts: Any, srcs: Any, sizes: Any, stream: Any, chunks: list[tuple[int, int]],
                       settings: DmaSettings) -> None:
        copier = self._copier
        assert copier is not None
        # Three C arrays for the whole job; each batch call gets addresses into them.
        (d0, d_keep), (s0, s_keep), (n0, n_keep) = c_array(dsts), c_array(srcs), c_array(sizes)
        handle = int(stream)
        if not getattr(self._bound_threads, "bound", False):
            self._bind_context()
        for start, stop in chunks:
            at = start * 8
            rc, fail = copier(d0 + at, s0 + at, n0 + at, stop - start, handle, settings)
            if rc != 0 and is_invalid_context(rc):
                # Nothing was queued: the driver checks its context first. Bind and try once more.
                self._bind_context()
                rc, fail = copier(d0 + at, s0 + at, n0 + at, stop - start, handle, settings)
            if rc != 0:
                text = copier.error_name(rc)
                where = f" (copy {start + fail})" if fail < stop - start else ""  # else SIZE_MAX: no one copy
                raise CudaError(f"cuMemcpyBatchAsync failed{where}: {text}", code=rc, name=text.split(" ", 1)[0])
        del d_keep, s_keep, n_keep  # alive until here: the driver read them during the calls

    def _bind_context(self) -> None:
        """Make this device's primary context current on the calling thread (the driver API, unlike
        the runtime, does not do it implicitly). Called inside ``_on_device``."""
        check(self._rt, self._rt.cudaFree(0), "cudaFree(0) (binding the CUDA context)")
        self._bound_threads.bound = True

    def _launch_bindings(self, dsts: Any, srcs: Any, sizes: Any, stream: Any, chunks: list[tuple[int, int]],
                         settings: DmaSettings) -> None:
        rt = self._rt
        attrs = self._batch_attrs if settings == _DEFAULT_DMA else [self._bindings_attrs(settings)]
        dsts, srcs, sizes = _ints(dsts), _ints(srcs), _ints(sizes)
        for start, stop in chunks:
            d, s, n = dsts[start:stop], srcs[start:stop], sizes[start:stop]
            # CUDA 12.8/12.9 bindings return (err, failIdx); CUDA 13 dropped failIdx: (err,).
            res = rt.cudaMemcpyBatchAsync(d, s, n, len(d), attrs, [0], 1, stream)
            if int(res[0]) != 0:
                # failIdx (CUDA 12.8/12.9 bindings only) is SIZE_MAX when no one copy failed.
                failed = int(res[1]) if len(res) > 1 and res[1] is not None else len(d)
                where = f" (copy {start + failed})" if failed < len(d) else ""
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
        self, job: TransferJob, kind: str, ops: int, event: Any, stream: Any, error: BaseException,
        table: Any = None,
    ) -> None:
        """No event could be recorded: wait for the stream here (error path only) so no DMA of
        this job is still running when its handle is marked failed."""
        drained = False
        with contextlib.suppress(Exception):
            drained = int(self._rt.cudaStreamSynchronize(stream)[0]) == 0
        if table is not None and drained:  # otherwise a kernel may still read it: left to the GC
            self._tables.give(table)
        state = _GpuState(kind, event, ops, error)
        state.done = True
        job.attach(state)
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
        rt, state = self._rt, job.backend_state
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
                if state.table is not None:  # the kernel that read it has finished
                    self._tables.give(state.table)
            state.table = None
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
        cache = pool.transfer_cache
        if self.device in cache.cuda_ready:
            return
        rt = self._rt
        memory_type = rt.cudaMemoryType
        pageable: list[int] = []  # extents this device's kernels cannot address (see _sm_table)
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
                pageable.append(addr)  # until registered below
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
                        pageable.pop()
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
                cache.cuda_pins[addr] = reg
                pageable.pop()
                log.info("kvsched: page-locked %d bytes of a host pool for cuda:%d", size, self.device)
        if not pageable:
            extents = sorted(pool.extents())
            cache.cuda_mapped[self.device] = (np.array([a for a, _ in extents], dtype=np.int64),
                                              np.array([a + n for a, n in extents], dtype=np.int64))
        cache.cuda_ready.add(self.device)

    def _setup_batch(self, batch: bool | str, driver: Any, *, injected: bool) -> str:
        """Set :attr:`batch_mode` to "driver", else "bindings", else "loop" (see the module
        docstring) and return why. Each batched mode must pass a self-test on this device first."""
        if batch is False or batch == "off":
            return "disabled (batch=False)"
        if batch not in (True, "auto", "on", "driver", "bindings"):
            raise InvalidArgumentError(
                f"batch must be 'auto', True, False, 'driver' or 'bindings', got {batch!r}")
        if min(self.runtime_version, self.driver_version) < 12080:
            reasons = [f"CUDA {self.runtime_version} runtime / {self.driver_version} driver "
                       "(batched copies need 12.8)"]
        else:
            reasons = []
            for mode, prepare in (("driver", lambda: self._prepare_driver(driver, injected)),
                                  ("bindings", self._prepare_bindings)):
                if batch in ("driver", "bindings") and batch != mode:
                    continue
                try:
                    prepare()
                except Exception as exc:  # noqa: BLE001 - the next mode is tried
                    reasons.append(f"{mode}: {type(exc).__name__}: {exc}")
                    continue
                self.batch_mode = mode
                try:
                    self._batch_self_test()
                except Exception as exc:  # noqa: BLE001
                    reasons.append(f"{mode}: self-test failed: {type(exc).__name__}: {exc}")
                    continue
                what = "cuMemcpyBatchAsync from C arrays" if mode == "driver" else "cudaMemcpyBatchAsync"
                why = f" (not {'; not '.join(reasons)})" if reasons else ""
                return f"{what}, self-test passed{why}"
        self.batch_mode = "loop"
        reason = "; ".join(reasons)
        if batch != "auto":
            raise CudaError(f"batch={batch!r} but batched copies are unusable: {reason}")
        log.info("kvsched: cuda backend copies one cudaMemcpyAsync per run: %s", reason)
        return reason

    def _prepare_driver(self, driver: Any, injected: bool) -> None:
        if driver is None:
            if injected:  # a stand-in runtime with the real driver would mix two worlds
                raise CudaError("no driver module given with the injected runtime")
            from cuda.bindings import driver  # cuda-python >= 12.6
        self._copier = DriverBatchCopier(driver)

    def _prepare_bindings(self) -> None:
        rt = self._rt
        if getattr(rt, "cudaMemcpyBatchAsync", None) is None or getattr(rt, "cudaMemcpyAttributes", None) is None:
            raise CudaError("cuda-bindings has no cudaMemcpyBatchAsync (needs cuda-bindings >= 12.8)")
        self._batch_attrs = [self._bindings_attrs(_DEFAULT_DMA)]

    def _bindings_attrs(self, settings: DmaSettings) -> Any:
        rt = self._rt
        attrs = rt.cudaMemcpyAttributes()
        order = rt.cudaMemcpySrcAccessOrder
        attrs.srcAccessOrder = (order.cudaMemcpySrcAccessOrderAny if settings.src_order == "any"
                                else order.cudaMemcpySrcAccessOrderStream)
        flags = getattr(rt, "cudaMemcpyFlags", None)  # a hint: overlap the compute stream's kernels
        if flags is not None and settings.prefer_overlap:
            attrs.flags = flags.cudaMemcpyFlagPreferOverlapWithCompute
        return attrs

    # ------------------------------------------------------------------------------ the SM path

    def _choose(self, job: TransferJob, kind: str, count: int) -> CopyChoice:
        """The path of this job (see :mod:`kvsched.transfer.copy_path`)."""
        plan = job.plan
        block = plan.nbytes // count if count else 0
        if self.sm_mode == "off" or kind == "d2d" or count == 0:
            return choose_path(kind, block, count, self.calibration)
        mapped = (self.device in plan.src.transfer_cache.cuda_mapped
                  and self.device in plan.dst.transfer_cache.cuda_mapped)
        if self.sm_mode == "force":
            if not mapped:
                raise InvalidArgumentError(
                    f"sm_copy='force' but a pool of request {job.request_id!r} op {job.uuid} is pageable host "
                    "memory, which kernels cannot address: page-lock it (auto_pin=True) or use sm_copy='auto'")
            return _SM_CHOICE
        return choose_path(kind, block, count, self.calibration, sm_ready=mapped)

    def _sm_table(self, job: TransferJob, srcs: Any, dsts: Any, sizes: Any) -> Any:
        """The job's descriptor table, filled, after checking every copy lies inside its pools: the
        plan checked the block ids, this checks the addresses the kernel will touch, since a kernel
        writing out of bounds corrupts memory without an error."""
        plan = job.plan
        for what, addrs, pool in (("source", srcs, plan.src), ("destination", dsts, plan.dst)):
            starts, ends = pool.transfer_cache.cuda_mapped[self.device]
            bad = check_bounds(addrs, sizes, starts, ends)
            if bad >= 0:
                raise InvalidArgumentError(
                    f"request {job.request_id!r} op {job.uuid}: copy {bad} ({int(sizes[bad])} bytes at "
                    f"{int(addrs[bad]):#x}) is outside the {what} pool; nothing was launched")
        table = self._tables.take(len(sizes))
        pack_descriptors(table, dsts, srcs, sizes)
        return table

    def _launch_sm(self, table: Any, count: int, stream: Any) -> None:
        sm = self._sm
        assert sm is not None
        if not getattr(self._bound_threads, "bound", False):
            self._bind_context()
        ptr, handle = int(table.ctypes.data), int(stream)
        rc = sm.launch(ptr, count, handle)
        if rc != 0 and is_invalid_context(rc):  # nothing was queued; as in _launch_driver
            self._bind_context()
            rc = sm.launch(ptr, count, handle)
        if rc != 0:
            text = sm.error_name(rc)
            raise CudaError(f"cuLaunchKernel (SM copy) failed: {text}", code=rc, name=text.split(" ", 1)[0])

    def _setup_sm(self, sm_copy: bool | str, ctas: int, driver: Any, *, injected: bool) -> str:
        """Set :attr:`sm_mode` and return why. The kernel is loaded and must pass a self-test on
        this device first; "auto" falls back to the copy engine, True/"on"/"force" raise."""
        if sm_copy is False or sm_copy == "off":
            return "disabled (sm_copy=False)"
        if sm_copy not in (True, "on", "auto", "force"):
            raise InvalidArgumentError(f"sm_copy must be False, 'auto', True or 'force', got {sm_copy!r}")
        if isinstance(ctas, bool) or not isinstance(ctas, (int, np.integer)) or not 1 <= int(ctas) <= 1024:
            raise InvalidArgumentError(f"sm_ctas must be an int in [1, 1024], got {ctas!r}")
        try:
            ok, why = device_maps_host_memory(self._rt, self.device)
            if not ok:
                raise CudaError(why)
            if driver is None:
                if injected:  # a stand-in runtime with the real driver would mix two worlds
                    raise CudaError("no driver module given with the injected runtime")
                from cuda.bindings import driver
            with self._on_device():
                self._bind_context()
                self._sm = SmCopier(driver, max_ctas=int(ctas))
            self._sm_self_test()
        except Exception as exc:  # noqa: BLE001
            if self._sm is not None:
                self._sm.close()
                self._sm = None
            reason = f"{type(exc).__name__}: {exc}"
            if sm_copy != "auto":
                raise CudaError(f"sm_copy={sm_copy!r} but the SM copy kernel is unusable: {reason}") from exc
            log.info("kvsched: cuda backend without the SM copy path: %s", reason)
            return reason
        self.sm_mode = "force" if sm_copy == "force" else "auto"
        return f"SM copy kernel ({int(ctas)} CTAs), self-test passed"

    def _sm_self_test(self) -> None:
        """Scatter a known pattern host -> device -> host with the kernel: pieces in shuffled
        order, of sizes that exercise the 16-byte, 8-byte and byte loops, several rounds of the
        kernel's 32-copy descriptor window; compare what came back."""
        rt = self._rt
        rng = np.random.default_rng(0)
        sizes = np.tile(np.array([4096, 16, 8, 24, 1, 4093, 40, 4104], dtype=np.int64), 40)
        count = int(sizes.size)  # 320 copies: 10 windows of 32 for the first warp
        stride = 4096 + 64
        offsets = np.arange(count, dtype=np.int64) * stride
        skew = np.where(sizes % 16 == 0, 0, np.where(sizes % 8 == 0, 8, 3))  # alignment of each copy
        n = stride * count
        host = pinned_empty(2 * n, runtime=rt)
        host[:n] = np.arange(n, dtype=np.uint64).astype(np.uint8) ^ 0xA5
        host[n:] = 0
        dev = DeviceBuffer(n, device=self.device, runtime=rt)
        order = rng.permutation(count)
        src_off = offsets + skew
        dst_off = offsets[order] + skew
        tables = []
        try:
            hp = int(host.ctypes.data)
            with self._on_device():
                for kind, dsts, srcs in (("h2d", dev.ptr + dst_off, hp + src_off),
                                         ("d2h", hp + n + src_off, dev.ptr + dst_off)):
                    table = self._tables.take(count)
                    tables.append(table)
                    pack_descriptors(table, dsts, srcs, sizes)
                    self._launch_sm(table, count, self._streams[kind])
                    check(rt, rt.cudaStreamSynchronize(self._streams[kind]), "cudaStreamSynchronize")
            want = np.zeros(n, dtype=np.uint8)
            for off, size in zip(src_off.tolist(), sizes.tolist()):
                want[off:off + size] = host[off:off + size]
            if not np.array_equal(host[n:], want):
                first = int(np.flatnonzero(host[n:] != want)[0])
                raise CudaError(f"data read back differs from data written (first at byte {first})")
        finally:
            dev.free()
            for table in tables:
                self._tables.give(table)

    def _batch_self_test(self) -> None:
        """Scatter a known pattern host -> device -> host with batched copies (several batch calls
        per direction, pieces in shuffled order) and compare what came back."""
        rt, piece, count = self._rt, 16, 3 * _FIRST_CHUNK  # 96 copies: two calls per direction
        n = piece * count
        host = pinned_empty(2 * n, runtime=rt)
        host[:n] = np.arange(n, dtype=np.uint64).astype(np.uint8) ^ 0x5A
        host[n:] = 0
        dev = DeviceBuffer(n, device=self.device, runtime=rt)
        order = np.random.default_rng(0).permutation(count).astype(np.int64) * piece
        sizes = np.full(count, piece, dtype=np.int64)
        try:
            hp = int(host.ctypes.data)
            with self._on_device():
                for kind, dsts, srcs in (("h2d", dev.ptr + order, hp + order),
                                         ("d2h", hp + n + order[::-1], dev.ptr + order[::-1])):
                    stream = self._streams[kind]
                    self._launch_batched(np.ascontiguousarray(dsts), np.ascontiguousarray(srcs), sizes, stream,
                                         _chunk_bounds(count, self.batch_chunk))
                    check(rt, rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
            if not np.array_equal(host[:n], host[n:]):
                raise CudaError("data read back differs from data written")
        finally:
            dev.free()


def _ints(values: Any) -> list[int]:
    """Python ints of a list (as is) or of a numpy array (cuda-bindings' calls take ints)."""
    return values.tolist() if isinstance(values, np.ndarray) else values


_FIRST_CHUNK = 32  # copies in a job's first batch call: the copy engine starts after this many
_DEFAULT_DMA = DmaSettings()
_SM_CHOICE = CopyChoice(path="sm")


def _chunk_bounds(count: int, limit: int, *, one_call: bool = False) -> list[tuple[int, int]]:
    """``[start, stop)`` of each batch call for ``count`` copies: 32, 64, 128, ... up to ``limit``
    (``one_call``: calls of ``limit`` copies, i.e. one call for any job of at most ``limit``).

    The driver puts a batch on the stream when the call returns, so one call for a whole job would
    leave the copy engine idle while the host queues every copy; a small first call starts it at
    once, and doubling keeps the number of calls logarithmic until ``limit``. Whether that start
    is worth the extra calls is measured by bench/cuda_calibrate.py (vLLM makes one call)."""
    bounds, start, size = [], 0, limit if one_call else min(_FIRST_CHUNK, limit)
    while start < count:
        stop = min(count, start + size)
        bounds.append((start, stop))
        start, size = stop, min(size * 2, limit)
    return bounds


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
