"""Shared fixtures: every spec test runs against both implementations.

``core`` is the C++ ``kvsched.Scheduler``; it is skipped (with the reason) until it can be
imported. ``reference`` is the pure-Python model ``kvsched.testing.ReferenceScheduler``.
"""

import uuid

import pytest

IMPLS = ["core", "reference"]


def _scheduler_class(name):
    if name == "core":
        try:
            from kvsched import Scheduler as cls
        except Exception as e:  # core not built yet
            pytest.skip(f"kvsched.Scheduler unavailable: {e}")
        return cls
    from kvsched.testing import ReferenceScheduler

    return ReferenceScheduler


@pytest.fixture(params=IMPLS)
def make_scheduler(request):
    """A factory(**kwargs) -> scheduler; every scheduler it made is closed at teardown."""
    cls = _scheduler_class(request.param)
    made = []

    def factory(**kwargs):
        s = cls(**kwargs)
        made.append(s)
        return s

    factory.impl = request.param
    yield factory
    for s in made:
        s.close()


@pytest.fixture
def sched(make_scheduler):
    """A scheduler with default settings."""
    return make_scheduler()


@pytest.fixture
def new_uuid():
    """A fresh uuid.UUID per call."""
    return uuid.uuid4
