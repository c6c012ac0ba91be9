"""The `kvsched` logger, and the hook the C++ core calls when a handle is dropped."""

from __future__ import annotations

import logging

logger = logging.getLogger("kvsched")


def log_dropped(request_id: str, uuid: str) -> None:
    logger.error(
        "HandleDroppedError: handle of request %r op %s was garbage-collected after its EXECUTE "
        "decision without mark_complete(); the operation is recorded as failed",
        request_id,
        uuid,
    )
