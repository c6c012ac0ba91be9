"""Old name of :mod:`kvsched.testing` (the pure-Python stand-in ``ReferenceScheduler``).

Kept for one release so that code written against ``kvsched.reference`` keeps importing; it will
be removed in the release after 0.1. Import from :mod:`kvsched.testing` instead.
"""

from kvsched.testing import ReferenceHandle, ReferenceScheduler

__all__ = ["ReferenceScheduler", "ReferenceHandle"]
