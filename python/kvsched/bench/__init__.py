"""kvsched-bench: a simulated serving engine and side-by-side baselines (contract section 5,
docs/contract.md).

Modules: :mod:`.scheduler_bench` (ops/s of the core, the Python API and the reference model;
dispatch latency; thread scaling), :mod:`.engine_sim` (layer-wise onboarding and offloading
around simulated compute), :mod:`.transfer_bench` (scattered block copies against the
contiguous peak and a per-block loop), :mod:`.report` (tables, JSON, plot) and
:mod:`.__main__` (the command line).
"""

__all__ = ["main"]


def main(argv=None) -> int:  # re-exported for `kvsched-bench`
    from .__main__ import main as _main

    return _main(argv)
