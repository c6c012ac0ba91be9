"""Timed sections with the setup heap frozen, for every benchmark of kvsched-bench."""

from __future__ import annotations

import contextlib
import gc
from typing import Iterator


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """Collects, then moves everything the setup allocated to the permanent generation for the
    timed part, as a serving engine freezes its heap after start-up. Otherwise a full collection,
    which walks every setup object, lands in whichever path happens to be running: measured, one
    29 ms gen-2 pass stalled a simulated layer by 26 ms, and the Python scheduler paths' figures
    swung by 2x. A pause of the runtime, not of scheduling or transfers."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
