"""Which way a cuda job's copies go: the copy engine (DMA) or the SM copy kernel, and with which
DMA settings. See docs/gpu_copies.md.

:func:`choose_path` is a pure function of the job's direction, mean bytes per copy and number of
copies, looked up in a :class:`Calibration`: a table of measured cells, each the best choice for
one (direction, block size, copies) point of ``bench/cuda_calibrate.py``'s grid. A job takes the
cell at the largest measured block size at or below its own and, within it, the largest measured
copy count at or below its own (the smallest cell where the job is below every cell): a choice is
only ever extrapolated upwards from a measured point, never interpolated between two.

Mean bytes per copy, not the pool's block size: coalesced runs are single larger copies, and the
copy engine's cost is per copy.

The built-in calibration (:data:`DEFAULT_CALIBRATION`) has no cells: every job goes to the copy
engine with the settings kvsched used before any measurement (the prefer-overlap hint on, sources
read in stream order, batch calls of 32, 64, 128, ... copies). It stays so until a measurement on
the GPU says otherwise (``bench/RESULTS.md``).
"""

from __future__ import annotations

import json
import os
from bisect import bisect_right
from dataclasses import asdict, dataclass, field
from typing import Any

from kvsched.errors import InvalidArgumentError

__all__ = ["DmaSettings", "CopyChoice", "Calibration", "DEFAULT_CALIBRATION", "choose_path", "load_calibration",
           "PATHS", "DIRECTIONS"]

PATHS = ("dma", "sm")
DIRECTIONS = ("h2d", "d2h")
_SRC_ORDERS = ("stream", "any")


@dataclass(frozen=True)
class DmaSettings:
    """How the batched DMA path calls ``cuMemcpyBatchAsync``."""

    #: ``CU_MEMCPY_FLAG_PREFER_OVERLAP_WITH_COMPUTE``: since CUDA 13.1 it forces the copy engines,
    #: which start small copies sooner but may not reach full bandwidth (rapidsai/cudf#23674)
    prefer_overlap: bool = True
    #: "stream": each copy reads its source after the stream's earlier work; "any": the driver may
    #: read it earlier. Only "stream" is used by the engine (see Calibration.from_dict); "any" is
    #: measured by the calibration for the record.
    src_order: str = "stream"
    #: one batch call per job instead of calls of 32, 64, 128, ... copies
    one_call: bool = False


@dataclass(frozen=True)
class CopyChoice:
    """The path of a job and, for DMA, its settings."""

    path: str = "dma"
    dma: DmaSettings = field(default_factory=DmaSettings)

    def __post_init__(self) -> None:
        if self.path not in PATHS:
            raise InvalidArgumentError(f"copy path must be one of {PATHS}, got {self.path!r}")
        if self.dma.src_order not in _SRC_ORDERS:
            raise InvalidArgumentError(f"src_order must be one of {_SRC_ORDERS}, got {self.dma.src_order!r}")


_DEFAULT_CHOICE = CopyChoice()


