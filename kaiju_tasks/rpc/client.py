"""Outbound JSON-RPC calls made by the executor (one aiohttp.ClientSession per executor)."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import aiohttp

from kaiju_tasks import errors
from kaiju_tasks.rpc import protocol


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
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=100),
                json_serialize=lambda v: json.dumps(v, separators=(",", ":")),
            )
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
        """POST one request and return its result; raise RemoteCallError or TransportError."""
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if correlation_id:
            headers[protocol.CORRELATION_HEADER] = correlation_id
        if deadline is not None:
            headers[protocol.DEADLINE_HEADER] = deadline.isoformat()
        if seconds_left is not None:
            headers[protocol.TIMEOUT_HEADER] = f"{max(seconds_left, 0.0):.3f}"
        session = await self._get_session()
        body = protocol.request(method, params, request_id)
        try:
            async with session.post(url, json=body, headers=headers) as response:
                text = await response.text()
                status = response.status
        except aiohttp.ClientError as exc:
            raise errors.TransportError(f"cannot reach {url}: {exc}") from exc
        try:
            reply = json.loads(text)
        except ValueError:
            raise errors.TransportError(
                f"{url} answered HTTP {status} with a body that is not JSON"
            ) from None
        if not isinstance(reply, dict):
            raise errors.TransportError(
                f"{url} answered with a JSON-RPC reply that is not an object"
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
            raise errors.TransportError(f"{url} answered HTTP {status} without a JSON-RPC result")
        return reply["result"]
