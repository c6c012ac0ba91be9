"""Validate a transfer request and turn it into copies, before any byte moves.

Everything that can be wrong with a request (block ids out of range, pools that do not match,
layers out of range, a read-only destination, two sources for one destination block) is detected
here, so a bad id never reaches a DMA engine (SPEC section 4).

Copies are coalesced: pairs are sorted by (src, dst) and each maximal run of consecutive source
blocks landing on consecutive destination blocks becomes one copy per layer and piece, provided
both pools are *dense* (the same piece of adjacent blocks is adjacent in memory). Otherwise each
block is its own copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from kvsched.errors import InvalidArgumentError
from kvsched.pool import BlockPool

__all__ = ["CopyPlan", "build_plan"]

_EMPTY = np.zeros(0, dtype=np.int64)


@dataclass(frozen=True, eq=False)
class CopyPlan:
    """A validated transfer: ``src_ids[i] -> dst_ids[i]`` for every layer in ``layers``.

    ``runs`` is an ``(R, 3)`` int64 array of ``(src_start, dst_start, length)``."""

    src: BlockPool
    dst: BlockPool
    layers: np.ndarray
    src_ids: np.ndarray
    dst_ids: np.ndarray
    runs: np.ndarray

    @property
    def num_blocks(self) -> int:
        return int(self.src_ids.size)

    @property
    def nbytes(self) -> int:
        """Bytes moved by the whole transfer."""
        return self.num_blocks * int(self.layers.size) * self.src.block_bytes

    @property
    def merged(self) -> bool:
        """True when each run is one copy per (layer, piece); False when each block is."""
        return self.src.is_dense and self.dst.is_dense

    @property
    def num_copies(self) -> int:
        per_piece = self.runs.shape[0] if self.merged else self.num_blocks
        return int(self.layers.size) * self.src.num_pieces * per_piece

    def segments(self, layers: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Absolute ``(src_addrs, dst_addrs, sizes)`` int64 arrays, one entry per copy, ordered
        layer by layer, then piece, then run. ``layers`` restricts to a subset of ``self.layers``."""
        layers = self.layers if layers is None else np.asarray(layers, dtype=np.int64)
        src, dst = self.src, self.dst
        if self.merged:
            s0, d0 = self.runs[:, 0], self.runs[:, 1]
            sizes = self.runs[:, 2] * src.piece_bytes
        else:
            s0, d0 = self.src_ids, self.dst_ids
            sizes = np.full(s0.shape, src.piece_bytes, dtype=np.int64)
        src_base = _bases(src, layers)
        dst_base = _bases(dst, layers)
        src_addrs = src_base[:, :, None] + (s0 * src.block_stride)[None, None, :]
        dst_addrs = dst_base[:, :, None] + (d0 * dst.block_stride)[None, None, :]
        shape = src_addrs.shape
        return (
            src_addrs.reshape(-1),
            dst_addrs.reshape(-1),
            np.broadcast_to(sizes[None, None, :], shape).reshape(-1),
        )


def _bases(pool: BlockPool, layers: np.ndarray) -> np.ndarray:
    """``(L, P)`` addresses of block 0 of each piece of each layer."""
    table = pool._cache.get("plan_bases")
    if table is None:  # (num_layers, P), computed once per pool
        ptrs = np.asarray(pool.layer_ptrs, dtype=np.int64)
        table = ptrs[:, None] + np.asarray(pool.piece_offsets, dtype=np.int64)[None, :]
        pool._cache["plan_bases"] = table
    return table[layers]


def build_plan(src: Any, dst: Any, pairs: Any, layers: Any = None) -> CopyPlan:
    """Check a request and coalesce it into runs. Raises ``InvalidArgumentError`` (a ``ValueError``)
    for bad values and ``TypeError`` for wrong types; nothing is copied either way."""
    for name, pool in (("src", src), ("dst", dst)):
        if not isinstance(pool, BlockPool):
            raise TypeError(f"{name} must be a kvsched.BlockPool, got {type(pool).__name__}")
    if dst.readonly:
        raise InvalidArgumentError("the destination pool is read-only")
    if src.block_bytes != dst.block_bytes:
        raise InvalidArgumentError(
            f"block sizes differ: src {src.block_bytes} bytes, dst {dst.block_bytes} bytes"
        )
    if not src.same_geometry(dst):
        raise InvalidArgumentError(
            f"blocks split differently: src {src.num_pieces} piece(s) of {src.piece_bytes} bytes, "
            f"dst {dst.num_pieces} piece(s) of {dst.piece_bytes} bytes"
        )
    if _typed(src.dtype) and _typed(dst.dtype) and src.dtype != dst.dtype:
        raise InvalidArgumentError(f"dtypes differ: src {src.dtype}, dst {dst.dtype}")

    layer_ids = _layers(src, dst, layers)
    src_ids, dst_ids = _pairs(pairs)
    if src_ids.size <= _SMALL:
        return _small_plan(src, dst, layer_ids, src_ids, dst_ids)
    for name, ids, pool in (("src", src_ids, src), ("dst", dst_ids, dst)):
        if ids.size and (ids.min() < 0 or ids.max() >= pool.num_blocks):
            bad = ids[(ids < 0) | (ids >= pool.num_blocks)]
            raise InvalidArgumentError(
                f"{name} block id {int(bad[0])} is out of range [0, {pool.num_blocks}) "
                f"({bad.size} bad id(s))"
            )
    if dst_ids.size > 1:
        written = np.sort(dst_ids)
        twice = written[1:][written[1:] == written[:-1]]
        if twice.size:
            raise InvalidArgumentError(f"dst block {int(twice[0])} is written by more than one pair")
    if src is dst and src_ids.size:
        read = np.zeros(src.num_blocks, dtype=bool)
        read[src_ids] = True
        if read[dst_ids].any():
            raise InvalidArgumentError("within one pool, a block may not be both a source and a destination")

    # Order by (src, dst) so runs of consecutive blocks are adjacent. dst ids are unique, so the
    # key is unique and an unstable sort is deterministic. Engines often send sorted pairs: no sort.
    key = src_ids * max(dst.num_blocks, 1) + dst_ids
    if key.size > 1 and not bool((key[1:] > key[:-1]).all()):
        order = np.argsort(key)
        src_ids, dst_ids = src_ids[order], dst_ids[order]
    return CopyPlan(src, dst, layer_ids, src_ids, dst_ids, _runs(src_ids, dst_ids))


