"""Configuration of a host tier (the keys of vLLM's ``kv_connector_extra_config``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from kvsched.errors import InvalidArgumentError

__all__ = ["OffloadConfig"]

_LOAD_MODES = ("async", "layerwise")
_BACKENDS = ("auto", "host", "cuda")
_GRANULARITIES = ("auto", "layer", "step")


@dataclass(frozen=True)
class OffloadConfig:
    """Validated settings of one host tier.

    * ``host_bytes``: host memory of the tier, all workers together (each of ``world_size``
      workers holds ``host_bytes / world_size``); required.
    * ``load_mode``: ``"async"`` (a request waits for its loads before it is scheduled) or
      ``"layerwise"`` (loads run during the forward pass; each layer waits for its own blocks).
    * ``max_inflight``: kvsched operations executing at once per worker (loads before stores).
    * ``backend``: ``"auto"``, ``"host"`` or ``"cuda"`` (the transfer engine's backend).
    * ``op_timeout``: seconds after which an operation still undecided is cancelled (a load
      then fails and is recomputed; a store never becomes a hit); None: never.
    * ``op_granularity``: how a step's stores (and layerwise loads) are cut into operations.
      ``"layer"``: one operation and one transfer job per layer and step, layer k gated on layer
      k (on a GPU each copy waits for its layer's event and overlaps the rest of the forward
      pass). ``"step"``: one operation and one job per step for every layer, gated on the step's
      last layer (one submission per step; nothing to overlap on the host backend, where a copy
      thread and the forward thread share the CPU and the GIL). ``"auto"``: ``"layer"`` on the
      cuda backend, ``"step"`` on the host backend.
    * ``remote_timeout``: disaggregated serving, producer side: seconds a finished request's
      blocks are kept for the consumer's read; after that they are freed (the consumer's read
      then fails and it recomputes). Default 480, as vLLM's ``VLLM_NIXL_ABORT_REQUEST_TIMEOUT``.
    """

    host_bytes: int
    load_mode: str = "async"
    max_inflight: int = 64
    backend: str = "auto"
    op_timeout: float | None = None
    op_granularity: str = "auto"
    remote_timeout: float = 480.0

    KEYS = ("host_bytes", "load_mode", "max_inflight", "backend", "op_timeout", "op_granularity", "remote_timeout")

    @classmethod
    def from_dict(cls, extra: Mapping[str, Any] | None, *, where: str = "kv_connector_extra_config") -> "OffloadConfig":
        """Parse and validate; every error names the key (``InvalidArgumentError``, a ValueError)."""
        if extra is None:
            extra = {}
        if not isinstance(extra, Mapping):
            raise InvalidArgumentError(f"{where} must be a mapping, got {type(extra).__name__}")
        unknown = sorted(set(extra) - set(cls.KEYS))
        if unknown:
            raise InvalidArgumentError(
                f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; known keys: {', '.join(cls.KEYS)}"
            )
        if "host_bytes" not in extra:
            raise InvalidArgumentError(f"{where}: 'host_bytes' is required (host tier size in bytes)")
        host_bytes = extra["host_bytes"]
        if isinstance(host_bytes, bool) or not isinstance(host_bytes, int) or host_bytes <= 0:
            raise InvalidArgumentError(f"{where}: 'host_bytes' must be a positive int, got {host_bytes!r}")
        load_mode = extra.get("load_mode", "async")
        if load_mode not in _LOAD_MODES:
            raise InvalidArgumentError(f"{where}: 'load_mode' must be one of {_LOAD_MODES}, got {load_mode!r}")
        max_inflight = extra.get("max_inflight", 64)
        if isinstance(max_inflight, bool) or not isinstance(max_inflight, int) or max_inflight < 1:
            raise InvalidArgumentError(f"{where}: 'max_inflight' must be an int >= 1, got {max_inflight!r}")
        backend = extra.get("backend", "auto")
        if backend not in _BACKENDS:
            raise InvalidArgumentError(f"{where}: 'backend' must be one of {_BACKENDS}, got {backend!r}")
        op_timeout = extra.get("op_timeout")
        if op_timeout is not None and (
            isinstance(op_timeout, bool)
            or not isinstance(op_timeout, (int, float))
            or not op_timeout > 0
            or math.isinf(op_timeout)
        ):
            raise InvalidArgumentError(
                f"{where}: 'op_timeout' must be a positive number of seconds or null, got {op_timeout!r}"
            )
        granularity = extra.get("op_granularity", "auto")
        if granularity not in _GRANULARITIES:
            raise InvalidArgumentError(
                f"{where}: 'op_granularity' must be one of {_GRANULARITIES}, got {granularity!r}"
            )
        remote_timeout = extra.get("remote_timeout", 480.0)
        if (isinstance(remote_timeout, bool) or not isinstance(remote_timeout, (int, float))
                or not remote_timeout > 0 or math.isinf(remote_timeout)):
            raise InvalidArgumentError(
                f"{where}: 'remote_timeout' must be a positive number of seconds, got {remote_timeout!r}"
            )
        return cls(host_bytes, load_mode, max_inflight, backend, None if op_timeout is None else float(op_timeout),
                   granularity, float(remote_timeout))

    def num_host_blocks(self, block_bytes_per_worker: int, world_size: int = 1, *, where: str = "kv_connector_extra_config") -> int:
        """Tier capacity in blocks: ``host_bytes // (world_size * block_bytes_per_worker)``;
        raises naming ``host_bytes`` when that is not even one block."""
        per_block = int(block_bytes_per_worker) * int(world_size)
        if per_block <= 0:
            raise InvalidArgumentError(f"block size must be positive, got {block_bytes_per_worker} bytes")
        n = self.host_bytes // per_block
        if n < 1:
            raise InvalidArgumentError(
                f"{where}: 'host_bytes'={self.host_bytes} is too small for one KV block "
                f"({per_block} bytes: {block_bytes_per_worker} per worker x {world_size} workers)"
            )
        return n
