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

import asyncio
import contextvars
import functools
import json
import socket
import struct
from collections.abc import Awaitable, Callable, Mapping, Sequence
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
        self,
        session: aiohttp.ClientSession | None = None,
        *,
        token: str | None = None,
        connections: int = 100,
    ) -> None:
        self._session = session
        self._own = session is None
        self.connections = connections
        """Most connections of the session it opens (not of a session given)."""
        self.token = token
        """Sent as ``Authorization: Bearer <token>`` (e.g. to another kaiju-tasks server)."""

    async def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.connections, socket_factory=_socket)
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
        """POST one request and return its result.

        Raises:
            errors.RemoteCallError: the app answered a JSON-RPC error.
            errors.StageRejected: the app rejected the task.
            errors.TransportError: the app cannot be reached or did not answer JSON-RPC.
            errors.StageError: the reply is larger than the ``stage_result_bytes`` limit allows
                (not retryable).
        """
        headers = self._headers(correlation_id, deadline, seconds_left)
        tracing.inject(headers)  # the stage's span: the called service joins the trace
        body = encode(protocol.request(method, params, request_id))
        shown = _shown(url)
        status, reply = await self._post(url, body, headers, shown, reply_bound())
        if not isinstance(reply, dict):
            raise errors.TransportError(
                f"{shown} answered with a JSON-RPC reply that is not an object"
            )
        return _outcome(reply, shown, status)

    async def call_batch(
        self,
        url: str,
        calls: Sequence[tuple[str, Any, str]],
        *,
        deadline: datetime | None,
        seconds_left: float | None,
    ) -> list[Any]:
        """POST ``calls`` (``(method, params, request_id)``) as one JSON-RPC batch.

        Returns one outcome per call, in order: its result, or the exception :meth:`call`
        would raise for it. A failure of the whole request (unreachable, not JSON-RPC) is
        raised for all. ``deadline`` and ``seconds_left`` (sent as headers) are the latest of
        the calls'; each caller still bounds its own call. The calls are of different tasks:
        no correlation id or trace context is sent (they are per request, not per call). The
        reply is read up to ``stage_result_bytes`` per call, at most ``reply_bytes`` in all.
        """
        headers = self._headers(None, deadline, seconds_left)
        body = encode([protocol.request(method, params, rid) for method, params, rid in calls])
        shown = _shown(url)
        bound = max(reply_bound(), min(reply_bound() * len(calls), limits.active().reply_bytes))
        status, reply = await self._post(url, body, headers, shown, bound)
        if not isinstance(reply, list):
            if isinstance(reply, dict) and reply.get("error") is not None:
                try:
                    _outcome(reply, shown, status)  # the whole batch refused: say why
                except errors.StageError as exc:
                    raise errors.TransportError(
                        f"{shown} refused a batch of {len(calls)} calls: {exc.message}"
                    ) from None
            raise errors.TransportError(
                f"{shown} answered a batch with a JSON-RPC reply that is not an array"
            )
        by_id = {item.get("id"): item for item in reply if isinstance(item, dict) and "id" in item}
        outcomes: list[Any] = []
        for _method, _params, request_id in calls:
            item = by_id.get(request_id)
            if item is None:
                outcomes.append(
                    errors.TransportError(f"{shown} answered a batch without this call's reply")
                )
                continue
            try:  # each result is held to stage_result_bytes by the executor as it stores it
                outcomes.append(_outcome(item, shown, status))
            except errors.StageError as exc:
                outcomes.append(exc)
        return outcomes

    def _headers(
        self, correlation_id: str | None, deadline: datetime | None, seconds_left: float | None
    ) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if correlation_id:
            headers[protocol.CORRELATION_HEADER] = correlation_id
        if deadline is not None:
            headers[protocol.DEADLINE_HEADER] = deadline.isoformat()
        if seconds_left is not None:
            headers[protocol.TIMEOUT_HEADER] = f"{max(seconds_left, 0.0):.3f}"
        return headers

    async def _post(
        self, url: str, body: bytes, headers: Mapping[str, str], shown: str, bound: int
    ) -> tuple[int, Any]:
        """POST ``body``; return the HTTP status and the decoded JSON reply."""
        session = await self._get_session()
        try:
            async with session.post(url, data=body, headers=headers) as response:
                status = response.status
                raw = await _read(response, shown, bound)
        except (aiohttp.ClientError, ValueError) as exc:
            # ValueError: what aiohttp raises for a request it cannot make (e.g. an
            # Authorization header beside credentials in the URL). No chained cause: its text
            # and traceback may quote the URL.
            raise errors.TransportError(
                f"cannot reach {shown}: {type(exc).__name__}: {redact.text(str(exc))}"
            ) from None
        try:
            return status, orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise errors.TransportError(
                f"{shown} answered HTTP {status} with a body that is not JSON"
            ) from None


