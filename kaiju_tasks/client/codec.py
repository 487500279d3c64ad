"""The client's JSON: requests encoded as the server reads them, replies decoded and checked.

Models are sent by field name (``model_json``); anything orjson cannot encode falls back to the
standard library, and a reply holding an integer beyond 64 bits is decoded by the standard
library too, so no integer becomes a float on the way.
"""

from __future__ import annotations

import builtins
import datetime as dt
import enum
import json
import re
import uuid
from collections.abc import Mapping
from typing import Any, Final

import orjson
import pydantic

from kaiju_tasks import conditions, errors, models
from kaiju_tasks.rpc import protocol

# A run of digits that may be an integer beyond 64 bits, which orjson would read as a float.
_LONG_NUMBER: Final = re.compile(rb"[0-9]{19}")


def model_json(model: pydantic.BaseModel) -> Any:
    """A model as the server reads it: field names (the aliases only validate), JSON values.

    A :class:`~kaiju_tasks.models.TaskUpdate` keeps only the fields that were set, since an
    update changes exactly those; a whole dump of its nested stages keeps their ``kind``.
    """
    if isinstance(model, models.TaskUpdate):
        return model.model_dump(mode="json", by_alias=False, include=model.model_fields_set)
    return model.model_dump(mode="json", by_alias=False)


def _default(value: Any) -> Any:
    """What orjson (or the standard library) cannot encode by itself."""
    if isinstance(value, pydantic.BaseModel):
        return model_json(value)
    if isinstance(value, conditions.Condition):
        return value.to_json()
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, tuple | frozenset | set):
        return builtins.list(value)
    # Only the standard library fallback gets here with these (orjson encodes them itself).
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, uuid.UUID):
        return str(value)
    raise TypeError(f"Type is not JSON serializable: {type(value).__name__}")


def encode(body: Any) -> bytes:
    """``body`` as compact JSON; raises TypeError, ValueError or RecursionError if it is not."""
    try:
        return orjson.dumps(body, default=_default)
    except TypeError:  # an integer beyond 64 bits, or nesting deeper than orjson's limit
        return json.dumps(body, default=_default, separators=(",", ":")).encode()


def decode(raw: bytes) -> Any:
    """The JSON value in ``raw``, integers beyond 64 bits kept exact; raises ValueError."""
    if _LONG_NUMBER.search(raw):  # maybe an integer orjson would turn into a float
        return json.loads(raw)
    return orjson.loads(raw)


def request_body(method: str, params: dict[str, Any], request_id: int) -> bytes:
    """The request as JSON; a param that is not JSON is refused like the services refuse it."""
    body = protocol.request(method, params, request_id)
    try:
        return encode(body)
    except (TypeError, ValueError, RecursionError) as exc:
        field = None
        for name, value in params.items():
            try:
                encode(value)
            except (TypeError, ValueError, RecursionError):
                field = name
                break
        raise errors.ValidationError(f"not JSON: {exc}", field=field) from None


def reply(raw: bytes) -> dict[str, Any] | None:
    """The JSON-RPC reply object in ``raw``, or None when there is none."""
    try:
        found = decode(raw)
    except (ValueError, RecursionError):
        return None
    if not isinstance(found, dict) or found.get("jsonrpc") != "2.0":
        return None
    if "error" not in found and "result" not in found:
        return None
    return found
