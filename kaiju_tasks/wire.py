"""The shape services return rows in: JSON-ready dicts of columns, timestamps as ISO 8601 text.

``TaskService``, ``NotificationService`` and ``TokenService`` return this shape in process, and
the RPC server sends it as it is.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any


def json_ready(row: Mapping[str, Any], columns: Iterable[str] | None = None) -> dict[str, Any]:
    """Return ``row`` (only ``columns``, in that order, when given) with timestamps as text."""
    keys = row.keys() if columns is None else columns
    out: dict[str, Any] = {}
    for key in keys:
        value = row[key]
        out[key] = value.isoformat() if isinstance(value, datetime) else value
    return out
