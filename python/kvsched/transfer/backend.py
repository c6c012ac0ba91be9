"""What ``TransferEngine`` asks of a backend, and the one helper both backends share.

A backend moves the bytes of the jobs the engine gives it and finishes each job exactly once
(:meth:`TransferJob._finish`, which marks the handle). The engine checks every request first
(``kvsched.transfer.plan``), so a backend sees only valid jobs; it may still refuse one when it is
full (``TransferQueueFullError``) or closed (``TransferEngineClosedError``), before copying
anything.

A backend keeps its own per-job record in :attr:`TransferJob.backend_state`, set with
:meth:`TransferJob.attach`; nothing else reads it. A backend whose jobs can order a CUDA stream
(the cuda backend) also passes itself to ``attach`` as the job's :class:`StreamWaiter`, which
``TransferJob.wait_on`` and ``TransferJob.event`` use.

``HostBackend`` (host.py) and ``CudaBackend`` (cuda.py) satisfy :class:`Backend`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from kvsched.transfer.job import TransferJob

__all__ = ["Backend", "StreamWaiter", "event_list"]


class Backend(Protocol):
    """The calls ``TransferEngine`` makes on a backend. Thread-safe: ``submit`` comes from the
    engine's callers' threads, the rest from any thread."""

    @property
    def pending(self) -> int:
        """Jobs submitted and not finished."""
        ...

    def submit(self, job: TransferJob, compute_event: Any = None, wait_event: Any = None) -> None:
        """Start ``job`` and return without waiting for its copies; finish it (once) when they
        have landed or failed. ``compute_event`` / ``wait_event``: events (see :func:`event_list`)
        that must complete before the copies start. Raises, with nothing copied and the job
        unfinished, when the backend is full or closed."""
        ...

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until every submitted job finished; False if ``timeout`` (seconds) passed."""
        ...

    def close(self, timeout: float | None = None) -> bool:
        """Refuse new jobs, let in-flight ones finish, release threads and device resources.
        Idempotent. False (resources kept) if ``timeout`` passed first."""
        ...

    def abandon(self) -> None:
        """The engine was garbage-collected without ``close()``: stop without blocking the
        collecting thread (in-flight jobs still finish)."""
        ...


class StreamWaiter(Protocol):
    """A backend whose jobs record a CUDA event that other streams can wait on."""

    def wait_on(self, job: TransferJob, stream: Any) -> None:
        """Make ``stream`` wait, on the GPU, for ``job``'s copies; nothing once it completed."""
        ...

    def event_of(self, job: TransferJob) -> int | None:
        """The raw event recorded after ``job``'s copies while it is in flight, else None."""
        ...


def event_list(value: Any) -> list[Any]:
    """``compute_event`` / ``wait_event`` as a list: None is no event, a list or tuple is several
    (None entries skipped), anything else is one event."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [v for v in value if v is not None]
    return [value]
