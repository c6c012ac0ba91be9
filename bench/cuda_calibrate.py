#!/usr/bin/env python
"""Calibrate the cuda backend's copy paths on this GPU: every path side by side, JSON + plot.

    python bench/cuda_calibrate.py --out out/                # the default grid (about 1-2 minutes)
    python bench/cuda_calibrate.py --quick --out out/        # 3 block sizes, 2 copy counts

Writes ``cuda_calibrate.json`` (measurements, peak, the derived calibration table, issue 12's
aims) and ``cuda_calibrate.png`` to ``--out``. The engine reads the table with
``TransferEngine(..., calibration="out/cuda_calibrate.json", sm_copy="auto")``.
The measuring code lives in ``kvsched.bench.cuda_calibrate``; this file is the command line.
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
    p.add_argument("--out", required=True, help="directory for cuda_calibrate.json and .png")
    p.add_argument("--blocks", default="4K,8K,16K,32K,64K,256K,2M", help="block sizes, comma separated")
    p.add_argument("--copies", default="64,1024,16384", help="copies per job, comma separated")
    p.add_argument("--directions", default="h2d,d2h,both")
    p.add_argument("--sm-ctas", default="4,12,32", help="CTA caps of the SM kernel to measure (12: the engine's)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-job", default="256M", help="bytes per job at most (copies are cut to fit)")
    p.add_argument("--budget", type=float, default=120.0, help="seconds; no new point starts after that")
    p.add_argument("--device", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="4K,64K,2M x 64,4096: seconds")
    args = p.parse_args(argv)
    if args.quick:
        args.blocks, args.copies = "4K,64K,2M", "64,4096"
    args.block_list = [_size(s) for s in args.blocks.split(",") if s.strip()]
    args.copy_list = [int(s) for s in args.copies.split(",") if s.strip()]
    args.direction_list = [d for d in args.directions.split(",") if d]
    args.cta_list = [int(s) for s in args.sm_ctas.split(",") if s.strip()]
    bad = set(args.direction_list) - {"h2d", "d2h", "both"}
    if bad or not args.block_list or not args.copy_list or args.repeats < 1:
        p.error(f"bad grid (directions {sorted(bad)}, blocks {args.block_list}, copies {args.copy_list})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from kvsched.transfer.cudart import cuda_available

    ok, reason = cuda_available()
    if not ok:
        print(f"cuda_calibrate: needs a CUDA device: {reason}", file=sys.stderr)
        return 2
    from kvsched.bench import cuda_calibrate as cal

    result = cal.run_calibration(
        blocks=args.block_list, copies=args.copy_list, directions=args.direction_list, sm_ctas=args.cta_list,
        repeats=args.repeats, max_job_bytes=_size(args.max_job), budget_s=args.budget, device=args.device,
        progress=lambda msg: print(f"  {msg}", file=sys.stderr, flush=True))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "cuda_calibrate.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")
    try:
        cal.plot(result, os.path.join(args.out, "cuda_calibrate.png"))
    except ImportError as exc:
        print(f"no plot ({exc})", file=sys.stderr)
    print("peak GB/s:", result["peak_gbps"])
    for aim in result["aims"]:
        print(f"aim {'MET' if aim['met'] else 'not met'}: {aim['aim']} >= {aim['target']} (worst {aim['worst']})")
    for note in result["not_adopted"]:
        print("not adopted:", note)
    failed = [m for m in result["measurements"] if not m.get("ok")]
    for m in failed:
        print(f"FAILED: {m['direction']} {m['block']} x {m['copies']} {m['variant']}: {m.get('error', 'data differs')}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
