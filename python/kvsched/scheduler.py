"""`Scheduler`: the public entry point over the C++ core (SPEC sections 2-3).

The core (``kvsched._core``) owns all state and concurrency. This module only validates the
constructor's arguments, exposes the two sides (``worker`` and ``transfer``), and adds the
asyncio integration of handles (``await h``), which belongs in Python.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any, Sequence

from . import _core
from .protocol import Decision

__all__ = ["Scheduler", "Handle", "WorkerSide", "TransferSide"]

Handle = _core.Handle
WorkerSide = _core.WorkerSide
TransferSide = _core.TransferSide


def _handle_await(self: Any):
    """``await h``: resolves to the Decision without blocking the event loop.

    The loop polls the handle with a short, growing sleep (0.2 ms up to 5 ms): no thread is parked
    per awaiting coroutine, and close() resolves it (to CANCEL, or None if it raced)."""

    async def _wait() -> Decision | None:
        delay = 0.0002
        while True:
            d = self.decision
            if d is not None:
                return d
            if self._closed():
                return self.decision
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.005)

    return _wait().__await__()


Handle.__await__ = _handle_await  # type: ignore[attr-defined]


class Scheduler:
    """Schedules KV-cache block transfers between the worker and the transfer side.

    Args:
        max_inflight: SCHEDULED operations decided EXECUTE and not yet ended, at most (S3).
        layer_names: names for ``LayerNameComplete`` and ``mark_layer_complete(name)``; also sets
            ``num_layers``.
        op_timeout: seconds after which an operation still undecided is cancelled (S12); None:
            never.
        num_layers: layers per iteration, to reject out-of-range marks (S7); None: unchecked.
        removed_memory: uuids of removed slots (and cancelled request ids) remembered so that a
            late transfer half is cancelled at once (S6).
        poll_backlog: decided handles kept for ``transfer.poll`` (S4).
        store_starvation_s: a ready STORE waiting longer than this goes before loads (S3).
    """

    def __init__(
        self,
        max_inflight: int = 64,
        layer_names: Sequence[str] | None = None,
        op_timeout: float | None = None,
        *,
        num_layers: int | None = None,
        removed_memory: int = 65536,
        poll_backlog: int = 65536,
        store_starvation_s: float = 0.05,
    ) -> None:
        from .errors import InvalidArgumentError

        def _int(name: str, value: Any, lo: int) -> int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, not {type(value).__name__}")
            if value < lo:
                raise InvalidArgumentError(f"{name} must be >= {lo}, got {value}")
            return value

        _int("max_inflight", max_inflight, 1)
        _int("removed_memory", removed_memory, 1)
        _int("poll_backlog", poll_backlog, 1)
        names: list[str] = []
        if layer_names is not None:
            if isinstance(layer_names, str):
                raise TypeError("layer_names must be a list of str, not a str")
            names = list(layer_names)
            for n in names:
                if not isinstance(n, str):
                    raise TypeError(f"layer names must be str, not {type(n).__name__}")
            if len(set(names)) != len(names):
                raise InvalidArgumentError("layer_names contains duplicates")
        if num_layers is not None:
            _int("num_layers", num_layers, 1)
            if names and num_layers != len(names):
                raise InvalidArgumentError(
                    f"num_layers={num_layers} disagrees with {len(names)} layer_names"
                )
        layers = num_layers if num_layers is not None else len(names)
        timeout = 0.0
        if op_timeout is not None:
            if isinstance(op_timeout, bool) or not isinstance(op_timeout, (int, float)):
                raise TypeError("op_timeout must be None or a number of seconds")
            if not (op_timeout > 0) or math.isinf(op_timeout):
                raise InvalidArgumentError(f"op_timeout must be a positive number, got {op_timeout}")
            timeout = float(op_timeout)
        if isinstance(store_starvation_s, bool) or not isinstance(store_starvation_s, (int, float)):
            raise TypeError("store_starvation_s must be a number of seconds")
        if not (store_starvation_s >= 0):
            raise InvalidArgumentError("store_starvation_s must be >= 0")

        self._core = _core.Core(
            max_inflight, layers, timeout, removed_memory, poll_backlog,
            float(store_starvation_s), names,
        )
        self.max_inflight = max_inflight
        self.layer_names = tuple(names)
        self.op_timeout = op_timeout
        self.worker: WorkerSide = self._core.worker
        self.transfer: TransferSide = self._core.transfer

    def stats(self) -> dict[str, float | int]:
        """Counters (ints) and latency figures (floats, microseconds): a best-effort snapshot."""
        out: dict[str, float | int] = {}
        for key, value in self._core.stats():
            out[key] = value if key.endswith("_us") else int(value)
        return out

    @property
    def closed(self) -> bool:
        return self._core.closed

    def close(self) -> None:
        """Cancel every undecided operation, wake every waiter; later calls raise
        SchedulerClosedError. Idempotent (S10)."""
        self._core.close()

    def __enter__(self) -> "Scheduler":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<kvsched.Scheduler max_inflight={self.max_inflight} closed={self.closed}>"
