"""The pure parts of the GPU copy-path experiments (bench/cuda_calibrate.py,
bench/copy_interference.py): variant names, the grid, the calibration derived from measurements,
the aims, the interference arithmetic, the plot, and the command lines' clear failure without a
GPU. The measuring itself runs in bench/gpu_check.sh on a GPU machine."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from kvsched.bench import copy_interference as ci
from kvsched.bench import cuda_calibrate as cc
from kvsched.transfer.copy_path import Calibration, CopyChoice, DmaSettings, choose_path
from kvsched.transfer.cudart import cuda_available

pytestmark = pytest.mark.timeout(120)

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_variants_cover_the_issue_grid():
    h2d = cc.variants("h2d", (4, 12))
    assert len([v for v in h2d if v.startswith("dma-")]) == 8  # hint x order x calls
    assert cc.DEFAULT_VARIANT in h2d and "loop" in h2d and {"sm-4", "sm-12"} <= set(h2d)
    d2h = cc.variants("d2h", (12,), loop=False)
    assert not any("-any-" in v for v in d2h) and "loop" not in d2h and len(d2h) == 5
    for v in h2d + ["contig"]:
        assert cc.parse_variant(v)["path"] in ("dma", "sm", "loop", "contig")
    assert cc.parse_variant("dma-no-any-one") == {"path": "dma", "prefer_overlap": False, "src_order": "any",
                                                   "one_call": True}
    for bad in ("dma-ov-stream", "sm-x", "dma-maybe-stream-one", "nvlink"):
        with pytest.raises(ValueError):
            cc.parse_variant(bad)


def test_grid_cuts_copies_to_the_job_size_and_drops_duplicates():
    pts = cc.grid([4096, 2 << 20], [64, 16384], 256 << 20)
    assert pts == [(4096, 64), (4096, 16384), (2 << 20, 64), (2 << 20, 128)]
    assert cc.grid([1 << 30], [64], 256 << 20) == [(1 << 30, 1)]


def _m(direction, block, copies, variant, gbps, ratio=None, ok=True):
    return {"direction": direction, "block": block, "copies": copies, "variant": variant, "gbps": gbps,
            "ratio": ratio if ratio is not None else gbps / 50, "ok": ok}


def _measurements():
    d = cc.DEFAULT_VARIANT
    return [
        # 4 KiB x 1024 h2d: the kernel at 12 CTAs wins clearly
        _m("h2d", 4096, 1024, d, 5.0), _m("h2d", 4096, 1024, "dma-no-stream-one", 5.1),
        _m("h2d", 4096, 1024, "sm-12", 40.0), _m("h2d", 4096, 1024, "sm-32", 48.0),
        _m("h2d", 4096, 1024, "loop", 2.0),
        # 64 KiB h2d: dropping the hint and one call win by 20 %
        _m("h2d", 65536, 1024, d, 30.0), _m("h2d", 65536, 1024, "dma-no-stream-one", 36.0),
        _m("h2d", 65536, 1024, "sm-12", 20.0),
        # 2 MiB h2d: within the margin -> default; an out-of-order read is faster but unusable
        _m("h2d", 2 << 20, 128, d, 50.0), _m("h2d", 2 << 20, 128, "dma-no-stream-chunk", 51.0),
        _m("h2d", 2 << 20, 128, "dma-ov-any-chunk", 60.0),
        # d2h 4 KiB: the kernel's run failed its check: never adopted
        _m("d2h", 4096, 1024, d, 6.0), _m("d2h", 4096, 1024, "sm-12", 45.0, ok=False),
        _m("d2h", 4096, 1024, "loop", 2.5),
        # both at once
        _m("both", 65536, 1024, d, 85.0), _m("both", 65536, 1024, "sm-12", 70.0),
        # no default measured: no cell
        _m("d2h", 65536, 64, "sm-12", 9.0),
    ]


def test_derived_calibration_keeps_clear_wins_of_usable_choices():
    table, notes = cc.derive_calibration(_measurements(), sm_ctas=12, source="test")
    assert table.cells["h2d"] == (
        (4096, 1024, CopyChoice("sm")),
        (65536, 1024, CopyChoice("dma", DmaSettings(prefer_overlap=False, one_call=True))),
        (2 << 20, 128, CopyChoice()),
    )
    assert table.cells["d2h"] == ((4096, 1024, CopyChoice()),)
    assert any("sm-32" in n for n in notes) and any("dma-ov-any-chunk" in n for n in notes)
    # the engine reads it back from the JSON form
    again = Calibration.from_dict(json.loads(json.dumps({"calibration": table.to_dict()})))
    assert choose_path("h2d", 4096, 4096, again, sm_ready=True) == CopyChoice("sm")
    # without the SM path adopted, the kernel's cell stays on the copy engine (5.1 against 5.0
    # GB/s is inside the margin)
    no_sm, _ = cc.derive_calibration(_measurements(), sm_ctas=None)
    assert no_sm.cells["h2d"][0] == (4096, 1024, CopyChoice()) and not no_sm.uses_sm


def test_aims_are_checked_against_the_best_usable_choice():
    aims = {a["aim"]: a for a in cc.check_aims(_measurements())}
    big = aims["ratio to contiguous, >= 32 KiB blocks"]
    assert big["points"] == {"h2d 65536 x 1024": 0.72, "h2d 2097152 x 128": 1.02, "d2h 65536 x 64": 0.18}
    assert big["worst"] == 0.18 and not big["met"]
    small = aims["ratio to contiguous, 4-16 KiB blocks, >= 1024 copies"]
    assert small["points"]["h2d 4096 x 1024"] == 0.96 and small["points"]["d2h 4096 x 1024"] == 0.12
    loop = aims["speed-up over the per-block loop, 4-8 KiB blocks"]
    assert loop["points"] == {"h2d 4096 x 1024": 24.0, "d2h 4096 x 1024": 2.4} and loop["met"]
    both = aims["both directions at once, GB/s, >= 64 KiB blocks"]
    assert both["worst"] == 85.0 and both["met"]
    assert cc.check_aims([])[0]["met"] is False


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    result = {"gpu": "test", "peak_gbps": {"h2d": 50.0, "d2h": 50.0, "both": 90.0},
              "measurements": _measurements()}
    cc.plot(result, str(tmp_path / "c.png"))
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_interference_arithmetic_and_options():
    assert ci.slowdown(1.0, 1.0, 1.05) == pytest.approx(0.05)
    assert ci.slowdown(0.9, 1.1, 1.0) == pytest.approx(0.0)
    with pytest.raises(ValueError):
        ci.slowdown(0, 0, 1)
    assert ci.engine_options("dma") == {"sm_copy": False}
    assert ci.engine_options("loop") == {"sm_copy": False, "batch": False}
    assert ci.engine_options("sm-12") == {"sm_copy": "force", "sm_ctas": 12}
    with pytest.raises(ValueError):
        ci.engine_options("sm-")
    rows = [{"path": "sm-12", "slowdown": 0.03}, {"path": "sm-12", "slowdown": 0.04},
            {"path": "sm-32", "slowdown": 0.2}, {"path": "dma", "slowdown": 0.01}, {"path": "loop", "slowdown": None}]
    s = ci.summarise(rows)
    assert s["worst_slowdown"] == {"dma": 0.01, "sm-12": 0.04, "sm-32": 0.2}
    assert s["sm_aim_met"] == {"sm-12": True, "sm-32": False}


def test_command_lines_parse_and_refuse_bad_grids():
    cal = _script("cuda_calibrate")
    args = cal.parse_args(["--out", "x", "--blocks", "4K,2M", "--copies", "64", "--sm-ctas", "12"])
    assert args.block_list == [4096, 2 << 20] and args.copy_list == [64] and args.cta_list == [12]
    assert cal.parse_args(["--out", "x", "--quick"]).block_list == [4096, 65536, 2 << 20]
    with pytest.raises(SystemExit):
        cal.parse_args(["--out", "x", "--directions", "h2h"])
    with pytest.raises(SystemExit):
        cal.parse_args([])  # --out is required
    inter = _script("copy_interference")
    args = inter.parse_args(["--out", "x", "--paths", "dma,sm-8", "--blocks", "16K"])
    assert args.path_list == ["dma", "sm-8"] and args.block_list == [16384]
    with pytest.raises(SystemExit):
        inter.parse_args(["--out", "x", "--paths", "dma,sm"])


def test_without_a_gpu_the_experiments_fail_clearly(tmp_path, capsys):
    ok, _ = cuda_available()
    if ok:
        pytest.skip("a GPU is usable here: the experiments would run (bench/gpu_check.sh runs them)")
    assert _script("cuda_calibrate").main(["--out", str(tmp_path)]) == 2
    assert _script("copy_interference").main(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "cuda_calibrate: needs a CUDA device" in err and "copy_interference: needs a CUDA device" in err
    assert not list(tmp_path.iterdir())
