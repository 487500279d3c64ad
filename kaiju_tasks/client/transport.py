"""The client's transport: :class:`TasksClient`, its aiohttp session, retries and timeouts.

:meth:`TasksClient.call` posts one JSON-RPC call, sends a call of :data:`RETRIED` again
when the connection fails, bounds the whole call by ``timeout``, and raises the
service's exception for a JSON-RPC error (:func:`error_for`) or
:class:`~kaiju_tasks.errors.Unreachable` for what only HTTP can do wrong. Inside an
OpenTelemetry span, each request carries its ``traceparent`` (:func:`kaiju_tasks.tracing.inject`),
so a task created through the client joins the caller's trace.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import random
from typing import Any, Final

import aiohttp

from kaiju_tasks import errors, redact, tracing
from kaiju_tasks.client import codec, error_map, service, settings

# The name docs/client.md documents for the client's log lines, whichever module logs them.
logger = logging.getLogger("kaiju_tasks.client")


class _Failed(Exception):
    """One attempt failed at the transport level; ``error`` is what the caller gets."""

    def __init__(self, error: errors.Unreachable, *, retryable: bool) -> None:
        super().__init__(error.message)
        self.error = error
        self.retryable = retryable


class TasksClient:
    """The HTTP API of a kaiju-tasks server, called from asyncio code.

    Args:
        url: the server's URL, e.g. ``http://tasks.internal:8080`` (``/public/rpc`` is appended
            unless the URL ends with it). Default: ``KAIJU_TASKS_URL``, else
            ``http://127.0.0.1:8080``.
        token: the bearer token (``kaiju-tasks token create``). Default: ``KAIJU_TASKS_TOKEN``;
            none at all gets :class:`~kaiju_tasks.errors.NotAuthorized` from every call.
        timeout: seconds each call may take, retries and pauses included; beyond, it raises
            :class:`~kaiju_tasks.errors.Unreachable`.
        retries: how many times a call of :data:`RETRIED` is sent again after a connection
            failure (0: never).
        backoff: seconds before the first retry, doubled for each next one, at most
            :data:`MAX_BACKOFF` (each pause is randomly shortened by up to half).

    Use it as ``async with TasksClient() as client:``, or call :meth:`close` when done. It holds
    one aiohttp session, opened on first use, and serves any number of concurrent calls from the
    event loop that opened it.

    Raises:
        errors.ConfigError: the URL or the token cannot be used.
    """

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        timeout: float = settings.DEFAULT_TIMEOUT,
        retries: int = settings.DEFAULT_RETRIES,
        backoff: float = settings.DEFAULT_BACKOFF,
    ) -> None:
        if url is None:
            url = os.environ.get(settings.URL_ENV) or settings.DEFAULT_URL
            url_source = settings.URL_ENV if os.environ.get(settings.URL_ENV) else "the default URL"
        else:
            url_source = "url"
        token_source = "token=" if token is not None else settings.TOKEN_ENV
        if token is None:
            token = os.environ.get(settings.TOKEN_ENV)
        if not timeout > 0:
            raise errors.ConfigError(f"timeout must be > 0, got {timeout!r}")
        if retries < 0 or backoff < 0:
            raise errors.ConfigError("retries and backoff must be >= 0")
        self.endpoint: Final = settings.endpoint(url, url_source)
        """The JSON-RPC URL the calls are posted to."""
        self.timeout: Final = float(timeout)
        self.retries: Final = int(retries)
        self.backoff: Final = float(backoff)
        self._token = settings.token(token, token_source)
        self._shown = redact.url(self.endpoint)
        self._ids = itertools.count(1)
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self.tasks: Final = service.Tasks(self)
        """The methods of TaskService: ``create``, ``get``, ``exists``, ``list``, ``update``,
        ``delete``, ``reset``, ``copy``, ``write_message``, ``cancel``."""
        self.notifications: Final = service.Notifications(self)
        """The methods of NotificationService: ``get``, ``list``, ``update``, ``delete``."""

    def __repr__(self) -> str:
        token = "set" if self._token else "none"
        return f"{type(self).__name__}(endpoint={self._shown!r}, token: {token})"

    def _copy(self) -> TasksClient:
        """A new client with the same settings (and no session yet)."""
        return TasksClient(
            self.endpoint,
            self._token or "",
            timeout=self.timeout,
            retries=self.retries,
            backoff=self.backoff,
        )

    async def __aenter__(self) -> TasksClient:
        self._open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the session; later calls raise RuntimeError."""
        self._closed = True
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _open(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._closed:
            raise RuntimeError(f"{type(self).__name__} is closed")
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(keepalive_timeout=settings.KEEPALIVE),
                timeout=aiohttp.ClientTimeout(total=None),  # each call: asyncio.timeout
                headers={"User-Agent": "kaiju-tasks-client"},
            )
            self._loop = loop
        elif loop is not self._loop:
            raise RuntimeError(
                f"this {type(self).__name__} belongs to another event loop: make one per loop, "
                "or use SyncTasksClient from code without a loop"
            )
        return self._session

    async def call(self, method: str, params: dict[str, Any]) -> Any:
        """Call the JSON-RPC ``method`` with named ``params`` and return its result.

        The methods of :attr:`tasks` and :attr:`notifications` are built on it. A method of
        :data:`RETRIED` is sent again, up to ``retries`` times, when the connection fails (or
        a proxy answers 502, 503 or 504).

        Raises:
            errors.KaijuTasksError: the exception of the JSON-RPC error (see :func:`error_for`).
            errors.Unreachable: no connection, no reply within ``timeout``, or a reply that is
                not JSON-RPC.
        """
        session = self._open()
        request_id = next(self._ids)
        body = codec.request_body(method, params, request_id)
        retried = method in settings.RETRIED
        sent = False  # whether an attempt may have reached the server
        in_flight = False
        attempt = 0
        deadline = asyncio.timeout(self.timeout)
        try:
            async with deadline:
                while True:
                    in_flight = True
                    try:
                        return await self._post(session, method, body, request_id)
                    except _Failed as failed:
                        failure, retryable = failed.error, failed.retryable
                    in_flight = False
                    sent = sent or failure.sent
                    if not (retried and retryable and attempt < self.retries):
                        failure.sent = sent
                        raise failure  # outside the except: no aiohttp exception as context
                    attempt += 1
                    pause = min(self.backoff * 2 ** (attempt - 1), settings.MAX_BACKOFF)
                    pause *= random.uniform(0.5, 1.0)  # jitter, not a secret
                    logger.warning(
                        "%s; retry %d of %d in %.1f s",
                        failure.message,
                        attempt,
                        self.retries,
                        pause,
                        extra={"event": "client_retry", "method": method},
                    )
                    await asyncio.sleep(pause)
        except TimeoutError:
            if not deadline.expired():
                raise
            raise errors.Unreachable(
                f"{method}: no reply from {self._shown} within {self.timeout:g} s"
                + (f" ({attempt + 1} attempts)" if attempt else ""),
                sent=sent or in_flight,
            ) from None

    async def _post(
        self, session: aiohttp.ClientSession, method: str, body: bytes, request_id: int
    ) -> Any:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        # The caller's span, if any (never without the opentelemetry package: nothing imported).
        tracing.inject(headers)
        failure: errors.Unreachable | None = None
        try:
            async with session.post(
                self.endpoint, data=body, headers=headers, allow_redirects=False
            ) as response:
                status = response.status
                raw = await response.read()
                retry_after = response.headers.get("Retry-After")
                location = response.headers.get("Location")
        except aiohttp.ClientConnectorError as exc:  # the request never left
            failure = self._unreachable(method, exc, sent=False)
        except aiohttp.ClientError as exc:  # lost on the way: the server may have run it
            failure = self._unreachable(method, exc, sent=True)
        if failure is not None:
            # Raised outside the except: an aiohttp exception may carry the request's headers,
            # so it is not kept as the context.
            raise _Failed(failure, retryable=True)
        reply = codec.reply(raw)
        if reply is None:
            if status in settings.RETRY_STATUSES:
                error = errors.Unreachable(f"{method}: {self._shown} answered HTTP {status}")
                raise _Failed(error, retryable=True)
            detail = (
                f" (a redirect to {redact.url(location)}: give that URL)"
                if location and 300 <= status < 400
                else ": is it the URL of a kaiju-tasks server?"
            )
            raise errors.Unreachable(
                f"{method}: {self._shown} answered HTTP {status} without a JSON-RPC reply{detail}"
            )
        refusal = reply.get("error")
        if refusal is not None:
            raised = error_map.error_for(method, refusal if isinstance(refusal, dict) else {})
            if isinstance(raised, errors.RateLimited) and raised.retry_after is None:
                with contextlib.suppress(ValueError):
                    raised.retry_after = float(retry_after) if retry_after else None
            if isinstance(raised, errors.NotAuthorized) and not self._token:
                hint = f"no token: give token= or set {settings.TOKEN_ENV}"
                raised.message = f"{raised.message} ({hint})"
                raised.args = (raised.message,)
            raise raised
        if "result" not in reply or reply.get("id") != request_id:
            raise errors.Unreachable(
                f"{method}: {self._shown} answered HTTP {status} with a reply to another call"
            )
        return reply["result"]

    def _unreachable(
        self, method: str, exc: aiohttp.ClientError, *, sent: bool
    ) -> errors.Unreachable:
        # No chained cause: an aiohttp exception may carry the request and its headers.
        text = redact.text(str(exc)) or type(exc).__name__
        return errors.Unreachable(
            f"{method}: cannot reach {self._shown}: {type(exc).__name__}: {text}", sent=sent
        )
