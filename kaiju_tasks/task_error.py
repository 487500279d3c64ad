"""The error object a failed task holds in its ``error`` column: ``{code, message, stage, reason}``.

``code`` is a JSON-RPC error code (``rpc.protocol``: TIMEOUT, REJECTED, CANCELLED,
INTERNAL_ERROR, or the remote side's own), ``message`` says what happened, ``stage`` is the stage
the task stood at and ``reason`` is a stable word for programs (``error``, ``timeout``,
``rejected``, ``expired``, ``cancelled``, ``debug_executor_gone``). A notification of the failure
copies it. Pure: no I/O.
"""

from __future__ import annotations

from typing import Any

from kaiju_tasks import models


def build(
    code: int,
    message: str,
    *,
    reason: str,
    stage: int | None = None,
    data: models.JSONValue = None,
) -> dict[str, Any]:
    """Return a task error object.

    ``stage`` None leaves the key out, for the store to add the stage the task stands at under
    its row lock (a cancel does not know it beforehand). ``data``, when not None, carries the
    remote side's JSON-RPC error data.
    """
    error: dict[str, Any] = {"code": code, "message": message}
    if stage is not None:
        error["stage"] = stage
    error["reason"] = reason
    if data is not None:
        error["data"] = data
    return error
