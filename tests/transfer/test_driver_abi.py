"""kvsched's driver-level calls through the real cuda-bindings driver module, without a GPU: a
stand-in ``libcuda.so.1`` (``abi/fake_libcuda.c``, built here with the system C compiler) is put
first on the library path of a subprocess, so ``cuda.bindings.driver`` loads it and the calls
reach C. This checks what the Python-level stand-in cannot: that cuda-bindings hands
``cuGetProcAddress`` the symbol, ABI version and flags kvsched asks for and returns the entry
point as an address, that ctypes calls it with the CUDA 12.8 prototype (C arrays, attributes,
failIdx, stream), and the argument forms of the spin kernel's module load and launch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transfer_helpers import c_compiler

from kvsched.transfer.cudart import cuda_available

pytestmark = pytest.mark.timeout(120)

HERE = Path(__file__).parent / "abi"


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    try:
        import cuda.bindings.driver  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"needs cuda-bindings ({exc})")
    if c_compiler() is None:
        pytest.skip("needs a C compiler to build the stand-in libcuda.so.1")
    if cuda_available()[0]:
        pytest.skip("a real CUDA driver works here: the GPU tests cover these calls")
    lib_dir = tmp_path_factory.mktemp("fake_libcuda")
    subprocess.run([c_compiler(), "-O1", "-shared", "-fPIC", str(HERE / "fake_libcuda.c"), "-o",
                    str(lib_dir / "libcuda.so.1")], check=True, capture_output=True, timeout=60)
    env = dict(os.environ, LD_LIBRARY_PATH=f"{lib_dir}:{os.environ.get('LD_LIBRARY_PATH', '')}")
    proc = subprocess.run([sys.executable, str(HERE / "probe.py")], env=env, capture_output=True,
                          text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_batch_entry_point_is_the_cuda_12_8_one(probe):
    assert probe["proc_version"] == 12080
    assert probe["proc_flags"] == 1  # CU_GET_PROC_ADDRESS_LEGACY_STREAM


def test_batch_call_passes_c_arrays_attributes_and_stream(probe):
    copy = probe["copy"]
    assert copy["rc"] == 0 and copy["exact"], copy  # 15 scattered copies landed, from offsets
    assert copy["count"] == 15
    assert copy["order"] == 1 and copy["flags"] == 1  # stream order; prefer overlap with compute
    assert copy["num_attrs"] == 1 and copy["attr_index"] == 0
    assert copy["stream"] == 0x5555


def test_batch_failure_reports_the_copy_and_names_the_error(probe):
    assert probe["failure"] == [700, 1]
    assert probe["error_name"] == "CUDA_ERROR_FAKE (fake error)"


def test_spin_kernel_module_and_launch_arguments(probe):
    k = probe["kernel"]
    assert k["load"] == 0 and k["get"] == 0 and k["launch"] == 0
    assert k["image_head"].lstrip().startswith(".version 7.0")
    assert k["function"] == "kvsched_spin_ns"
    assert k["param0"] == 123456789
    assert k["stream"] == 0x7777
    assert k["grid"] == [1, 1, 1] and k["block"] == [1, 1, 1]
