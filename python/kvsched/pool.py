"""Block pools: where a KV cache's blocks live in memory (contract section 4, docs/contract.md).

A pool is a set of layers with the same geometry. In every layer, block ``b`` consists of
``num_pieces`` equally sized byte ranges ("pieces")::

    address(layer, block, piece) = layer_ptrs[layer] + piece_offsets[piece] + block * block_stride
    size                         = piece_bytes

This covers the KV layouts engines use:

* ``(layers, num_blocks, ...)`` one array, blocks contiguous: one piece per block
  (:meth:`BlockPool.from_array`);
* vLLM FlashAttention, one tensor per layer ``(2, num_blocks, block_size, heads, dim)``:
  ``block_dim=1``, two pieces (K and V) ``num_blocks * block_stride`` bytes apart
  (:meth:`BlockPool.from_layers`);
* vLLM FlashInfer / MLA, one tensor per layer ``(num_blocks, ...)``: ``block_dim=0``, one piece;
* vLLM 0.33's per-layer strided views of one shared buffer ``(num_blocks, heads, tokens,
  content)``: ``block_dim=0``, one piece; the block stride is the view's real stride (all
  layers' pages apart in block-outermost layouts) and the dimensions after the block may be
  permuted in memory (layout LBNHC), as long as a block is one dense byte range;
* anything else through raw pointers (:meth:`BlockPool.from_pointers`).

Pools never copy or own memory; they keep the source objects referenced so the memory stays alive
as long as the pool does. Block ids are bounds-checked by the transfer engine against
:attr:`BlockPool.num_blocks` before any copy is issued.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Mapping, Sequence
from typing import Any

from kvsched.errors import InvalidArgumentError
from kvsched.interop import ArrayInfo, c_contiguous_nbytes, describe_array

__all__ = ["BlockPool", "PoolCache"]


class PoolCache:
    """What the transfer modules derive from a pool once and keep with it (it lives and dies with
    the pool: pools never change after construction). Each field has one owner module, which
    alone reads and writes it.

    * ``plan_bases`` (plan.py): ``(num_layers, num_pieces)`` int64 array of the address of block 0
      of each piece of each layer; None until first needed.
    * ``plan_pairs`` (plan.py): destination pools found compatible with this source pool, by
      ``id(dst)``: ``(weakref to dst, facts)``; None until the first pair is checked.
    * ``host_views`` (host.py): numpy views of each ``(layer, piece)``: ``(rows, items)``.
    * ``cuda_ready`` (cuda.py): devices this pool was checked and prepared for.
    * ``cuda_pins`` (cuda.py): page-lock registrations of this host pool's memory, by address
      (unregistered when the pool is garbage-collected).
    * ``cuda_mapped`` (cuda.py): devices whose kernels can address all of this pool's memory (its
      own device memory, or page-locked host memory), each with the pool's extents as sorted
      ``(starts, ends)`` int64 arrays for the SM copy path's bounds check.
    """

    __slots__ = ("plan_bases", "plan_pairs", "host_views", "cuda_ready", "cuda_pins", "cuda_mapped")

    def __init__(self) -> None:
        self.plan_bases: Any = None
        self.plan_pairs: dict[int, tuple[Any, Any]] | None = None
        self.host_views: dict[tuple[int, int], tuple[Any, Any]] = {}
        self.cuda_ready: set[int] = set()
        self.cuda_pins: dict[int, Any] = {}
        self.cuda_mapped: dict[int, tuple[Any, Any]] = {}


class BlockPool:
    """Geometry of one KV cache (host or device); see the module docstring for the address formula.

    Attributes: ``device`` ("cpu" or "cuda:N"), ``num_layers``, ``num_blocks``, ``block_bytes``
    (``num_pieces * piece_bytes``), ``piece_bytes``, ``num_pieces``, ``piece_offsets``,
    ``block_stride``, ``layer_ptrs``, ``dtype`` (a name such as ``"float16"``, or None when
    unknown), ``readonly`` and ``layer_names`` (when built from a mapping)."""

    __slots__ = (
        "layer_ptrs",
        "num_blocks",
        "piece_bytes",
        "piece_offsets",
        "block_stride",
        "device",
        "dtype",
        "readonly",
        "layer_names",
        "_owners",
        "_cache",
        "__weakref__",
    )

    def __init__(
        self,
        layer_ptrs: Sequence[int],
        num_blocks: int,
        piece_bytes: int,
        block_stride: int,
        piece_offsets: Sequence[int] = (0,),
        *,
        device: str = "cpu",
        dtype: str | None = None,
        readonly: bool = False,
        owners: Sequence[Any] = (),
        layer_names: Sequence[str] | None = None,
    ) -> None:
        self.layer_ptrs = tuple(_as_int(p, "layer pointer") for p in layer_ptrs)
        self.num_blocks = _as_int(num_blocks, "num_blocks")
        self.piece_bytes = _as_int(piece_bytes, "piece_bytes")
        self.block_stride = _as_int(block_stride, "block_stride")
        self.piece_offsets = tuple(_as_int(o, "piece offset") for o in piece_offsets)
        self.device = _normalize_device(device)
        self.dtype = dtype
        self.readonly = bool(readonly)
        self._owners = tuple(owners)
        self._cache = PoolCache()
        self.layer_names = tuple(layer_names) if layer_names is not None else None
        self._validate()

    # ---------------------------------------------------------------------------- constructors

    @classmethod
    def from_array(cls, arr: Any, *, block_dim: int = 1) -> "BlockPool":
        """A pool over one array shaped ``(layers, ..., num_blocks, ...)``.

        ``block_dim`` is the index of the block dimension (default 1: ``(layers, num_blocks,
        ...)``). Dimensions between the layer and block dimensions split each block into pieces
        (e.g. ``(layers, 2, num_blocks, ...)`` with ``block_dim=2`` for K/V halves); dimensions
        after the block dimension must be C-contiguous. Works for numpy arrays (host) and CUDA
        arrays (``__cuda_array_interface__`` or DLPack)."""
        info = describe_array(arr)
        if len(info.shape) < 2:
            raise InvalidArgumentError(
                f"from_array needs an array shaped (layers, num_blocks, ...); got shape {info.shape}"
            )
        block_dim = _check_block_dim(block_dim, len(info.shape), first=1)
        layer_ptrs = [info.ptr + i * info.strides[0] for i in range(info.shape[0])]
        sub = ArrayInfo(
            ptr=info.ptr,
            shape=info.shape[1:],
            strides=info.strides[1:],
            itemsize=info.itemsize,
            dtype=info.dtype,
            device=info.device,
        )
        geometry = _block_geometry(sub, block_dim - 1)
        return cls(
            layer_ptrs,
            **geometry,
            device=info.device,
            dtype=info.dtype,
            readonly=info.readonly,
            owners=info.owners,
        )

    @classmethod
    def from_layers(cls, tensors: Sequence[Any] | Mapping[str, Any], block_dim: int = 0) -> "BlockPool":
        """A pool over one array per layer, all with the same shape, strides, dtype and device.

        ``block_dim`` is the block dimension of each array: 0 for ``(num_blocks, ...)`` (vLLM
        FlashInfer, MLA), 1 for vLLM FlashAttention's ``(2, num_blocks, block_size, heads, dim)``
        (each block is then two pieces, K and V). A mapping (vLLM's ``{layer_name: tensor}``)
        keeps its order and records the names in :attr:`layer_names`."""
        names = None
        if isinstance(tensors, Mapping):
            names = [str(k) for k in tensors.keys()]
            tensors = list(tensors.values())
        else:
            tensors = list(tensors)
        if not tensors:
            raise InvalidArgumentError("from_layers needs at least one layer")
        infos = [describe_array(t) for t in tensors]
        first = infos[0]
        block_dim = _check_block_dim(block_dim, len(first.shape), first=0)
        for i, info in enumerate(infos[1:], start=1):
            if (info.shape, info.strides, info.itemsize, info.dtype, info.device) != (
                first.shape,
                first.strides,
                first.itemsize,
                first.dtype,
                first.device,
            ):
                raise InvalidArgumentError(
                    f"layer {i} differs from layer 0: shape {info.shape} vs {first.shape}, strides "
                    f"{info.strides} vs {first.strides}, dtype {info.dtype} vs {first.dtype}, "
                    f"device {info.device} vs {first.device}"
                )
        geometry = _block_geometry(first, block_dim)
        owners = tuple(itertools.chain.from_iterable(info.owners for info in infos))
        return cls(
            [info.ptr for info in infos],
            **geometry,
            device=first.device,
            dtype=first.dtype,
            readonly=any(info.readonly for info in infos),
            owners=owners,
            layer_names=names,
        )

    @classmethod
    def from_pointers(
        cls,
        layer_ptrs: Sequence[int],
        num_blocks: int,
        block_bytes: int,
        block_stride: int | None = None,
        *,
        piece_offsets: Sequence[int] | None = None,
        device: str = "cpu",
        dtype: str | None = None,
        owner: Any = None,
    ) -> "BlockPool":
        """A pool over raw memory that the caller keeps alive.

        * ``layer_ptrs``: one base address (int) per layer: the address of block 0, piece 0.
        * ``num_blocks``: blocks per layer.
        * ``block_bytes``: bytes per block, all pieces together.
        * ``block_stride``: bytes from block ``b`` to block ``b + 1`` of the same piece
          (default: ``block_bytes // num_pieces``, i.e. dense).
        * ``piece_offsets``: byte offset of each piece of block 0 from the layer base (default
          ``(0,)``: one piece). For vLLM's K/V split use ``(0, num_blocks * block_stride)``.
          ``block_bytes`` must divide evenly into ``len(piece_offsets)`` pieces.
        * ``device``: ``"cpu"`` (host memory) or ``"cuda:N"``.
        * ``owner``: any object to keep referenced while the pool lives (e.g. the allocation).
        """
        offsets = tuple(piece_offsets) if piece_offsets is not None else (0,)
        if not offsets:
            raise InvalidArgumentError("piece_offsets must name at least one piece")
        block_bytes = _as_int(block_bytes, "block_bytes")
        if block_bytes <= 0 or block_bytes % len(offsets):
            raise InvalidArgumentError(
                f"block_bytes={block_bytes} must be a positive multiple of the {len(offsets)} pieces"
            )
        piece_bytes = block_bytes // len(offsets)
        return cls(
            layer_ptrs,
            num_blocks,
            piece_bytes,
            piece_bytes if block_stride is None else block_stride,
            offsets,
            device=device,
            dtype=dtype,
            owners=() if owner is None else (owner,),
        )

    # ---------------------------------------------------------------------------- properties

    @property
    def num_layers(self) -> int:
        return len(self.layer_ptrs)

    @property
    def num_pieces(self) -> int:
        return len(self.piece_offsets)

    @property
    def block_bytes(self) -> int:
        return self.piece_bytes * len(self.piece_offsets)

    @property
    def is_dense(self) -> bool:
        """True when piece ``p`` of blocks ``b`` and ``b + 1`` are adjacent, so a run of
        consecutive blocks is one contiguous range per piece (one copy instead of many)."""
        return self.block_stride == self.piece_bytes or self.num_blocks <= 1

    @property
    def is_cuda(self) -> bool:
        return self.device != "cpu"

    @property
    def device_index(self) -> int | None:
        return None if self.device == "cpu" else int(self.device.split(":", 1)[1])

    @property
    def transfer_cache(self) -> PoolCache:
        """Data the transfer backends derived from this pool (see :class:`PoolCache`); internal to
        kvsched's transfer modules."""
        return self._cache

    @property
    def owners(self) -> tuple[Any, ...]:
        """The objects kept alive by this pool (the arrays it was built from)."""
        return self._owners

    def layer_extent(self, layer: int) -> tuple[int, int]:
        """``(address, nbytes)`` of the smallest range holding every block of ``layer``."""
        lo = self.layer_ptrs[layer] + min(self.piece_offsets)
        hi = self.layer_ptrs[layer] + max(self.piece_offsets) + self.piece_bytes
        hi += (self.num_blocks - 1) * self.block_stride if self.num_blocks > 0 else 0
        return lo, hi - lo

    def extents(self) -> list[tuple[int, int]]:
        """``(address, nbytes)`` ranges covering every layer, overlapping ranges merged."""
        spans = sorted(self.layer_extent(i) for i in range(self.num_layers))
        merged: list[list[int]] = []
        for addr, size in spans:
            if merged and addr <= merged[-1][0] + merged[-1][1]:
                end = max(merged[-1][0] + merged[-1][1], addr + size)
                merged[-1][1] = end - merged[-1][0]
            else:
                merged.append([addr, size])
        return [(a, s) for a, s in merged]

    def same_geometry(self, other: "BlockPool") -> bool:
        """True when blocks of both pools split into the same pieces (count and size)."""
        return self.num_pieces == other.num_pieces and self.piece_bytes == other.piece_bytes

    def __repr__(self) -> str:
        return (
            f"BlockPool(device={self.device!r}, num_layers={self.num_layers}, "
            f"num_blocks={self.num_blocks}, block_bytes={self.block_bytes}, "
            f"pieces={self.num_pieces}, block_stride={self.block_stride}, dtype={self.dtype!r})"
        )

    # ---------------------------------------------------------------------------- validation

    def _validate(self) -> None:
        if not self.layer_ptrs:
            raise InvalidArgumentError("a block pool needs at least one layer")
        if any(p <= 0 for p in self.layer_ptrs):
            raise InvalidArgumentError("layer pointers must be non-null addresses")
        if self.num_blocks < 0:
            raise InvalidArgumentError(f"num_blocks must be >= 0, got {self.num_blocks}")
        if self.piece_bytes <= 0:
            raise InvalidArgumentError(f"blocks must have a positive size, got {self.piece_bytes} bytes")
        if self.num_blocks > 1 and self.block_stride <= 0:
            raise InvalidArgumentError(f"block_stride must be positive, got {self.block_stride}")
        if any(o < 0 for o in self.piece_offsets):
            raise InvalidArgumentError("piece offsets must be >= 0")
        if len(set(self.piece_offsets)) != len(self.piece_offsets):
            raise InvalidArgumentError(f"piece offsets repeat: {self.piece_offsets}")
        # Two distinct (block, piece) ranges must never overlap, else a copy into one block
        # would land in another's bytes.
        n, size, stride = self.num_blocks, self.piece_bytes, self.block_stride
        if n > 1 and size > stride:
            raise InvalidArgumentError(
                f"blocks overlap: piece_bytes={size} exceeds block_stride={stride}"
            )
        for a, b in itertools.combinations(self.piece_offsets, 2):
            if _pieces_overlap(b - a, n, size, stride):
                raise InvalidArgumentError(
                    f"pieces at offsets {a} and {b} overlap for some blocks "
                    f"(piece_bytes={size}, block_stride={stride}, num_blocks={n})"
                )


def _pieces_overlap(delta: int, n: int, size: int, stride: int) -> bool:
    """Is there k in (-n, n) with |delta - k * stride| < size? (piece q of block b1 vs piece p of b2)."""
    if n <= 1 or stride <= 0:
        return abs(delta) < size
    k0 = delta // stride
    return any(-n < k < n and abs(delta - k * stride) < size for k in (k0 - 1, k0, k0 + 1))


def _block_geometry(info: ArrayInfo, block_dim: int) -> dict[str, Any]:
    """Pieces, piece size and block stride of an array whose block dimension is ``block_dim``."""
    shape, strides = info.shape, info.strides
    if any(d == 0 for d in shape[block_dim + 1 :]) or any(d == 0 for d in shape[:block_dim]):
        raise InvalidArgumentError(
            f"blocks of zero bytes: a dimension of the array is 0 (shape {shape}, block_dim "
            f"{block_dim}); a pool's blocks must hold at least one element"
        )
    trailing = c_contiguous_nbytes(shape[block_dim + 1 :], strides[block_dim + 1 :], info.itemsize)
    if trailing is None:
        trailing = _dense_in_some_order(shape[block_dim + 1 :], strides[block_dim + 1 :], info.itemsize)
    if trailing is None:
        raise InvalidArgumentError(
            f"the dimensions after the block dimension must be C-contiguous (in some order of "
            f"dimensions) so each piece is one byte range: shape {shape}, byte strides {strides}, "
            f"block_dim {block_dim}"
        )
    piece_dims = list(zip(shape[:block_dim], strides[:block_dim]))
    offsets = [
        sum(i * s for i, (_, s) in zip(idx, piece_dims))
        for idx in itertools.product(*(range(d) for d, _ in piece_dims))
    ]
    if any(s < 0 for s in strides):
        raise InvalidArgumentError(f"negative strides are not supported: {strides}")
    return {
        "num_blocks": shape[block_dim],
        "piece_bytes": trailing,
        "block_stride": strides[block_dim] if shape[block_dim] > 1 else trailing,
        "piece_offsets": offsets or [0],
    }


def _dense_in_some_order(shape: tuple[int, ...], strides: tuple[int, ...], itemsize: int) -> int | None:
    """Bytes spanned by dims ``shape`` if, taken in order of decreasing stride, they are
    C-contiguous, else None.

    vLLM 0.33 registers per-layer strided views of one buffer whose dimensions after the block
    are permuted in memory (layout LBNHC: a ``(blocks, heads, tokens, content)`` view stored as
    ``(blocks, tokens, heads, content)``). A block is still one dense byte range; a copy of that
    range moves the block whatever the order of its elements, since both ends share the layout.
    """
    order = sorted(range(len(shape)), key=lambda i: strides[i], reverse=True)
    return c_contiguous_nbytes(
        tuple(shape[i] for i in order), tuple(strides[i] for i in order), itemsize
    )


def _check_block_dim(block_dim: Any, ndim: int, *, first: int) -> int:
    if isinstance(block_dim, (bool, float)) or not hasattr(type(block_dim), "__index__"):
        raise TypeError(f"block_dim must be an int, got {type(block_dim).__name__}")
    try:
        block_dim = operator.index(block_dim)  # numpy integers too
    except Exception:  # noqa: BLE001 - a broken __index__ is the caller's wrong type
        raise TypeError(f"block_dim must be an int ({type(block_dim).__name__}.__index__ failed)") from None
    if not first <= block_dim < ndim:
        raise InvalidArgumentError(f"block_dim={block_dim} is out of range for a {ndim}-d array")
    return block_dim


def _as_int(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{what} must be an int, got bool")
    try:
        return int(value.__index__())
    except AttributeError:
        raise TypeError(f"{what} must be an int, got {type(value).__name__}") from None


def _normalize_device(device: Any) -> str:
    text = str(device)
    if text == "cpu":
        return text
    if text == "cuda":
        return "cuda:0"
    if text.startswith("cuda:") and text[5:].isdigit():
        return f"cuda:{int(text[5:])}"
    raise InvalidArgumentError(f"device must be 'cpu' or 'cuda:N', got {device!r}")

