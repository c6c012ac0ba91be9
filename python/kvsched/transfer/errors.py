"""Errors of the transfer layer. All are :class:`~kvsched.errors.KvschedError` subclasses."""

from __future__ import annotations

from kvsched.errors import KvschedError

__all__ = ["TransferError", "TransferQueueFullError", "TransferEngineClosedError", "CudaError"]


class TransferError(KvschedError):
    """A copy failed. Passed to ``handle.mark_complete(error=...)``, so the slot records why (S11)."""


class TransferQueueFullError(KvschedError):
    """Backpressure: the engine already holds ``max_pending`` unfinished jobs (or a copy stream's
    queue budget is used up). Raised by ``submit`` before anything is launched; the handle is left
    untouched, so the caller may retry it later (e.g. next iteration) or mark it failed."""


class TransferEngineClosedError(KvschedError):
    """``submit`` after ``close()``."""


class CudaError(KvschedError):
    """A CUDA runtime call returned an error. ``code`` is the numeric ``cudaError_t``, ``name`` its
    name (e.g. ``"cudaErrorInvalidValue"``)."""

    def __init__(self, message: str, code: int = -1, name: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.name = name
