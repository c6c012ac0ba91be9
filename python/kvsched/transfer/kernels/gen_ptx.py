#!/usr/bin/env python
"""Regenerate ``sm_copy.ptx`` (shipped in the package) from ``sm_copy.cu`` with the local nvcc.

    python python/kvsched/transfer/kernels/gen_ptx.py           # rewrite sm_copy.ptx
    python python/kvsched/transfer/kernels/gen_ptx.py --check   # exit 1 if it would change

Why PTX and not a binary: the package needs no compiler at install time and no build per GPU;
the driver compiles PTX for whatever GPU it finds when kvsched loads it (``cuModuleLoadData``).

Target and ISA version, chosen to load everywhere kvsched runs:

* ``-arch=compute_75``: the oldest virtual architecture CUDA 13's nvcc still emits; a driver
  compiles sm_75 PTX for every newer GPU (H100/H200 are sm_90).
* ``.version 7.0``: nvcc 13 writes ``.version 9.0``, which only a CUDA 13 driver accepts (a driver
  loads PTX up to the ISA version of its own CUDA release). The kernel uses nothing newer than
  ISA 6.0 (``shfl.sync``, vector loads and stores), so the line is lowered to 7.0 (CUDA 11.0),
  below every driver kvsched supports (CUDA 12.0 and later). The check that this is sound is
  ptxas: it rejects an instruction its ``.version`` does not allow, and the tests assemble the
  shipped PTX for sm_75, sm_80 and sm_90 wherever ptxas is installed.

The compiler's banner (build id, release) is replaced by a header naming the source's SHA-256
and the nvcc release, so a test can tell whether the shipped file is stale without nvcc, and
compare byte for byte when the same nvcc release is present.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "sm_copy.cu"
SHIPPED = HERE / "sm_copy.ptx"
ARCH = "compute_75"
ISA_VERSION = "7.0"
NVCC_FLAGS = ("-ptx", f"-arch={ARCH}", "-O3", "-std=c++17")


def source_sha256(path: Path = SOURCE) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def nvcc_release(nvcc: str = "nvcc") -> str | None:
    """``"13.0, V13.0.88"`` of the nvcc on PATH, or None without one."""
    exe = shutil.which(nvcc)
    if exe is None:
        return None
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False).stdout
    m = re.search(r"release ([^\n]+)", out)
    return m.group(1).strip() if m else None


def shipped_header(path: Path = SHIPPED) -> dict[str, str]:
    """The ``// key: value`` lines at the top of the shipped PTX."""
    out = {}
    for line in path.read_text().splitlines():
        if not line.startswith("//"):
            break
        key, sep, value = line[2:].partition(":")
        if sep:
            out[key.strip()] = value.strip()
    return out


def generate(nvcc: str = "nvcc") -> str:
    """The PTX text that :data:`SHIPPED` should hold, compiled now. Raises without nvcc."""
    exe = shutil.which(nvcc)
    if exe is None:
        raise FileNotFoundError("nvcc is not on PATH")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "sm_copy.ptx"
        subprocess.run([exe, *NVCC_FLAGS, str(SOURCE), "-o", str(out)], check=True)
        text = out.read_text()
    body = [line for line in text.splitlines() if not line.startswith("//")]
    while body and not body[0].strip():
        body.pop(0)
    if not body or not body[0].startswith(".version "):
        raise RuntimeError(f"unexpected nvcc output: {body[:1]}")
    body[0] = f".version {ISA_VERSION}"
    header = [
        "// kvsched SM copy kernel, generated from sm_copy.cu by gen_ptx.py: do not edit",
        f"// source sha256: {source_sha256()}",
        f"// nvcc: {nvcc_release(nvcc)}",
        f"// flags: {' '.join(NVCC_FLAGS)}; .version lowered to {ISA_VERSION} (see gen_ptx.py)",
        "",
    ]
    return "\n".join(header + body) + "\n"


def assemble(ptx: str, arch: str, ptxas: str = "ptxas") -> subprocess.CompletedProcess:
    """Run ptxas on ``ptx`` for ``arch`` (e.g. "sm_90"); what a driver's JIT would do."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        return subprocess.run([ptxas, f"-arch={arch}", str(src), "-o", str(Path(tmp) / "k.cubin")],
                              capture_output=True, text=True, check=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="compare with the shipped file, write nothing")
    args = p.parse_args(argv)
    text = generate()
    if args.check:
        same = SHIPPED.exists() and SHIPPED.read_text() == text
        print(f"{SHIPPED}: {'up to date' if same else 'STALE'}")
        return 0 if same else 1
    SHIPPED.write_text(text)
    print(f"wrote {SHIPPED}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
