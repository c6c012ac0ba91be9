"""Validate a transfer request and turn it into copies, before any byte moves.

Everything that can be wrong with a request (block ids out of range, pools that do not match,
layers out of range, a read-only destination, two sources for one destination block) is detected
here, so a bad id never reaches a DMA engine (contract section 4, docs/contract.md).

Copies are coalesced: pairs are sorted by (src, dst) and each maximal run of consecutive source
blocks landing on consecutive destination blocks becomes one copy per layer and piece, provided
both pools are *dense* (the same piece of adjacent blocks is adjacent in memory). Otherwise each
block is its own copy.

Checking is the fixed cost of every ``submit``, so it is kept small for the common request (a few
scattered blocks of one layer): the pool-pair checks are remembered per (src, dst) pair, and small
requests are checked with plain Python and coalesced lazily (see :func:`build_plan`).
"""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np

from kvsched.errors import InvalidArgumentError
from kvsched.pool import BlockPool

__all__ = ["CopyPlan", "build_plan"]

# Plans of at most this many copies (layers x pieces x runs) are best turned into addresses with
# CopyPlan.segment_lists(), larger ones with segments(): measured with one layer and piece, Python
# lists were cheaper up to 64 copies and numpy beyond. The cuda and nixl backends both follow it.
LIST_SEGMENTS = 64

_EMPTY = np.zeros(0, dtype=np.int64)


