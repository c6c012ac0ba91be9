#!/usr/bin/env python
"""Slowdown of a concurrent GEMM while each copy path runs (issue 12: the SM path at most 5 %).

    python bench/copy_interference.py --out out/
    python bench/copy_interference.py --quick --out out/

Writes ``copy_interference.json`` to ``--out``. Needs a GPU and torch or cupy. The measuring
code lives in ``kvsched.bench.copy_interference``; this file is the command line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _size(text: str) -> int:
    text = text.strip().upper().rstrip("B").rstrip("I")
    mult = {"K": 1024, "M": 1024**2, "G": 1024**3}.get(text[-1:], 1)
    return int(float(text[:-1] if text[-1:] in "KMG" else text) * mult)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="directory for copy_interference.json")
    p.add_argument("--paths", default="dma,loop,sm-4,sm-12,sm-32", help="dma, loop, sm-<ctas>, comma separated")
    p.add_argument("--blocks", default="4K,64K")
    p.add_argument("--directions", default="h2d,d2h")
    p.add_argument("--copies", type=int, default=1024, help="copies per job")
    p.add_argument("--gemm", type=int, default=8192, help="GEMM size n (n x n by n x n)")
    p.add_argument("--iters", type=int, default=20, help="GEMMs per timing")
    p.add_argument("--device", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="dma,sm-12 at 16K, h2d only")
    args = p.parse_args(argv)
    if args.quick:
        args.paths, args.blocks, args.directions = "dma,sm-12", "16K", "h2d"
    from kvsched.bench.copy_interference import engine_options

    args.path_list = [s for s in args.paths.split(",") if s]
    for path in args.path_list:
        try:
            engine_options(path)
        except ValueError as exc:
            p.error(str(exc))
    args.block_list = [_size(s) for s in args.blocks.split(",") if s.strip()]
    args.direction_list = [d for d in args.directions.split(",") if d]
    if set(args.direction_list) - {"h2d", "d2h"} or args.copies < 1 or args.iters < 1:
        p.error("directions are h2d and d2h; copies and iters are >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from kvsched.transfer.cudart import cuda_available

    ok, reason = cuda_available()
    if not ok:
        print(f"copy_interference: needs a CUDA device: {reason}", file=sys.stderr)
        return 2
    from kvsched.bench.copy_interference import run_interference

    result = run_interference(paths=args.path_list, blocks=args.block_list, directions=args.direction_list,
                              gemm_n=args.gemm, iters=args.iters, copies=args.copies, device=args.device,
                              progress=lambda msg: print(f"  {msg}", file=sys.stderr, flush=True))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "copy_interference.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")
    print(json.dumps(result["summary"], indent=1))
    return 1 if any(r.get("slowdown") is None for r in result["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
