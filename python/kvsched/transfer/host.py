"""Host backend: copies between host pools with numpy on a few worker threads.

It is the default where no GPU is present, so every transfer path runs on a CPU-only machine.

* ``submit`` queues the job and returns. The queue is bounded (``max_pending`` unfinished
  jobs); when it is full ``submit`` raises :class:`TransferQueueFullError` at once instead of
  blocking the caller. Opt-in, ``inline_bytes``: a job of at most that many bytes with no event
  to wait for is copied on the caller's thread instead (waking a copy thread and trading the GIL
  with it cost about 55 us of process CPU per job on a 2-core VM, more than copying a few
  blocks; `bench/host_inline.py`).
* Workers copy with numpy, which releases the GIL for large copies, so several workers overlap.
  A job above ``split_bytes`` whose runs average 64 KiB or more is split (by layers, else by
  runs) over the workers.
* Per (layer, piece), each run of consecutive blocks is one slice assignment (one memcpy); many
  tiny runs (under 2 KiB on average) go through one fancy-indexed gather/scatter instead, so
  their per-block cost is C, not Python.
* A failure (an exception in a copy, a wait that timed out, or the ``fault_hook``) marks the
  handle failed with the reason; other jobs go on.
* Submission is cheap: one lock, a deque append, and a wake-up only when a worker is asleep and
  not already woken (a worker that is awake takes queued jobs before it sleeps again). Jobs carry
  no Event or Lock of their own (see :mod:`kvsched.transfer.job`).
* ``compute_event`` / ``wait_event`` may be objects with ``wait(timeout)`` (``threading.Event``):
  the worker waits for them before copying, the host analogue of the GPU-side gating of the cuda
  backend (used by simulated engines). The forward thread never waits.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from collections import deque
from typing import Any, Callable

import numpy as np

from kvsched.errors import InvalidArgumentError
from kvsched.pool import BlockPool
from kvsched.transfer.backend import event_list
from kvsched.transfer.errors import TransferEngineClosedError, TransferQueueFullError
from kvsched.transfer.job import TransferJob

__all__ = ["HostBackend"]

log = logging.getLogger("kvsched")

# Per (layer, piece): copy run by run (one slice assignment, ~1 us of Python, per run) unless
# there are many runs averaging under _GATHER_BELOW bytes: then one fancy-indexed gather/scatter
# (C loop, but two passes over the bytes). Measured on a 2-core VM: run by run wins from ~4 KiB.
_FEW_RUNS = 8
_GATHER_BELOW = 2048
_SPLIT_RUN_BYTES = 64 * 1024


class _JobState:
    __slots__ = ("remaining", "error", "waits")

    def __init__(self, parts: int, waits: list[Any]) -> None:
        self.remaining = parts
        self.error: BaseException | None = None
        self.waits = waits


_NO_WAITS: list[Any] = []


class HostBackend:
    """Copies host pools on ``workers`` threads. See the module docstring."""

    name = "host"

    def __init__(
        self,
        *,
        workers: int | None = None,
        max_pending: int = 1024,
        split_bytes: int = 8 << 20,
        event_timeout: float = 60.0,
        inline_bytes: int = 0,
        fault_hook: Callable[[TransferJob], None] | None = None,
    ) -> None:
        if workers is None:
            workers = min(4, os.cpu_count() or 1)
        if int(workers) < 1:
            raise InvalidArgumentError(f"workers must be >= 1, got {workers}")
        if int(max_pending) < 1:
            raise InvalidArgumentError(f"max_pending must be >= 1, got {max_pending}")
        self.workers = int(workers)
        self.max_pending = int(max_pending)
        self.split_bytes = int(split_bytes)
        self.event_timeout = float(event_timeout)
        self.inline_bytes = int(inline_bytes)
        self.fault_hook = fault_hook
        # (job, part) tasks; part None: the whole job. One lock guards the queue and counters.
        # Workers sleep on _work; _sleeping counts those not notified yet, so a submit wakes a
        # worker only when none is awake to find its task. wait_idle / close sleep on _idle.
        self._tasks: deque[tuple[TransferJob, _Part | None]] = deque()
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._idle = threading.Condition(self._lock)
        self._sleeping = 0  # workers waiting on _work
        self._pending = 0
        self._closing = False
        self._threads = [
            threading.Thread(target=self._run, name=f"kvsched-host-copy-{i}", daemon=True)
            for i in range(self.workers)
        ]
        for t in self._threads:
            t.start()

    # ------------------------------------------------------------------------------ submission

    @property
    def pending(self) -> int:
        """Jobs submitted and not finished yet."""
        return self._pending

    def submit(self, job: TransferJob, compute_event: Any = None, wait_event: Any = None) -> None:
        """Queue ``job`` and return; never blocks on a full queue. Only a job of at most
        ``inline_bytes`` with no event to wait for (and no test ``fault_hook``) is copied on the
        caller's thread before this returns (see ``_copy_inline``)."""
        plan = job.plan
        if plan.kind != "h2h":
            pool = plan.src if plan.src.is_cuda else plan.dst
            raise InvalidArgumentError(f"the host backend cannot reach {pool.device} memory")
        if compute_event is None and wait_event is None:
            waits = _NO_WAITS
        else:
            waits = event_list(compute_event) + event_list(wait_event)
            for ev in waits:
                if not callable(getattr(ev, "wait", None)):
                    raise InvalidArgumentError(
                        f"host backend: events must have wait(timeout) (threading.Event), got {type(ev).__name__}"
                    )
        if plan.nbytes <= self.inline_bytes and not waits and self.fault_hook is None:
            self._copy_inline(job)
            return
        chunks: list[_Part] | None = None
        # Split only big jobs of long runs: the copies release the GIL, the Python between them
        # does not, so short runs copied by several workers just fight over the GIL.
        if self.workers > 1 and plan.nbytes >= self.split_bytes:
            avg_run_bytes = plan.num_blocks * plan.src.piece_bytes // max(plan.num_runs, 1)
            if avg_run_bytes >= _SPLIT_RUN_BYTES:
                parts = min(self.workers, max(int(plan.nbytes // max(self.split_bytes // 2, 1)), 1))
                if parts > 1:
                    chunks = _split(plan, parts)
        job.attach(_JobState(1 if chunks is None else len(chunks), waits))
        with self._lock:
            if self._closing:
                raise TransferEngineClosedError("the transfer engine is closed")
            if self._pending >= self.max_pending:
                raise TransferQueueFullError(
                    f"{self._pending} transfers in flight (max_pending={self.max_pending}); "
                    f"request {job.request_id!r} op {job.uuid} was not submitted, retry later"
                )
            self._pending += 1
            if chunks is None:
                self._tasks.append((job, None))
                if self._sleeping:  # else every worker is awake and will look at the queue
                    self._sleeping -= 1
                    self._work.notify()
            else:
                self._tasks.extend((job, chunk) for chunk in chunks)
                wake = min(self._sleeping, len(chunks))
                if wake:
                    self._sleeping -= wake
                    self._work.notify(wake)

    def _copy_inline(self, job: TransferJob) -> None:
        """A small job with nothing to wait for, copied on the submitting thread: handing it to a
        worker costs more than the copy (waking a sleeping thread, then the two threads trading
        the GIL: 50-80 us of the submitter's CPU on a 2-core VM, against a few microseconds to
        copy a few blocks). Counted as pending while it runs, so wait_idle and close see it."""
        job.attach(_JobState(1, _NO_WAITS))
        with self._lock:
            if self._closing:
                raise TransferEngineClosedError("the transfer engine is closed")
            self._pending += 1
        error: BaseException | None = None
        try:
            _copy(job.plan, None)
        except BaseException as exc:  # noqa: BLE001 - every failure becomes the handle's reason
            error = exc
        job._finish(error)
        with self._lock:
            self._pending -= 1
            if self._pending == 0:
                self._idle.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        with self._lock:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def close(self, timeout: float | None = None) -> bool:
        """Finish every queued job, then stop the workers. Idempotent. False on timeout."""
        with self._lock:
            self._closing = True
            idle = self._idle.wait_for(lambda: self._pending == 0, timeout)
            self._sleeping = 0
            self._work.notify_all()
        if idle:
            for t in self._threads:
                if t is not threading.current_thread():
                    t.join(timeout)
        return idle

    # ------------------------------------------------------------------------------ workers

    def abandon(self) -> None:
        """The engine was garbage-collected unclosed: close without waiting (Backend.abandon)."""
        self.close(timeout=0)

    def _run(self) -> None:
        lock, work, tasks = self._lock, self._work, self._tasks
        while True:
            with lock:
                while not tasks:
                    if self._closing and self._pending == 0:
                        return
                    self._sleeping += 1  # the notifier takes it back off
                    work.wait()
                job, part = tasks.popleft()
            state: _JobState = job.backend_state
            error: BaseException | None = None
            try:
                for ev in state.waits:
                    if ev.wait(self.event_timeout) is False:
                        raise TimeoutError(f"event not set within {self.event_timeout} s")
                if self.fault_hook is not None:
                    self.fault_hook(job)
                _copy(job.plan, part)
            except BaseException as exc:  # noqa: BLE001 - every failure becomes the handle's reason
                error = exc
            if part is not None:  # one share of a split job: the last share to end finishes it
                with lock:
                    state.remaining -= 1
                    if error is not None and state.error is None:
                        state.error = error
                    if state.remaining:
                        continue
                error = state.error
            job._finish(error)
            with lock:
                self._pending -= 1
                if self._pending == 0:
                    self._idle.notify_all()
                    if self._closing:
                        self._sleeping = 0
                        work.notify_all()


# ---------------------------------------------------------------------------------- copying


class _Part:
    """The share of a job one worker copies: some layers x some runs (with their block ids)."""

    __slots__ = ("layers", "runs", "src_ids", "dst_ids")

    def __init__(self, layers: np.ndarray, runs: np.ndarray, src_ids: np.ndarray, dst_ids: np.ndarray) -> None:
        self.layers, self.runs, self.src_ids, self.dst_ids = layers, runs, src_ids, dst_ids


def _split(plan: Any, parts: int) -> list[_Part]:
    """Split a job into ``parts`` shares: by layers when there are enough, else by runs."""
    layers, runs = plan.layers, plan.runs
    if parts <= 1 or (layers.size < parts and runs.shape[0] < parts):
        return [_Part(layers, runs, plan.src_ids, plan.dst_ids)]
    if layers.size >= parts:
        return [_Part(chunk, runs, plan.src_ids, plan.dst_ids) for chunk in np.array_split(layers, parts)]
    # runs are in the order of the sorted ids: run i covers ids[ends[i-1]:ends[i]]
    ends = np.cumsum(runs[:, 2])
    targets = (ends[-1] * np.arange(1, parts)) // parts
    cuts = np.unique(np.searchsorted(ends, targets, side="left") + 1)
    cuts = cuts[(cuts > 0) & (cuts < runs.shape[0])]
    out = []
    bounds = [0, *cuts.tolist(), runs.shape[0]]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        first = int(ends[lo - 1]) if lo else 0
        last = int(ends[hi - 1])
        out.append(_Part(layers, runs[lo:hi], plan.src_ids[first:last], plan.dst_ids[first:last]))
    return out


def _copy(plan: Any, part: _Part | None) -> None:
    """Copy ``part`` of ``plan`` (None: all of it)."""
    if part is None:
        n_runs = plan.num_runs
        if n_runs == 0:
            return
        layers = plan.layer_list
        num_blocks = plan.num_blocks
    else:
        n_runs = part.runs.shape[0]
        if n_runs == 0:
            return
        layers = part.layers.tolist()
        num_blocks = int(part.src_ids.size)
    src, dst = plan.src, plan.dst
    few = n_runs <= _FEW_RUNS or (num_blocks * src.piece_bytes) // n_runs >= _GATHER_BELOW
    if few:
        runs = plan.run_list if part is None else part.runs.tolist()
    else:
        src_ids = plan.src_ids if part is None else part.src_ids
        dst_ids = plan.dst_ids if part is None else part.dst_ids
    pieces = range(src.num_pieces)
    for layer in layers:
        for piece in pieces:
            src_rows, src_items = _views(src, layer, piece)
            dst_rows, dst_items = _views(dst, layer, piece)
            if few:
                for s, d, n in runs:
                    if n == 1:
                        dst_rows[d] = src_rows[s]
                    else:
                        dst_rows[d : d + n] = src_rows[s : s + n]
            else:
                dst_items[dst_ids] = src_items[src_ids]


def _views(pool: BlockPool, layer: int, piece: int) -> tuple[np.ndarray, np.ndarray]:
    """numpy views of one (layer, piece) of a host pool: ``(num_blocks, piece_bytes)`` uint8 rows,
    and the same bytes as ``num_blocks`` opaque items (for fancy indexing). Cached on the pool."""
    cache = pool.transfer_cache.host_views
    key = (layer, piece)
    views = cache.get(key)
    if views is None:
        n, size, stride = pool.num_blocks, pool.piece_bytes, pool.block_stride
        span = (n - 1) * stride + size if n else 0
        addr = pool.layer_ptrs[layer] + pool.piece_offsets[piece]
        buf = (ctypes.c_ubyte * max(span, 1)).from_address(addr)
        strides = (stride if n > 1 else size,)
        rows = np.ndarray((n, size), dtype=np.uint8, buffer=buf, strides=strides + (1,))
        items = np.ndarray((n,), dtype=np.dtype((np.void, size)), buffer=buf, strides=strides)
        views = (rows, items)
        cache[key] = views
    return views
