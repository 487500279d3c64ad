"""JSON-RPC replies of the server: the envelope, the encoding and the ``reply_bytes`` bound.

A request's replies are encoded as they come (:class:`Reply`); once they would pass
``limits.reply_bytes``, that call and every later call of the batch are answered with
``REPLY_TOO_LARGE`` instead.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web

from kaiju_tasks import limits
from kaiju_tasks.rpc import protocol


def envelope(
    request_id: Any, *, result: Any = None, error: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A JSON-RPC 2.0 response object: ``error`` if given, else ``result``."""
    body: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id}
    if error is not None:
        body["error"] = error
    else:
        body["result"] = result
    return body


def json_response(
    body: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    """An ``application/json`` response of ``body``."""
    return web.Response(
        body=encode(body),
        status=status,
        content_type="application/json",
        charset="utf-8",
        headers=headers,
    )


def encode(value: Any) -> bytes:
    """JSON bytes of ``value``.

    What orjson cannot encode (integers over 64 bits, lone surrogates from an application
    method) goes through the standard library instead.
    """
    try:
        return orjson.dumps(value, default=str, option=orjson.OPT_NON_STR_KEYS)
    except (TypeError, orjson.JSONEncodeError):
        return json.dumps(value, default=str).encode()


def valid_id(request_id: Any) -> bool:
    """Whether ``request_id`` may be a JSON-RPC id: a string, an integer (not a bool) or null."""
    return isinstance(request_id, str | int | type(None)) and not isinstance(request_id, bool)


class Reply:
    """The replies of one HTTP request, encoded as they come, within ``reply_bytes`` in all."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.size = 0
        self.parts: list[bytes] = []
        self.full = False

    def _error(self, call: Any) -> dict[str, Any] | None:
        if isinstance(call, dict) and "id" not in call:
            return None  # a notification: no reply, even to say it did not run
        request_id = call.get("id") if isinstance(call, dict) else None
        message = (
            f"reply larger than reply_bytes ({limits.describe(self.limit)}): "
            "ask for fewer columns or a smaller limit"
        )
        data = {"limit": "reply_bytes", "bytes": self.limit}
        return envelope(
            request_id if valid_id(request_id) else None,
            error=protocol.error(protocol.REPLY_TOO_LARGE, message, data),
        )

    def add(self, call: Any, reply: dict[str, Any] | None) -> None:
        """Keep the reply to ``call`` (None: a notification), or refuse it if it does not fit."""
        if reply is None:
            return
        encoded = encode(reply)
        if self.size + len(encoded) + 1 > self.limit:
            self.refuse(call)
            return
        self.size += len(encoded) + 1
        self.parts.append(encoded)

    def refuse(self, call: Any) -> None:
        """Answer ``call`` with the reply-size error (it and every later call of the batch)."""
        self.full = True
        error = self._error(call)
        if error is not None:
            self.parts.append(encode(error))  # small: not counted against the limit

    def response(self, *, batch: bool) -> web.Response:
        """The HTTP response: the replies (an array for a batch), or 204 when there are none."""
        if not self.parts:
            return web.Response(status=204)
        body = b"[" + b",".join(self.parts) + b"]" if batch else self.parts[0]
        return web.Response(body=body, content_type="application/json", charset="utf-8")
