"""Remote block pools: a peer's KV cache, as this process may address it through NIXL.

A peer exports a pool as bytes (:func:`encode_pool`, called by ``TransferEngine.export_pool``) and
ships them over the serving engine's own channel; this side turns them back into a
:class:`RemotePool` (:func:`decode_pool`, called by ``TransferEngine.import_pool``). A remote pool
has the same geometry as a local :class:`~kvsched.pool.BlockPool` and goes through the same
checks: its layout is validated when it is built (no overlapping blocks or pieces), and block ids
are bounds-checked against its ``num_blocks`` by the engine before any transfer is posted, so a
bad id never reaches the network.

Its addresses are the peer's: nothing in this process may read or write them. Only the nixl
backend of the engine that imported it takes a remote pool; every other path refuses it.

The description is JSON (never pickle: the bytes come from another machine and are parsed as
untrusted input), at most :data:`MAX_DESCRIPTION_BYTES`, versioned by ``"kvsched_pool"``::

    {"kvsched_pool": 1, "agent": "<NIXL agent name>", "metadata": "<base64 agent metadata>" | null,
     "mem": "DRAM" | "VRAM", "device_id": 0, "layer_ptrs": [...], "num_blocks": N,
     "piece_bytes": B, "block_stride": S, "piece_offsets": [...], "dtype": "float16" | null,
     "layer_names": [...] | null}
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any, Sequence

from kvsched.errors import InvalidArgumentError
from kvsched.pool import BlockPool

__all__ = ["RemotePool", "encode_pool", "decode_pool", "MAX_DESCRIPTION_BYTES"]

FORMAT_VERSION = 1
#: Largest pool description accepted (agent metadata included). A description of 4,096 layers of
#: 20-digit pointers is about 100 KiB; NIXL agent metadata is a few KiB per registered region.
MAX_DESCRIPTION_BYTES = 16 << 20
_MAX_LAYERS = 1 << 16
_MAX_PIECES = 64
_MAX_NAME = 256
_U64 = (1 << 64) - 1


class RemotePool(BlockPool):
    """A pool in a peer's memory (see the module docstring). Attributes beyond
    :class:`~kvsched.pool.BlockPool`'s: ``peer`` (the peer's NIXL agent name), ``mem_type``
    (``"DRAM"`` or ``"VRAM"``) and ``device_id`` (the peer's device of a VRAM pool, else 0)."""

    __slots__ = ("peer", "mem_type", "device_id", "_importer")

    def __init__(
        self,
        peer: str,
        layer_ptrs: Sequence[int],
        num_blocks: int,
        piece_bytes: int,
        block_stride: int,
        piece_offsets: Sequence[int],
        *,
        mem_type: str = "DRAM",
        device_id: int = 0,
        dtype: str | None = None,
        layer_names: Sequence[str] | None = None,
        importer: Any = None,
    ) -> None:
        device = "cpu" if mem_type == "DRAM" else f"cuda:{device_id}"
        super().__init__(
            layer_ptrs,
            num_blocks,
            piece_bytes,
            block_stride,
            piece_offsets,
            device=device,
            dtype=dtype,
            layer_names=layer_names,
        )
        self.peer = peer
        self.mem_type = mem_type
        self.device_id = device_id
        # The backend that imported it: a remote pool is usable only there (its peer's metadata
        # was loaded into that backend's NIXL agent, and no other).
        self._importer = importer

    def __repr__(self) -> str:
        return (
            f"RemotePool(peer={self.peer!r}, mem={self.mem_type}, num_layers={self.num_layers}, "
            f"num_blocks={self.num_blocks}, block_bytes={self.block_bytes}, pieces={self.num_pieces})"
        )


def encode_pool(pool: BlockPool, agent: str, metadata: bytes | None) -> bytes:
    """The description of local ``pool`` that a peer turns into a :class:`RemotePool`."""
    desc = {
        "kvsched_pool": FORMAT_VERSION,
        "agent": agent,
        "metadata": None if metadata is None else base64.b64encode(metadata).decode("ascii"),
        "mem": "VRAM" if pool.is_cuda else "DRAM",
        "device_id": pool.device_index or 0,
        "layer_ptrs": list(pool.layer_ptrs),
        "num_blocks": pool.num_blocks,
        "piece_bytes": pool.piece_bytes,
        "block_stride": pool.block_stride,
        "piece_offsets": list(pool.piece_offsets),
        "dtype": pool.dtype,
        "layer_names": None if pool.layer_names is None else list(pool.layer_names),
    }
    return json.dumps(desc, separators=(",", ":")).encode("utf-8")


def decode_pool(data: Any, importer: Any = None) -> tuple[RemotePool, bytes | None]:
    """Parse a peer's pool description: the :class:`RemotePool` and the peer's agent metadata
    (None when the description carries none: the peer was reached through NIXL's listener).
    Anything malformed raises :class:`~kvsched.errors.InvalidArgumentError` saying what."""
    if isinstance(data, (bytearray, memoryview)):
        data = bytes(data)
    if not isinstance(data, bytes):
        raise TypeError(f"a pool description is bytes, not {type(data).__name__}")
    if len(data) > MAX_DESCRIPTION_BYTES:
        raise InvalidArgumentError(
            f"pool description of {len(data)} bytes exceeds {MAX_DESCRIPTION_BYTES} bytes"
        )
    try:
        desc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InvalidArgumentError(f"not a kvsched pool description (not JSON: {exc})") from None
    if not isinstance(desc, dict) or "kvsched_pool" not in desc:
        raise InvalidArgumentError("not a kvsched pool description (no 'kvsched_pool' key)")
    version = desc["kvsched_pool"]
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise InvalidArgumentError(
            f"pool description version {_short(version)} is not supported (this kvsched reads {FORMAT_VERSION})"
        )
    known = {"kvsched_pool", "agent", "metadata", "mem", "device_id", "layer_ptrs", "num_blocks",
             "piece_bytes", "block_stride", "piece_offsets", "dtype", "layer_names"}
    unknown = sorted(str(k)[:40] for k in desc if k not in known)
    if unknown:
        raise InvalidArgumentError(f"pool description has unknown key(s): {', '.join(unknown[:5])}")

    agent = _text(desc, "agent", required=True)
    mem = desc.get("mem")
    if mem not in ("DRAM", "VRAM"):
        raise InvalidArgumentError(f"pool description: mem must be 'DRAM' or 'VRAM', got {_short(mem)}")
    device_id = _int(desc, "device_id", 0, 1 << 20)
    ptrs = _int_list(desc, "layer_ptrs", 1, _MAX_LAYERS, lo=1, hi=_U64)
    offsets = _int_list(desc, "piece_offsets", 1, _MAX_PIECES, lo=0, hi=_U64)
    num_blocks = _int(desc, "num_blocks", 0, 1 << 40)
    piece_bytes = _int(desc, "piece_bytes", 1, 1 << 40)
    block_stride = _int(desc, "block_stride", 0, 1 << 48)
    dtype = desc.get("dtype")
    if dtype is not None and (not isinstance(dtype, str) or len(dtype) > 32):
        raise InvalidArgumentError(f"pool description: dtype must be a short string or null, got {_short(dtype)}")
    names = desc.get("layer_names")
    if names is not None:
        if not isinstance(names, list) or len(names) != len(ptrs) or not all(
            isinstance(n, str) and len(n) <= _MAX_NAME for n in names
        ):
            raise InvalidArgumentError("pool description: layer_names must be one short string per layer, or null")
    # Every byte of every layer must lie in the peer's 64-bit address space; NIXL checks the
    # rest (that the ranges are inside memory the peer registered) when a transfer is made.
    span = (max(offsets) + piece_bytes + max(num_blocks - 1, 0) * block_stride)
    if any(p + span - 1 > _U64 for p in ptrs):
        raise InvalidArgumentError("pool description: a layer's blocks run past the end of the address space")
    metadata = desc.get("metadata")
    md_bytes: bytes | None = None
    if metadata is not None:
        if not isinstance(metadata, str):
            raise InvalidArgumentError("pool description: metadata must be base64 text or null")
        try:
            md_bytes = base64.b64decode(metadata.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError, ValueError):
            raise InvalidArgumentError("pool description: metadata is not valid base64") from None
        if not md_bytes:
            raise InvalidArgumentError("pool description: metadata is empty")
    pool = RemotePool(
        agent,
        ptrs,
        num_blocks,
        piece_bytes,
        block_stride,
        offsets,
        mem_type=mem,
        device_id=device_id,
        dtype=dtype,
        layer_names=names,
        importer=importer,
    )
    return pool, md_bytes


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:40] + "..."


def _text(desc: dict, key: str, *, required: bool) -> str:
    value = desc.get(key)
    if not isinstance(value, str) or not value or len(value) > _MAX_NAME:
        raise InvalidArgumentError(
            f"pool description: {key} must be a non-empty string of at most {_MAX_NAME} characters, got {_short(value)}"
        )
    if any(ord(c) < 32 for c in value):
        raise InvalidArgumentError(f"pool description: {key} has control characters")
    return value


def _int(desc: dict, key: str, lo: int, hi: int) -> int:
    value = desc.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise InvalidArgumentError(f"pool description: {key} must be an integer in [{lo}, {hi}], got {_short(value)}")
    return value


def _int_list(desc: dict, key: str, min_len: int, max_len: int, *, lo: int, hi: int) -> list[int]:
    value = desc.get(key)
    if not isinstance(value, list) or not min_len <= len(value) <= max_len:
        raise InvalidArgumentError(
            f"pool description: {key} must be a list of {min_len} to {max_len} integers, got {_short(value)}"
        )
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise InvalidArgumentError(f"pool description: {key} holds {_short(v)}, not an integer in [{lo}, {hi}]")
    return value
