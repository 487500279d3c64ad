"""Outbound JSON-RPC calls made by the executor (one aiohttp.ClientSession per executor).

A reply is read at most :func:`reply_bound` bytes: the ``stage_result_bytes`` limit plus
:data:`ENVELOPE_BYTES` for the JSON-RPC envelope. A ``Content-Length`` over the bound is refused
before the body is read; a body without one is read in chunks and abandoned as soon as it passes
the bound. Either way the stage fails, not to be retried, with an error naming the limit.

Every message that names the app's URL shows it through :func:`kaiju_tasks.redact.url` (no
password, no query value), and any exception text embedded in a message goes through
:func:`kaiju_tasks.redact.text`: an aiohttp exception may quote the URL it was given.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Final

import aiohttp
import orjson

from kaiju_tasks import errors, limits, redact, tracing
from kaiju_tasks.rpc import protocol

ENVELOPE_BYTES: Final = 64 * limits.KIB
"""Room for the JSON-RPC envelope of a reply (``jsonrpc``, ``id``, an error's message and data)
on top of the ``stage_result_bytes`` limit."""
CHUNK_BYTES: Final = 64 * limits.KIB
"""Largest piece of a reply body read at a time."""


def reply_bound() -> int:
    """The most bytes of a reply body read: ``stage_result_bytes`` plus the envelope."""
    return limits.active().stage_result_bytes + ENVELOPE_BYTES


def encode(body: Any) -> bytes:
    """``body`` as compact JSON (orjson; the standard library for what orjson refuses)."""
    try:
        return orjson.dumps(body)
    except TypeError:  # an integer beyond 64 bits, or nesting deeper than orjson's limit
        return json.dumps(body, separators=(",", ":")).encode()


class Client:
    """Calls JSON-RPC methods over HTTP; the caller bounds each call with asyncio.timeout."""

    def __init__(
        self, session: aiohttp.ClientSession | None = None, *, token: str | None = None
    ) -> None:
        self._session = session
        self._own = session is None
        self.token = token
        """Sent as ``Authorization: Bearer <token>`` (e.g. to another kaiju-tasks server)."""

    async def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100))
            self._own = True
        return self._session

    async def close(self) -> None:
        """Close the session if this client opened it."""
        if self._own and self._session is not None:
            await self._session.close()
            self._session = None

    async def call(
        self,
        url: str,
        method: str,
        params: Any,
        *,
        request_id: str,
        correlation_id: str | None,
        deadline: datetime | None,
        seconds_left: float | None,
    ) -> Any:
        """POST one request and return its result.

        Raises:
            errors.RemoteCallError: the app answered a JSON-RPC error.
            errors.StageRejected: the app rejected the task.
            errors.TransportError: the app cannot be reached or did not answer JSON-RPC.
            errors.StageError: the reply is larger than the ``stage_result_bytes`` limit allows
                (not retryable).
        """
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if correlation_id:
            headers[protocol.CORRELATION_HEADER] = correlation_id
        if deadline is not None:
            headers[protocol.DEADLINE_HEADER] = deadline.isoformat()
        if seconds_left is not None:
            headers[protocol.TIMEOUT_HEADER] = f"{max(seconds_left, 0.0):.3f}"
        tracing.inject(headers)  # the stage's span: the called service joins the trace
        session = await self._get_session()
        body = encode(protocol.request(method, params, request_id))
        shown = redact.url(url)
        try:
            async with session.post(url, data=body, headers=headers) as response:
                status = response.status
                raw = await _read(response, shown)
        except (aiohttp.ClientError, ValueError) as exc:
            # ValueError: what aiohttp raises for a request it cannot make (e.g. an
            # Authorization header beside credentials in the URL). No chained cause: its text
            # and traceback may quote the URL.
            raise errors.TransportError(
                f"cannot reach {shown}: {type(exc).__name__}: {redact.text(str(exc))}"
            ) from None
        try:
            reply = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise errors.TransportError(
                f"{shown} answered HTTP {status} with a body that is not JSON"
            ) from None
        if not isinstance(reply, dict):
            raise errors.TransportError(
                f"{shown} answered with a JSON-RPC reply that is not an object"
            )
        if "error" in reply and reply["error"] is not None:
            err = reply["error"] if isinstance(reply["error"], dict) else {}
            code = err.get("code", protocol.INTERNAL_ERROR)
            data = err.get("data")
            if code == protocol.REJECTED:
                requeue = isinstance(data, dict) and data.get("requeue") is True
                raise errors.StageRejected(str(err.get("message", "rejected")), requeue=requeue)
            # Retrying cannot help a missing method, bad params, or an error whose data says
            # {"retryable": false} (what MethodError(retryable=False) sends over HTTP).
            final = code in (protocol.METHOD_NOT_FOUND, protocol.INVALID_PARAMS) or (
                isinstance(data, dict) and data.get("retryable") is False
            )
            raise errors.RemoteCallError(
                str(err.get("message", "remote error")),
                code=code if isinstance(code, int) else protocol.INTERNAL_ERROR,
                data=data,
                retryable=not final,
            )
        if "result" not in reply:
            raise errors.TransportError(f"{shown} answered HTTP {status} without a JSON-RPC result")
        return reply["result"]


async def _read(response: aiohttp.ClientResponse, shown: str) -> bytes:
    """The body of ``response``, read no further than :func:`reply_bound` bytes."""
    bound = reply_bound()
    if response.content_length is not None and response.content_length > bound:
        raise _too_large(shown)
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(CHUNK_BYTES):
        size += len(chunk)
        if size > bound:
            raise _too_large(shown)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(shown: str) -> errors.StageError:
    limit = limits.describe(limits.active().stage_result_bytes)
    return errors.StageError(
        f"{shown} sent a reply larger than stage_result_bytes ({limit}) allows", retryable=False
    )
