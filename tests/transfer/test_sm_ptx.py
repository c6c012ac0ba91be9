"""The shipped PTX of the SM copy kernel is the source's, and loads everywhere kvsched runs.

Without nvcc: the source's SHA-256 recorded in the PTX's header must match the source (an edit
without regeneration fails here). With the nvcc release that made the file: regeneration gives
the same bytes. With ptxas (any release): the PTX assembles for sm_75, sm_80 and sm_90, i.e. its
lowered ``.version`` allows every instruction in it (see kernels/gen_ptx.py)."""

from __future__ import annotations

import importlib.util
import re
import shutil

import pytest

from kvsched.transfer import sm_copy

pytestmark = pytest.mark.timeout(120)


def _gen():
    spec = importlib.util.spec_from_file_location("gen_ptx", sm_copy.PTX_PATH.parent / "gen_ptx.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_shipped_ptx_is_generated_from_the_current_source():
    gen = _gen()
    header = gen.shipped_header()
    assert header["source sha256"] == gen.source_sha256(), (
        "sm_copy.cu changed since sm_copy.ptx was generated: run python python/kvsched/transfer/kernels/gen_ptx.py")


def test_the_ptx_targets_what_every_supported_driver_loads():
    text = sm_copy.PTX_PATH.read_text()
    assert re.search(r"^\.version 7\.0$", text, re.M)
    assert re.search(r"^\.target sm_75$", text, re.M)
    assert re.search(r"^\.address_size 64$", text, re.M)
    entry = re.search(r"\.visible \.entry (\w+)\(([^)]*)\)", text)
    assert entry and entry.group(1).encode() == sm_copy.KERNEL_NAME
    # two 64-bit parameters: the table's address and the copy count (what SmCopier.launch packs)
    assert re.findall(r"\.param \.(\w+)", entry.group(2)) == ["u64", "u64"]


def test_regenerating_with_the_same_nvcc_gives_the_same_bytes():
    gen = _gen()
    release = gen.nvcc_release()
    if release is None:
        pytest.skip("nvcc is not on PATH")
    shipped = gen.shipped_header()["nvcc"]
    if release != shipped:
        pytest.skip(f"nvcc {release} here, the shipped PTX came from nvcc {shipped}: output may differ")
    assert gen.generate() == sm_copy.PTX_PATH.read_text()


@pytest.mark.parametrize("arch", ["sm_75", "sm_80", "sm_90"])
def test_ptxas_accepts_the_shipped_ptx(arch):
    ptxas = shutil.which("ptxas")
    if ptxas is None:
        pytest.skip("ptxas is not on PATH")
    done = _gen().assemble(sm_copy.PTX_PATH.read_text(), arch, ptxas)
    if done.returncode != 0 and "not defined for option 'gpu-name'" in done.stderr:
        pytest.skip(f"this ptxas does not know {arch}")
    assert done.returncode == 0, done.stderr
