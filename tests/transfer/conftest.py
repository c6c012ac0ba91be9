"""Fixtures for the transfer tests: a minimal scheduler handle, so these tests do not depend on
the scheduler (one test in test_host_backend.py uses the reference model when it exists)."""

from __future__ import annotations

import numpy as np
import pytest
from transfer_helpers import FakeHandle

from kvsched.protocol import Decision


@pytest.fixture
def make_handle():
    counter = iter(range(10**9))

    def factory(decision=Decision.EXECUTE, request_id=None):
        return FakeHandle(decision, request_id or f"req-{next(counter)}")

    return factory


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture
def host_engine():
    """Factory for host-backend engines; all are closed at teardown."""
    from kvsched.transfer.engine import TransferEngine

    made = []

    def factory(**kwargs):
        kwargs.setdefault("workers", 2)
        eng = TransferEngine(None, backend="host", **kwargs)
        made.append(eng)
        return eng

    yield factory
    for eng in made:
        eng.close(timeout=10)

