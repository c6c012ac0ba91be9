"""A submitted transfer and how it ends.

``TransferEngine.submit`` returns a :class:`TransferJob`. Exactly one backend thread calls
:meth:`TransferJob._finish` once the bytes have landed (or the copy failed); that marks the
scheduler handle (complete, or failed with the reason), runs the engine's bookkeeping callbacks and
only then releases anyone blocked in :meth:`wait`. The job drops its reference to the handle when
it finishes, so the handle's lifetime is the caller's again.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

from kvsched.transfer.errors import TransferError
from kvsched.transfer.plan import CopyPlan

if TYPE_CHECKING:
    from kvsched.transfer.backend import StreamWaiter

__all__ = ["TransferJob"]

log = logging.getLogger("kvsched")

# A job is running, then finishing (one backend thread claimed it and is marking the handle),
# then done (handle marked, callbacks run: wait() returns). One lock for all jobs guards the
# claim and the lazily made Event, so a job costs no lock or Event unless someone waits on it.
_RUNNING, _FINISHING, _DONE = 0, 1, 2
_LOCK = threading.Lock()


class TransferJob:
    """One transfer. ``kind`` is ``"h2h"``, ``"h2d"`` (load), ``"d2h"`` (store) or ``"d2d"``.

    ``error`` is None while running and after success, else the failure reason. ``wait()`` is
    for tests, tools and shutdown paths: the engine's forward thread should never block on it
    (on the cuda backend, make the compute stream wait with :meth:`wait_on` instead).

    ``backend_state`` is the record that the backend running the job keeps for it (set with
    :meth:`attach`; only that backend reads it: parts left and waits on the host backend, stream
    kind, event and queued operations on the cuda backend); None until the backend took the job."""

    def __init__(self, handle: Any, plan: CopyPlan, kind: str) -> None:
        self.handle = handle
        # The handle's request id and uuid, read when first asked for (a uuid.UUID costs a
        # submit on the forward thread more than the rest of the job) and at the latest when
        # the job finishes and lets the handle go.
        self._names: tuple[Any, Any] | None = None
        self.plan = plan
        self.kind = kind
        self.nbytes = plan.nbytes
        self.submitted_at = time.perf_counter()
        self.finished_at: float | None = None
        self.error: str | None = None
        self._state = _RUNNING
        self._event: threading.Event | None = None  # made only when someone waits
        self._callbacks: list[Callable[["TransferJob"], None]] = []
        self.backend_state: Any = None
        self._waiter: StreamWaiter | None = None  # the backend that can make a stream wait on it

    # ------------------------------------------------------------------------------ queries

    @property
    def request_id(self) -> Any:
        """The request id of the job's handle."""
        return self._handle_names()[0]

    @property
    def uuid(self) -> Any:
        """The uuid of the job's operation (its handle's)."""
        return self._handle_names()[1]

    def _handle_names(self) -> tuple[Any, Any]:
        names = self._names
        if names is None:
            h = self.handle
            names = self._names = (getattr(h, "request_id", None), getattr(h, "uuid", None))
        return names

    def done(self) -> bool:
        return self._state == _DONE

    @property
    def ok(self) -> bool:
        """True once finished successfully."""
        return self._state == _DONE and self.error is None

    @property
    def num_copies(self) -> int:
        """Copies (one per layer, piece and run of consecutive blocks) the job makes."""
        return self.plan.num_copies

    @property
    def seconds(self) -> float | None:
        """Submission to completion, as seen by the host (includes reaping latency)."""
        return None if self.finished_at is None else self.finished_at - self.submitted_at

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job finished (True) or ``timeout`` seconds passed (False)."""
        if self._state == _DONE:
            return True
        with _LOCK:
            if self._state == _DONE:
                return True
            event = self._event
            if event is None:
                event = self._event = threading.Event()
        return event.wait(timeout)

    def wait_on(self, stream: Any) -> None:
        """Make ``stream`` (a CUDA stream: int handle, torch/cupy/cuda.core stream) wait on the GPU
        until this job's copies are done, without blocking the host. Cuda backend only; a no-op
        once the job has completed."""
        if self._waiter is None:
            if self._state == _DONE:
                return
            raise TransferError(
                f"{self.kind} job of request {self.request_id!r} op {self.uuid} has no CUDA event "
                "(host backend); use job.wait()"
            )
        self._waiter.wait_on(self, stream)

    @property
    def event(self) -> int | None:
        """Raw ``cudaEvent_t`` handle (int) recorded after this job's copies, while it is in
        flight (cuda backend); None on the host backend or once the job is complete. The event
        is recycled after completion: prefer :meth:`wait_on`, which cannot race with that."""
        return None if self._waiter is None else self._waiter.event_of(self)

    def __repr__(self) -> str:
        state = "running" if not self.done() else ("ok" if self.error is None else f"failed: {self.error}")
        return (
            f"TransferJob({self.kind}, request={self.request_id!r}, uuid={self.uuid}, "
            f"bytes={self.nbytes}, copies={self.num_copies}, {state})"
        )

    # ------------------------------------------------------------------------------ backend side

    def attach(self, state: Any, *, waiter: StreamWaiter | None = None) -> None:
        """Called by the backend that runs this job (see :mod:`kvsched.transfer.backend`): its own
        record for the job, kept as :attr:`backend_state` (it may replace it as the job moves on),
        and, on a backend with CUDA events, itself as the ``waiter`` that :meth:`wait_on` and
        :attr:`event` ask."""
        self.backend_state = state
        if waiter is not None:
            self._waiter = waiter

    def _add_callback(self, fn: Callable[["TransferJob"], None]) -> None:
        self._callbacks.append(fn)

    def _finish(self, error: BaseException | str | None = None) -> None:
        """Record the outcome and mark the handle. Called once by a backend; later calls are ignored."""
        with _LOCK:
            if self._state != _RUNNING:
                return
            self._state = _FINISHING
        self.finished_at = time.perf_counter()
        self._handle_names()  # before the handle goes
        handle, self.handle = self.handle, None
        if error is not None:
            self.error = _describe(error)
            failure = TransferError(
                f"transfer ({self.kind}) of request {self.request_id!r} op {self.uuid} failed: {self.error}"
            )
            if isinstance(error, BaseException):
                failure.__cause__ = error
        # A kvsched handle claimed by the engine is marked through the engine's seam: the caller's
        # own mark_complete() is refused while the copy runs (Scheduler::claim_transfer).
        mark = getattr(handle, "_engine_mark", None) or handle.mark_complete
        try:
            if error is None:
                mark()
            else:
                mark(error=failure)
        except Exception as exc:  # the scheduler closed, or the caller marked the handle already
            log.warning(
                "kvsched: could not mark request %r op %s after its %s transfer: %s: %s",
                self.request_id,
                self.uuid,
                self.kind,
                type(exc).__name__,
                exc,
            )
        for fn in self._callbacks:
            try:
                fn(self)
            except Exception:  # bookkeeping must never stop completion
                log.exception("kvsched: transfer job callback failed")
        with _LOCK:
            self._state = _DONE
            event = self._event
        if event is not None:
            event.set()


def _describe(error: BaseException | str) -> str:
    if isinstance(error, BaseException):
        text = str(error)
        return f"{type(error).__name__}: {text}" if text else type(error).__name__
    return str(error)