class CallBatches:
    """Stage calls to one app, gathered into JSON-RPC batch requests (``[apps]`` ``batch=N``).

    Each caller awaits its own call. A lone call goes out at once (as a batch of one); calls
    made while ``in_flight`` batches (the executor's ``concurrency``) are on their way gather,
    and the next batch takes up to ``max_batch`` of them: under load the batches grow by
    themselves, with no timer. A batch's reply comes when every call in it is answered, so one
    slow call delays the others of its batch.
    """

    def __init__(
        self,
        client: Client,
        url: str,
        max_batch: int,
        *,
        in_flight: int = 2,
        ready: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.client = client
        self.url = url
        self.max_batch = max_batch
        self.in_flight = in_flight
        self.ready = ready
        """Awaited before each batch goes out (the executor's lease): a call queued while the
        executor may have lost its runs waits, and is dropped if its caller gave up."""
        self._pending: list[tuple[tuple[str, Any, str], datetime | None, float | None, Any]] = []
        self._flushers: set[asyncio.Task[None]] = set()

    def abandon(self) -> None:
        """Drop every call: the batches in flight (their connections are reset) and those waiting.

        Their callers are cancelled by the executor (its lease lapsed, or it stops).
        """
        for flusher in self._flushers:
            flusher.cancel()
        self._flushers.clear()  # calls made from now on get flushers of their own
        for _, _, _, future in self._pending:
            future.cancel()
        self._pending.clear()

    async def call(
        self,
        method: str,
        params: Any,
        *,
        request_id: str,
        deadline: datetime | None,
        seconds_left: float | None,
    ) -> Any:
        """Send one call in the next batch; return its result or raise its error."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append(((method, params, request_id), deadline, seconds_left, future))
        if len(self._flushers) < self.in_flight:
            # Not in this caller's context: the batch is no one call's (tracing, task context).
            flusher = asyncio.create_task(self._flush(), context=contextvars.Context())
            self._flushers.add(flusher)
            # _flush leaves the set itself; this covers a flusher cancelled before it ran.
            flusher.add_done_callback(self._flushers.discard)
        outcome = await future
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def _flush(self) -> None:
        try:
            await self._flush_pending()
        finally:
            # Out of the set in the same step as the loop's last check (not in a done callback,
            # a loop iteration later): a call made in between must find room for a flusher.
            this = asyncio.current_task()
            if this is not None:
                self._flushers.discard(this)

    async def _flush_pending(self) -> None:
        while self._pending:
            if self.ready is not None:
                await self.ready()
            batch = [entry for entry in self._pending[: self.max_batch] if not entry[3].done()]
            del self._pending[: self.max_batch]
            if not batch:
                continue  # their callers gave up (timed out, cancelled)
            deadlines = [d for _, d, _, _ in batch if d is not None]
            seconds = [s for _, _, s, _ in batch if s is not None]
            outcomes: list[Any]
            try:
                outcomes = await self.client.call_batch(
                    self.url,
                    [call for call, _, _, _ in batch],
                    deadline=max(deadlines) if deadlines else None,
                    seconds_left=max(seconds) if seconds else None,
                )
            except errors.StageError as exc:
                outcomes = [exc] * len(batch)
            except Exception as exc:  # noqa: BLE001 - every caller must learn the outcome
                failure = errors.TransportError(
                    f"batch to {redact.url(self.url)} failed: {type(exc).__name__}"
                )
                outcomes = [failure] * len(batch)
            for (_, _, _, future), outcome in zip(batch, outcomes, strict=True):
                if not future.done():
                    future.set_result(outcome)


def _socket(addr_info: tuple[Any, ...]) -> socket.socket:
    """A client socket whose close resets the connection (``SO_LINGER`` 0).

    A call abandoned (its deadline passed, its run taken away, the executor's lease lapsed)
    closes its connection. A plain close leaves what the kernel still holds of the request to be
    sent: over a cut link, it would reach the service when the link comes back, possibly after
    the task ran elsewhere. A reset drops it. Connections closed when idle lose nothing by it.
    """
    family, kind, proto = addr_info[0], addr_info[1], addr_info[2]
    sock = socket.socket(family=family, type=kind, proto=proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    return sock


@functools.lru_cache(maxsize=256)
def _shown(url: str) -> str:
    """``url`` as messages show it (:func:`kaiju_tasks.redact.url`), worked out once per URL.

    An executor calls the few URLs of its apps over and over.
    """
    return redact.url(url)


def _outcome(reply: Mapping[str, Any], shown: str, status: int) -> Any:
    """The result of one JSON-RPC reply object, or the error it stands for, raised."""
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


async def _read(response: aiohttp.ClientResponse, shown: str, bound: int) -> bytes:
    """The body of ``response``, read no further than ``bound`` bytes."""
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
