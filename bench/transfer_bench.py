#!/usr/bin/env python
"""Scattered-block transfer benchmark: kvsched vs one contiguous copy (peak) vs one copy per block.

    python bench/transfer_bench.py                      # host backend (or the GPU with --backend auto)
    python bench/transfer_bench.py --backend cuda --json out/transfer_cuda.json
    python bench/transfer_bench.py --quick              # three sizes, fewer bytes: seconds

The measuring code lives in ``kvsched.bench.transfer_bench`` (importable by the ``kvsched-bench``
runner: ``run_transfer_bench``, ``transfer_summary``, ``format_table``); this file is the
command line around it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from kvsched.bench import transfer_bench as bench


def _size(text: str) -> int:
    text = text.strip().upper().rstrip("B").rstrip("I")
    mult = {"K": 1024, "M": 1024**2, "G": 1024**3}.get(text[-1:], 1)
    return int(float(text[:-1] if text[-1:] in "KMG" else text) * mult)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", default="host", choices=["host", "cuda", "auto"])
    p.add_argument("--sizes", default="4K,16K,64K,256K,1M,2M", help="block sizes, comma separated")
    p.add_argument("--total", default="64M", help="bytes moved per measurement")
    p.add_argument("--max-blocks", type=int, default=16384)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--directions", default="h2d,d2h,both", help="cuda: any of h2d,d2h,both")
    p.add_argument("--batch", default="auto", choices=["auto", "on", "off", "driver", "bindings"],
                   help="cuda: batched copies (auto: C arrays to the driver where it works, measured "
                        "beside cuda-bindings' list API; off: one cudaMemcpyAsync per copy)")
    p.add_argument("--sm-copy", default=None, choices=["off", "auto", "on", "force"],
                   help="cuda: the SM copy kernel (force: every load and store; auto: where --calibration "
                        "measured it faster; see docs/gpu_copies.md)")
    p.add_argument("--calibration", default=None, help="cuda: a bench/cuda_calibrate.py JSON file")
    p.add_argument("--workers", type=int, default=None, help="host backend worker threads")
    p.add_argument("--quick", action="store_true", help="4K,64K,2M and 16 MiB per measurement")
    p.add_argument("--json", metavar="FILE", help="write the result dict as JSON")
    args = p.parse_args(argv)

    sizes = [_size(s) for s in args.sizes.split(",") if s.strip()]
    total = _size(args.total)
    if args.quick:
        sizes, total = [4096, 65536, 2 * 1024 * 1024], 16 * 1024 * 1024
    options = {}
    if args.backend != "host" and args.batch != "auto":
        options["batch"] = {"on": True, "off": False}.get(args.batch, args.batch)
    if args.backend != "host" and args.sm_copy is not None:
        options["sm_copy"] = {"off": False, "on": True}.get(args.sm_copy, args.sm_copy)
    if args.backend != "host" and args.calibration is not None:
        options["calibration"] = args.calibration
    if args.workers is not None:
        options["workers"] = args.workers
    result = bench.run_transfer_bench(
        backend=args.backend,
        block_sizes=sizes,
        total_bytes=total,
        max_blocks=args.max_blocks,
        repeats=args.repeats,
        directions=[d for d in args.directions.split(",") if d],
        progress=lambda msg: print(f"  measuring {msg}", file=sys.stderr, flush=True),
        **options,
    )
    print(bench.format_table(result))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=str)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
