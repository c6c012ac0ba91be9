"""Typed stubs of kvsched._bench: the benchmark entry points kvsched-bench uses (private)."""

def core(ops: int, threads: int = 1) -> tuple[int, float]:
    """The core's own op-lifecycle loop, no Python in it; returns (ops done, seconds)."""

def spin(seconds: float) -> None:
    """Busy CPU work with the GIL released."""
