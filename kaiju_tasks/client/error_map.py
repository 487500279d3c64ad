"""The client's error map: each JSON-RPC error code back to the exception the service raises."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kaiju_tasks import errors
from kaiju_tasks.rpc import protocol


def error_for(method: str, error: Mapping[str, Any]) -> errors.KaijuTasksError:
    """The exception the Python service raises for the JSON-RPC ``error`` of ``method``.

    ========  ==============================================================================
    -32602    :class:`~kaiju_tasks.errors.ValidationError`, ``field`` and ``errors`` from
              ``data.errors``
    -32001    :class:`~kaiju_tasks.errors.NotAuthorized`
    -32002    :class:`~kaiju_tasks.errors.TaskNotFound` (``tasks.*``) or
              :class:`~kaiju_tasks.errors.NotificationNotFound` (``notifications.*``)
    -32003    :class:`~kaiju_tasks.errors.Conflict` (``tasks.create``, ``tasks.copy``: the id
              exists) or :class:`~kaiju_tasks.errors.InvalidTransition` (every other method:
              the task's status refuses the operation); the server sends one code for both
    -32008    :class:`~kaiju_tasks.errors.RateLimited`
    other     :class:`~kaiju_tasks.errors.RemoteError` with ``code`` and ``data``
    ========  ==============================================================================
    """
    code = error.get("code")
    if not isinstance(code, int) or isinstance(code, bool):
        code = protocol.INTERNAL_ERROR
    message = str(error.get("message") or "remote error")
    data = error.get("data")
    if code == protocol.INVALID_PARAMS:
        found = data.get("errors") if isinstance(data, dict) else None
        if isinstance(found, list) and found and all(isinstance(e, dict) for e in found):
            return errors.ValidationError(message, errors=found)
        field = data.get("field") if isinstance(data, dict) else None
        return errors.ValidationError(message, field=field if isinstance(field, str) else None)
    if code == protocol.NOT_AUTHORIZED:
        return errors.NotAuthorized(message)
    if code == protocol.NOT_FOUND:
        if method.startswith("notifications."):
            return errors.NotificationNotFound(message)
        return errors.TaskNotFound(message)
    if code == protocol.CONFLICT:
        if method in ("tasks.create", "tasks.copy"):
            return errors.Conflict(message)
        return errors.InvalidTransition(message)
    if code == protocol.RATE_LIMITED:
        wait = data.get("retry_after") if isinstance(data, dict) else None
        return errors.RateLimited(
            message,
            data=data,
            retry_after=float(wait) if isinstance(wait, int | float) else None,
        )
    return errors.RemoteError(message, code=code, data=data)