@dataclass(frozen=True)
class Calibration:
    """Measured best choices. ``cells[direction]`` is a sorted tuple of ``(block_bytes, copies,
    CopyChoice)``; ``source`` says where the table came from (a file, a GPU, a date)."""

    cells: dict[str, tuple[tuple[int, int, CopyChoice], ...]] = field(default_factory=dict)
    default: CopyChoice = _DEFAULT_CHOICE
    source: str = "built-in defaults (not measured)"

    def __post_init__(self) -> None:
        for direction, cells in self.cells.items():
            if direction not in DIRECTIONS:
                raise InvalidArgumentError(f"calibration direction must be one of {DIRECTIONS}, got {direction!r}")
            if list(cells) != sorted(cells, key=lambda c: (c[0], c[1])):
                raise InvalidArgumentError(f"calibration cells of {direction} are not sorted by (block, copies)")
            for block, copies, choice in cells:
                if int(block) < 1 or int(copies) < 1 or not isinstance(choice, CopyChoice):
                    raise InvalidArgumentError(f"bad calibration cell {(block, copies, choice)!r}")

    @property
    def uses_sm(self) -> bool:
        """True when some cell chooses the SM path (the backend then sets it up at start-up)."""
        return any(c[2].path == "sm" for cells in self.cells.values() for c in cells)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "default": _choice_dict(self.default),
            "cells": {d: [[b, n, _choice_dict(c)] for b, n, c in cells] for d, cells in self.cells.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Calibration":
        """Read :meth:`to_dict`'s form (also the ``calibration`` entry of cuda_calibrate's JSON).
        A cell that reads sources out of stream order is refused: a load's copies must not start
        before the events its stream waits on (contract section 4)."""
        if "calibration" in data and "cells" not in data:
            data = data["calibration"]
        cells = {}
        for direction, rows in dict(data.get("cells", {})).items():
            parsed = sorted(((int(b), int(n), _choice(c)) for b, n, c in rows), key=lambda r: (r[0], r[1]))
            cells[str(direction)] = tuple(parsed)
        out = cls(cells=cells, default=_choice(data.get("default", {})), source=str(data.get("source", "a file")))
        for choice in [out.default] + [c for rows in cells.values() for _, _, c in rows]:
            if choice.dma.src_order != "stream":
                raise InvalidArgumentError("a calibration may not read sources out of stream order (src_order='any')")
        return out


DEFAULT_CALIBRATION = Calibration()


def choose_path(direction: str, block_bytes: int, copies: int, calibration: Calibration = DEFAULT_CALIBRATION,
                *, sm_ready: bool = False) -> CopyChoice:
    """The :class:`CopyChoice` for a job of ``copies`` copies of ``block_bytes`` bytes on average,
    in ``direction`` ("h2d", "d2h" or "d2d"). ``sm_ready``: the SM path passed its self-test and
    may be used for this job (its pools are device-mapped); when it is False a cell choosing the
    SM path gives the calibration's default DMA choice instead."""
    cells = calibration.cells.get(direction)
    if not cells:
        return calibration.default
    blocks = sorted({c[0] for c in cells})
    at = max(bisect_right(blocks, int(block_bytes)) - 1, 0)
    row = [c for c in cells if c[0] == blocks[at]]
    counts = [c[1] for c in row]
    choice = row[max(bisect_right(counts, int(copies)) - 1, 0)][2]
    if choice.path == "sm" and not sm_ready:
        return calibration.default
    return choice


def load_calibration(value: Any) -> Calibration:
    """A :class:`Calibration` from an option value: None (the built-in one), a Calibration, a dict
    (:meth:`Calibration.to_dict`'s form) or the path of a JSON file written by
    ``bench/cuda_calibrate.py``."""
    if value is None:
        return DEFAULT_CALIBRATION
    if isinstance(value, Calibration):
        return value
    if isinstance(value, dict):
        return Calibration.from_dict(value)
    if isinstance(value, (str, os.PathLike)):
        with open(value) as f:
            data = json.load(f)
        cal = Calibration.from_dict(data)
        return cal if cal.source != "a file" else Calibration(cal.cells, cal.default, str(value))
    raise TypeError(f"calibration must be None, a Calibration, a dict or a path, not {type(value).__name__}")


def _choice_dict(choice: CopyChoice) -> dict[str, Any]:
    return {"path": choice.path, **asdict(choice.dma)}


def _choice(data: Any) -> CopyChoice:
    if isinstance(data, CopyChoice):
        return data
    data = dict(data)
    unknown = set(data) - {"path", "prefer_overlap", "src_order", "one_call"}
    if unknown:
        raise InvalidArgumentError(f"unknown copy choice field(s): {', '.join(sorted(unknown))}")
    dma = DmaSettings(prefer_overlap=bool(data.get("prefer_overlap", True)),
                      src_order=str(data.get("src_order", "stream")), one_call=bool(data.get("one_call", False)))
    return CopyChoice(path=str(data.get("path", "dma")), dma=dma)
