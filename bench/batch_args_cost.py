"""CPU cost per copy of handing a batch to ``cudaMemcpyBatchAsync`` through cuda-bindings.

Runs only where no CUDA device is usable (it refuses otherwise: the addresses it passes are
made up): the call converts its three Python lists (destinations, sources, sizes) to C arrays
before the runtime finds that there is no driver, so timing those failing calls measures the
conversion alone. This is work on the submitting CPU thread for every copy, on top of the
driver's own time per copy.

    python bench/batch_args_cost.py
"""

from __future__ import annotations

import time


def main() -> None:
    try:
        import cuda.bindings
        from cuda.bindings import runtime as rt
    except ImportError as exc:
        raise SystemExit(f"needs cuda-bindings (pip install '.[cuda]'): {exc}") from None
    err, count = rt.cudaGetDeviceCount()
    if int(err) == 0 and count > 0:
        raise SystemExit("a CUDA device is usable here; this measurement passes made-up addresses "
                         "and is meant for machines without one")
    attrs = [rt.cudaMemcpyAttributes()]
    print(f"cuda-bindings {cuda.bindings.__version__}")
    for n in (16, 256, 4096):
        dsts = list(range(0x10000, 0x10000 + n * 4096, 4096))
        srcs = list(range(0x90000000, 0x90000000 + n * 4096, 4096))
        sizes = [4096] * n
        rt.cudaMemcpyBatchAsync(dsts, srcs, sizes, n, attrs, [0], 1, 0)  # warm-up
        reps = 20
        t0 = time.perf_counter()
        for _ in range(reps):
            res = rt.cudaMemcpyBatchAsync(dsts, srcs, sizes, n, attrs, [0], 1, 0)
        per_call = (time.perf_counter() - t0) / reps
        print(f"{n:5d} copies: {per_call * 1e6:8.1f} us per call, {per_call / n * 1e9:5.0f} ns per copy "
              f"(call returned {res[0]})")


if __name__ == "__main__":
    main()
