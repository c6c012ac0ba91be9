"""Fixtures for the transfer tests: a minimal scheduler handle, so these tests do not depend on
the scheduler (one test in test_host_backend.py uses the reference model when it exists); engines
on the host backend and on the stand-in CUDA runtime; and the skip for tests that need a GPU."""

from __future__ import annotations

import numpy as np
import pytest
from fake_cudart import FakeRuntime
from transfer_helpers import FakeHandle

from kvsched.protocol import Decision
from kvsched.transfer.cudart import cuda_available


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



@pytest.fixture(scope="session")
def gpu():
    """Skips the test, with the reason, unless a CUDA device is usable."""
    ok, reason = cuda_available()
    if not ok:
        pytest.skip(f"no usable CUDA device: {reason}")
    return reason


@pytest.fixture
def fake():
    """A stand-in CUDA runtime (fake_cudart.py)."""
    return FakeRuntime()


@pytest.fixture
def cuda_engine(fake):
    """Factory for cuda-backend engines on the stand-in runtime (``runtime=`` for another one);
    all are closed at teardown."""
    from kvsched.transfer.engine import TransferEngine

    made = []

    def factory(runtime=None, **kwargs):
        kwargs.setdefault("poll_interval", (1e-5, 1e-4))
        eng = TransferEngine(None, backend="cuda", runtime=runtime or fake, **kwargs)
        made.append(eng)
        return eng

    yield factory
    for eng in made:
        eng.close(timeout=10)
