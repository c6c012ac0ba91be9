"""The hand-written stubs (`_core.pyi`, `_bench.pyi`) match the compiled modules (mypy's stubtest),
so they cannot drift from the bindings again."""

import os
import subprocess
import sys

import pytest

ALLOWLIST = os.path.join(os.path.dirname(__file__), "stubtest_allowlist.txt")


@pytest.mark.timeout(300)
def test_stubs_match_the_extension_modules(tmp_path):
    pytest.importorskip("mypy.stubtest", reason="mypy is not installed (it is in the test extras)")
    proc = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "kvsched._core", "kvsched._bench",
         "--allowlist", ALLOWLIST, "--mypy-config-file", os.devnull],
        cwd=tmp_path, capture_output=True, text=True, timeout=280,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
