"""Helpers shared by the transfer tests (importable: tests/transfer is on sys.path)."""

from __future__ import annotations

import os
import shutil
import threading
import uuid as _uuid

import numpy as np

from kvsched.errors import ProtocolError
from kvsched.protocol import Decision


class FakeHandle:
    """The handle interface the engine consumes: decision, request_id, uuid, mark_complete."""

    def __init__(self, decision=Decision.EXECUTE, request_id: str = "req-0", uuid=None) -> None:
        self.decision = decision
        self.request_id = request_id
        self.uuid = uuid or _uuid.uuid4()
        self.marks: list = []
        self.marked = threading.Event()
        self._lock = threading.Lock()

    def mark_complete(self, error=None) -> None:
        with self._lock:
            if self.marks:
                raise ProtocolError(f"request {self.request_id!r} op {self.uuid} marked twice")
            self.marks.append(error)
        self.marked.set()

    @property
    def completed(self) -> bool:
        return len(self.marks) == 1 and self.marks[0] is None

    @property
    def failed(self) -> bool:
        return len(self.marks) == 1 and self.marks[0] is not None

    @property
    def error_text(self) -> str:
        return str(self.marks[0]) if self.failed else ""


def random_pairs(rng, n_src: int, n_dst: int, count: int) -> np.ndarray:
    """``count`` (src, dst) pairs: random sources, distinct random destinations."""
    src = rng.integers(0, n_src, size=count)
    dst = rng.permutation(n_dst)[:count]
    return np.stack([src, dst], axis=1).astype(np.int64)


def c_compiler() -> str | None:
    """The system C compiler ($CC, cc or gcc), or None: tests that build C skip without one."""
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