class CopyPlan:
    """A validated transfer: ``src_ids[i] -> dst_ids[i]`` for every layer in ``layers``.

    ``src_ids`` / ``dst_ids`` are sorted by (src, dst); ``runs`` is an ``(R, 3)`` int64 array of
    ``(src_start, dst_start, length)``. Treat as immutable.

    A small plan (see :func:`build_plan`) is checked on the submitting thread but keeps its pairs
    as Python lists: it sorts and coalesces them, and makes numpy arrays, only when something asks
    (the host backend's worker reads :attr:`run_list`; the cuda backend calls :meth:`segments`).
    The results are the same as an eagerly built plan's."""

    __slots__ = (
        "src",
        "dst",
        "kind",
        "merged",
        "num_blocks",
        "nbytes",
        "_num_pieces",
        "_num_copies",
        "_layers",
        "_src_ids",
        "_dst_ids",
        "_runs",
        "_layer_list",
        "_run_list",
        "_sorted",
        "_pairs",
        "_n_dst",
    )

    def __init__(
        self,
        src: BlockPool,
        dst: BlockPool,
        layers: np.ndarray,
        src_ids: np.ndarray,
        dst_ids: np.ndarray,
        runs: np.ndarray,
    ) -> None:
        facts = _pair_facts(src, dst)
        n_layers, n_blocks = int(layers.size), int(src_ids.size)
        self.src, self.dst, self.kind, self.merged = src, dst, facts.kind, facts.merged
        self.num_blocks = n_blocks
        self.nbytes = n_blocks * n_layers * facts.block_bytes
        self._num_pieces = facts.num_pieces
        self._num_copies = n_layers * facts.num_pieces * (int(runs.shape[0]) if facts.merged else n_blocks)
        self._layers, self._src_ids, self._dst_ids, self._runs = layers, src_ids, dst_ids, runs
        self._layer_list = self._run_list = self._sorted = self._pairs = self._n_dst = None

    @classmethod
    def _from_lists(
        cls, src: BlockPool, dst: BlockPool, facts: "_PairFacts", layers: list[int], srcs: list[int], dsts: list[int]
    ) -> "CopyPlan":
        """A small plan of checked, not yet sorted pairs ``srcs[i] -> dsts[i]`` (Python ints)."""
        self = cls.__new__(cls)
        n_blocks = len(srcs)
        self.src, self.dst, self.kind, self.merged = src, dst, facts.kind, facts.merged
        self.num_blocks = n_blocks
        self.nbytes = n_blocks * len(layers) * facts.block_bytes
        self._num_pieces = facts.num_pieces
        self._num_copies = None if facts.merged else len(layers) * facts.num_pieces * n_blocks
        self._layer_list, self._pairs, self._n_dst = layers, (srcs, dsts), facts.n_dst
        self._layers = self._src_ids = self._dst_ids = self._runs = self._run_list = self._sorted = None
        return self

    def _coalesce(self) -> None:
        """Sort the pairs of a small plan by (src, dst) and find its runs (see ``_runs``)."""
        srcs, dsts = self._pairs
        mul = self._n_dst + 1  # key = s * mul + d orders by (s, d); d < mul
        keys = [s * mul + d for s, d in zip(srcs, dsts)]
        keys.sort()
        # (s, d) follows (s - 1, d - 1) exactly when its key is step more: with |d - d'| < mul no
        # other pair of keys is step apart.
        step = mul + 1
        ss: list[int] = []
        ds: list[int] = []
        runs: list[list[int]] = []
        run: list[int] = []
        prev = -step - 1
        for k in keys:
            s, d = divmod(k, mul)
            ss.append(s)
            ds.append(d)
            if k == prev + step:
                run[2] += 1
            else:
                run = [s, d, 1]
                runs.append(run)
            prev = k
        self._sorted = (ss, ds)
        self._run_list = runs

    # ------------------------------------------------------------------------- lazily made

    @property
    def num_copies(self) -> int:
        if self._num_copies is None:
            self._num_copies = len(self.layer_list) * self._num_pieces * len(self.run_list)
        return self._num_copies

    @property
    def layers(self) -> np.ndarray:
        if self._layers is None:
            self._layers = np.array(self._layer_list, dtype=np.int64)
        return self._layers

    @property
    def src_ids(self) -> np.ndarray:
        if self._src_ids is None:
            if self._sorted is None:
                self._coalesce()
            self._src_ids = np.array(self._sorted[0], dtype=np.int64)
        return self._src_ids

    @property
    def dst_ids(self) -> np.ndarray:
        if self._dst_ids is None:
            if self._sorted is None:
                self._coalesce()
            self._dst_ids = np.array(self._sorted[1], dtype=np.int64)
        return self._dst_ids

    @property
    def runs(self) -> np.ndarray:
        if self._runs is None:
            self._runs = np.array(self.run_list, dtype=np.int64).reshape(-1, 3)
        return self._runs

    @property
    def layer_list(self) -> list[int]:
        """``layers`` as a list of ints."""
        if self._layer_list is None:
            self._layer_list = self._layers.tolist()
        return self._layer_list

    @property
    def run_list(self) -> list[list[int]]:
        """``runs`` as a list of ``[src_start, dst_start, length]``."""
        if self._run_list is None:
            if self._pairs is not None:
                self._coalesce()
            else:
                self._run_list = self._runs.tolist()
        return self._run_list

    @property
    def num_layers(self) -> int:
        return len(self._layer_list) if self._layer_list is not None else int(self._layers.size)

    @property
    def num_runs(self) -> int:
        return len(self.run_list) if self._runs is None else int(self._runs.shape[0])

    def __repr__(self) -> str:
        return (
            f"CopyPlan({self.kind}, blocks={self.num_blocks}, layers={self.num_layers}, "
            f"runs={self.num_runs}, bytes={self.nbytes}, copies={self.num_copies})"
        )

    def segment_lists(self) -> tuple[list[int], list[int], list[int]]:
        """:meth:`segments` (all layers) as three lists of Python ints, made without numpy: for
        small plans, where a dozen numpy calls on a few dozen ints cost more than the loop
        (measured: 32 scattered pairs, about 70 us with numpy, under 10 us here)."""
        src, dst = self.src, self.dst
        s_stride, d_stride = src.block_stride, dst.block_stride
        if self.merged:
            runs = self.run_list
        else:
            if self._sorted is None and self._pairs is not None:
                self._coalesce()
            ss, ds = self._sorted if self._sorted is not None else (self._src_ids.tolist(), self._dst_ids.tolist())
            runs = [[s, d, 1] for s, d in zip(ss, ds)]
        piece = src.piece_bytes
        s_off = [s * s_stride for s, _, _ in runs]
        d_off = [d * d_stride for _, d, _ in runs]
        sizes = [n * piece for _, _, n in runs]
        srcs: list[int] = []
        dsts: list[int] = []
        s_ptrs, d_ptrs = src.layer_ptrs, dst.layer_ptrs
        s_pieces, d_pieces = src.piece_offsets, dst.piece_offsets
        for layer in self.layer_list:
            for sp, dp in zip(s_pieces, d_pieces):
                sb, db = s_ptrs[layer] + sp, d_ptrs[layer] + dp
                srcs.extend([sb + o for o in s_off])
                dsts.extend([db + o for o in d_off])
        return srcs, dsts, sizes * (len(srcs) // max(len(sizes), 1))

    def segments(self, layers: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Absolute ``(src_addrs, dst_addrs, sizes)`` int64 arrays, one entry per copy, ordered
        layer by layer, then piece, then run. ``layers`` restricts to a subset of ``self.layers``."""
        layers = self.layers if layers is None else np.asarray(layers, dtype=np.int64)
        src, dst = self.src, self.dst
        if self.merged:
            runs = self.runs
            s0, d0 = runs[:, 0], runs[:, 1]
            sizes = runs[:, 2] * src.piece_bytes
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
    cache = pool.transfer_cache
    table = cache.plan_bases
    if table is None:  # (num_layers, P), computed once per pool
        ptrs = np.asarray(pool.layer_ptrs, dtype=np.int64)
        table = ptrs[:, None] + np.asarray(pool.piece_offsets, dtype=np.int64)[None, :]
        cache.plan_bases = table
    return table[layers]


def build_plan(src: Any, dst: Any, pairs: Any, layers: Any = None) -> CopyPlan:
    """Check a request and coalesce it into runs. Raises ``InvalidArgumentError`` (a ``ValueError``)
    for bad values and ``TypeError`` for wrong types; nothing is copied either way.

    Small well-formed requests (1 to ``_SMALL`` pairs of ints in an integer array or in Python
    lists/tuples, layers as Python ints) are checked in plain Python with no numpy call, and
    sorted and coalesced only when the plan is used (on the host backend: by the worker). Anything
    the fast path does not accept, valid or not, goes through the general path, which raises every
    error with the same message either way."""
    facts = _pair_facts(src, dst)
    layer_list = _fast_layers(facts, layers)
    if layer_list is not None:
        plist = _fast_pairs(pairs, facts)
        if plist is not None:
            plan = _fast_plan(src, dst, facts, layer_list, plist)
            if plan is not None:
                return plan
    return _general_plan(src, dst, pairs, layers)


class _PairFacts:
    """What ``build_plan`` needs to know about a (src, dst) pool pair once it was found compatible."""

    __slots__ = ("kind", "merged", "block_bytes", "num_pieces", "n_src", "n_dst", "layer_limit", "num_layers")

    def __init__(self, src: BlockPool, dst: BlockPool) -> None:
        src_cuda, dst_cuda = src.is_cuda, dst.is_cuda
        self.kind = ("d2d" if dst_cuda else "d2h") if src_cuda else ("h2d" if dst_cuda else "h2h")
        self.merged = src.is_dense and dst.is_dense
        self.block_bytes = src.block_bytes
        self.num_pieces = src.num_pieces
        self.n_src, self.n_dst = src.num_blocks, dst.num_blocks
        self.layer_limit = min(src.num_layers, dst.num_layers)
        # layers=None copies every layer; only valid when both pools have the same count
        self.num_layers = src.num_layers if src.num_layers == dst.num_layers else None


# At most this many destination pools remembered per source pool (then the table starts over).
_PAIR_TABLE_MAX = 64


def _pair_facts(src: Any, dst: Any) -> _PairFacts:
    """Check that ``src`` can be copied to ``dst`` (types, writable destination, block size,
    pieces, dtype) and return their facts. A compatible pair is remembered on ``src`` (keyed by
    ``id(dst)``, with a weak reference to tell a reused id apart), so the checks run once per pair:
    pools do not change after construction. An incompatible pair is checked (and raises) every
    time."""
    for name, pool in (("src", src), ("dst", dst)):
        if not isinstance(pool, BlockPool):
            raise TypeError(f"{name} must be a kvsched.BlockPool, got {type(pool).__name__}")
    cache = src.transfer_cache
    table = cache.plan_pairs
    if table is not None:
        hit = table.get(id(dst))
        if hit is not None and hit[0]() is dst:
            return hit[1]
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
    facts = _PairFacts(src, dst)
    if table is None or len(table) >= _PAIR_TABLE_MAX:
        table = cache.plan_pairs = {}
    table[id(dst)] = (weakref.ref(dst), facts)
    return facts


def _fast_layers(facts: _PairFacts, layers: Any) -> list[int] | None:
    """``layers`` as a list of valid, distinct layer indices, or None to take the general path."""
    if layers is None:
        return None if facts.num_layers is None else list(range(facts.num_layers))
    limit = facts.layer_limit
    t = type(layers)
    if t is int:  # not bool: type(True) is bool
        return [layers] if 0 <= layers < limit else None
    if t is list or t is tuple:
        out = list(layers)
        for layer in out:
            if type(layer) is not int or not 0 <= layer < limit:
                return None
        if len(out) > 1 and len(set(out)) != len(out):
            return None
        return out
    return None


def _fast_pairs(pairs: Any, facts: _PairFacts) -> tuple[list[int], list[int]] | None:
    """1 to ``_SMALL`` pairs of ints, all in range, as two new lists of Python ints (sources,
    destinations); None when ``pairs`` is anything else or an id is out of range (general path)."""
    n_src, n_dst = facts.n_src, facts.n_dst
    t = type(pairs)
    if t is np.ndarray:
        shape = pairs.shape
        dtype = pairs.dtype
        if len(shape) != 2 or shape[1] != 2 or not 0 < shape[0] <= _SMALL or dtype.kind not in "iu":
            return None
        if shape[0] > _NUMPY_RANGE_CHECK and dtype.isnative:
            # one reduction instead of four passes over lists; negative ids wrap to huge values
            hi = pairs.view(_UNSIGNED[dtype.itemsize]).max(axis=0).tolist()
            if hi[0] >= n_src or hi[1] >= n_dst:
                return None
            srcs, dsts = pairs.T.tolist()
            return srcs, dsts
        srcs, dsts = pairs.T.tolist()
    elif (t is list or t is tuple) and 0 < len(pairs) <= _SMALL:
        srcs, dsts = [], []
        for p in pairs:
            tp = type(p)
            if (tp is list or tp is tuple) and len(p) == 2:
                s, d = p
                if type(s) is int and type(d) is int:
                    srcs.append(s)
                    dsts.append(d)
                    continue
            return None
    else:
        return None
    if min(srcs) < 0 or max(srcs) >= n_src or min(dsts) < 0 or max(dsts) >= n_dst:
        return None
    return srcs, dsts


# Arrays of more pairs than this are range-checked with numpy (cheaper than min/max over lists).
_NUMPY_RANGE_CHECK = 16
_UNSIGNED = {1: np.dtype(np.uint8), 2: np.dtype(np.uint16), 4: np.dtype(np.uint32), 8: np.dtype(np.uint64)}


def _fast_plan(
    src: BlockPool, dst: BlockPool, facts: _PairFacts, layers: list[int], pairs: tuple[list[int], list[int]]
) -> CopyPlan | None:
    """The rest of the general path's checks for a few in-range pairs, in Python; None when one
    fails (the general path then raises the error). Sorting and coalescing are left to the plan
    (done when needed)."""
    srcs, dsts = pairs
    written = set(dsts)
    if len(written) != len(dsts):
        return None
    if src is dst and not written.isdisjoint(srcs):
        return None
    return CopyPlan._from_lists(src, dst, facts, layers, srcs, dsts)


def _general_plan(src: BlockPool, dst: BlockPool, pairs: Any, layers: Any) -> CopyPlan:
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
    if isinstance(layers, np.ndarray) and layers.ndim == 0:
        layers = layers.item() if layers.dtype.kind in "iu" else layers.tolist()
    if isinstance(layers, (int, np.integer)) and not isinstance(layers, bool):
        layers = [layers]
    if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
        raise TypeError(
            f"layers must be None, a layer index or a list of layer indices, not {type(layers).__name__}"
        )
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
    try:
        arr = np.asarray(pairs)
    except (ValueError, OverflowError) as exc:  # ragged rows, ints beyond any numpy dtype
        raise InvalidArgumentError(f"pairs must be an (N, 2) array of block ids: {exc}") from None
    if arr.size == 0:
        return _EMPTY, _EMPTY
    if arr.dtype.kind not in "iu":
        if arr.dtype.kind in "fO" and _all_python_ints(pairs):
            # Python ints beyond int64/uint64 make numpy pick float64 or object: the ids are
            # integers, just out of range, and the error says so.
            raise InvalidArgumentError("block id out of range (beyond int64)")
        raise TypeError(f"block ids must be integers, got dtype {arr.dtype}")
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise InvalidArgumentError(f"pairs must have shape (N, 2), got {arr.shape}")
    if arr.dtype.kind == "u" and arr.size and int(arr.max()) > np.iinfo(np.int64).max:
        raise InvalidArgumentError("block id out of range")
    arr = arr.astype(np.int64, copy=False)
    return np.ascontiguousarray(arr[:, 0]), np.ascontiguousarray(arr[:, 1])


def _all_python_ints(pairs: Any) -> bool:
    try:
        return all(
            isinstance(v, int) and not isinstance(v, bool) for row in pairs for v in row
        )
    except TypeError:
        return False


def _runs(src_ids: np.ndarray, dst_ids: np.ndarray) -> np.ndarray:
    """``(R, 3)`` runs ``(src_start, dst_start, length)`` of sorted pairs: a pair continues the run
    before it when both its ids are one more than the previous pair's."""
    n = src_ids.size
    if n == 0:
        return np.zeros((0, 3), dtype=np.int64)
    continues = (src_ids[1:] - src_ids[:-1] == 1) & (dst_ids[1:] - dst_ids[:-1] == 1)
    starts = np.flatnonzero(~continues)
    starts += 1  # index of each run's first pair, after the first run's (which starts at 0)
    out = np.empty((starts.size + 1, 3), dtype=np.int64)
    out[0, 0], out[0, 1] = src_ids[0], dst_ids[0]
    out[1:, 0] = src_ids[starts]
    out[1:, 1] = dst_ids[starts]
    lengths = out[:, 2]  # next run's start - this run's start
    lengths[:-1] = starts
    lengths[-1] = n
    lengths[1:] -= starts
    return out