# Requests of up to this many pairs are checked and coalesced in plain Python: a dozen numpy
# calls cost more than a loop over a few dozen ints (it is the fixed cost of every submit).
_SMALL = 64


def _small_plan(src: BlockPool, dst: BlockPool, layer_ids: np.ndarray, src_ids: np.ndarray, dst_ids: np.ndarray) -> CopyPlan:
    """The same checks and runs as the numpy path, in Python, for a few pairs."""
    pairs = sorted(zip(src_ids.tolist(), dst_ids.tolist()))
    n_src, n_dst = src.num_blocks, dst.num_blocks
    for name, ids, limit in (("src", [p[0] for p in pairs], n_src), ("dst", [p[1] for p in pairs], n_dst)):
        bad = [i for i in ids if not 0 <= i < limit]
        if bad:
            raise InvalidArgumentError(
                f"{name} block id {bad[0]} is out of range [0, {limit}) ({len(bad)} bad id(s))"
            )
    written: set[int] = set()
    for _, d in pairs:
        if d in written:
            raise InvalidArgumentError(f"dst block {d} is written by more than one pair")
        written.add(d)
    if src is dst and written.intersection(p[0] for p in pairs):
        raise InvalidArgumentError("within one pool, a block may not be both a source and a destination")
    runs: list[list[int]] = []
    for s, d in pairs:
        if runs and s == runs[-1][0] + runs[-1][2] and d == runs[-1][1] + runs[-1][2]:
            runs[-1][2] += 1
        else:
            runs.append([s, d, 1])
    return CopyPlan(
        src,
        dst,
        layer_ids,
        np.array([p[0] for p in pairs], dtype=np.int64),
        np.array([p[1] for p in pairs], dtype=np.int64),
        np.array(runs, dtype=np.int64).reshape(-1, 3),
    )


def _typed(dtype: str | None) -> bool:
    """Unknown dtypes and raw bytes (uint8) match any dtype: a host staging pool of bytes can
    hold blocks of a bfloat16 GPU cache, which numpy cannot describe."""
    return dtype is not None and dtype != "uint8"


def _layers(src: BlockPool, dst: BlockPool, layers: Any) -> np.ndarray:
    if layers is None:
        if src.num_layers != dst.num_layers:
            raise InvalidArgumentError(
                f"pools have {src.num_layers} and {dst.num_layers} layers; name the layers to copy"
            )
        return np.arange(src.num_layers, dtype=np.int64)
    if isinstance(layers, (int, np.integer)) and not isinstance(layers, bool):
        layers = [layers]
    out = []
    limit = min(src.num_layers, dst.num_layers)
    for layer in layers:
        if isinstance(layer, (bool, np.bool_)) or not isinstance(layer, (int, np.integer)):
            raise TypeError(f"layer indices must be ints, got {type(layer).__name__}")
        if not 0 <= int(layer) < limit:
            raise InvalidArgumentError(f"layer {int(layer)} is out of range [0, {limit})")
        out.append(int(layer))
    if len(set(out)) != len(out):
        raise InvalidArgumentError(f"layers repeat: {out}")
    return np.asarray(out, dtype=np.int64)


def _pairs(pairs: Any) -> tuple[np.ndarray, np.ndarray]:
    if pairs is None:
        raise TypeError("pairs must be an (N, 2) array of block ids, got None")
    arr = np.asarray(pairs)
    if arr.size == 0:
        return _EMPTY, _EMPTY
    if arr.dtype.kind not in "iu":
        raise TypeError(f"block ids must be integers, got dtype {arr.dtype}")
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise InvalidArgumentError(f"pairs must have shape (N, 2), got {arr.shape}")
    if arr.dtype.kind == "u" and arr.size and int(arr.max()) > np.iinfo(np.int64).max:
        raise InvalidArgumentError("block id out of range")
    arr = arr.astype(np.int64, copy=False)
    return np.ascontiguousarray(arr[:, 0]), np.ascontiguousarray(arr[:, 1])


def _runs(src_ids: np.ndarray, dst_ids: np.ndarray) -> np.ndarray:
    n = src_ids.size
    if n == 0:
        return np.zeros((0, 3), dtype=np.int64)
    breaks = np.ones(n, dtype=bool)
    breaks[1:] = (np.diff(src_ids) != 1) | (np.diff(dst_ids) != 1)
    starts = np.flatnonzero(breaks)
    lengths = np.diff(np.append(starts, n))
    return np.stack([src_ids[starts], dst_ids[starts], lengths], axis=1).astype(np.int64)
