"""JSON-RPC 2.0 request, response and error types and codes (pure)."""

from __future__ import annotations

from typing import Any, Final

PARSE_ERROR: Final = -32700
INVALID_REQUEST: Final = -32600
METHOD_NOT_FOUND: Final = -32601
INVALID_PARAMS: Final = -32602
INTERNAL_ERROR: Final = -32603
# Application codes (-32000 to -32099 are reserved for implementations).
NOT_AUTHORIZED: Final = -32001
NOT_FOUND: Final = -32002
CONFLICT: Final = -32003
TIMEOUT: Final = -32004
REJECTED: Final = -32005
CANCELLED: Final = -32006
"""The error code of a task cancelled by a user."""
REPLY_TOO_LARGE: Final = -32007
"""The replies of one HTTP request would pass ``[limits] reply_bytes``."""
RATE_LIMITED: Final = -32008
"""Too many failed authentications from the client's address (with HTTP 429)."""

CORRELATION_HEADER: Final = "X-Correlation-Id"
"""Carries the task's ``job_id`` on every stage call."""
DEADLINE_HEADER: Final = "X-Deadline"
"""The moment (ISO 8601, UTC) after which the caller abandons the stage."""
TIMEOUT_HEADER: Final = "X-Timeout"
"""Seconds the callee has, as a decimal number."""


def request(method: str, params: Any, request_id: str | int | None) -> dict[str, Any]:
    """Build a request object (a notification when ``request_id`` is None)."""
    body: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
    if params is not None:
        body["params"] = params
    if request_id is not None:
        body["id"] = request_id
    return body


def error(code: int, message: str, data: Any = None) -> dict[str, Any]:
    """Build an error object."""
    body: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        body["data"] = data
    return body
