"""The per-job path choice (kvsched.transfer.copy_path): a pure lookup in a calibration table."""

from __future__ import annotations

import json

import pytest

from kvsched.errors import InvalidArgumentError
from kvsched.transfer.copy_path import (
    DEFAULT_CALIBRATION,
    Calibration,
    CopyChoice,
    DmaSettings,
    choose_path,
    load_calibration,
)

pytestmark = pytest.mark.timeout(60)

SM = CopyChoice("sm")
DMA = CopyChoice("dma")
DMA_FLAT = CopyChoice("dma", DmaSettings(prefer_overlap=False, one_call=True))


def _table() -> Calibration:
    # h2d: the kernel wins for small blocks once there are enough copies; d2h: DMA without the
    # overlap hint for big blocks.
    return Calibration(cells={
        "h2d": ((4096, 64, DMA), (4096, 1024, SM), (16384, 64, DMA), (16384, 1024, SM), (65536, 64, DMA)),
        "d2h": ((4096, 64, DMA), (65536, 64, DMA_FLAT)),
    }, source="test")


def test_the_built_in_calibration_is_the_copy_engine_with_the_old_settings():
    for direction in ("h2d", "d2h", "d2d"):
        for block in (1, 4096, 2 << 20):
            for copies in (1, 64, 16384):
                choice = choose_path(direction, block, copies, DEFAULT_CALIBRATION, sm_ready=True)
                assert choice == CopyChoice("dma", DmaSettings(prefer_overlap=True, src_order="stream",
                                                               one_call=False))
    assert not DEFAULT_CALIBRATION.uses_sm


@pytest.mark.parametrize("block, copies, want", [
    (4096, 64, DMA), (4096, 1023, DMA), (4096, 1024, SM), (8192, 5000, SM),    # 8 KiB -> the 4 KiB row
    (1024, 2048, SM),                                                          # below every row: the smallest
    (16384, 10, DMA),                                                          # below every count: the smallest
    (32768, 4096, SM), (65536, 4096, DMA), (2 << 20, 1 << 20, DMA),            # above: extrapolated upwards
])
def test_h2d_lookup_takes_the_cell_at_or_below(block, copies, want):
    assert choose_path("h2d", block, copies, _table(), sm_ready=True) == want


def test_an_sm_cell_gives_the_default_when_the_kernel_is_not_ready():
    cal = _table()
    assert choose_path("h2d", 4096, 4096, cal, sm_ready=True) == SM
    assert choose_path("h2d", 4096, 4096, cal, sm_ready=False) == cal.default
    assert choose_path("h2d", 4096, 4096, cal) == cal.default  # not ready unless said so


def test_directions_have_their_own_cells():
    cal = _table()
    assert choose_path("d2h", 1 << 20, 100, cal, sm_ready=True) == DMA_FLAT
    assert choose_path("d2h", 4096, 100_000, cal, sm_ready=True) == DMA
    assert choose_path("d2d", 4096, 100_000, cal, sm_ready=True) == cal.default
    assert cal.uses_sm


def test_dict_and_json_round_trip(tmp_path):
    cal = _table()
    data = cal.to_dict()
    assert Calibration.from_dict(json.loads(json.dumps(data))) == cal
    path = tmp_path / "cal.json"
    path.write_text(json.dumps({"calibration": data, "measurements": []}))  # cuda_calibrate's file
    loaded = load_calibration(str(path))
    assert loaded.cells == cal.cells and loaded.source == "test"
    assert load_calibration(None) is DEFAULT_CALIBRATION
    assert load_calibration(cal) is cal
    assert load_calibration(data) == cal


def test_out_of_stream_order_reads_are_refused():
    data = _table().to_dict()
    data["cells"]["h2d"][0][2]["src_order"] = "any"
    with pytest.raises(InvalidArgumentError, match="stream order"):
        Calibration.from_dict(data)


@pytest.mark.parametrize("bad, match", [
    ({"cells": {"x2y": [[4096, 1, {"path": "dma"}]]}}, "direction"),
    ({"cells": {"h2d": [[4096, 1, {"path": "gpu"}]]}}, "copy path"),
    ({"cells": {"h2d": [[0, 1, {"path": "dma"}]]}}, "bad calibration cell"),
    ({"cells": {"h2d": [[4096, 1, {"path": "dma", "colour": 1}]]}}, "unknown"),
])
def test_bad_tables_are_refused(bad, match):
    with pytest.raises(InvalidArgumentError, match=match):
        Calibration.from_dict(bad)


def test_unsorted_cells_are_refused_and_other_types_are_type_errors():
    with pytest.raises(InvalidArgumentError, match="sorted"):
        Calibration(cells={"h2d": ((65536, 1, DMA), (4096, 1, DMA))})
    with pytest.raises(TypeError):
        load_calibration(42)
