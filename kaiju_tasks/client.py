"""A typed client for the HTTP JSON-RPC API.

:class:`TasksClient` is for asyncio code, :class:`SyncTasksClient` for blocking code (scripts,
Django views).

```python
from kaiju_tasks import Task, TaskCommand
from kaiju_tasks.client import TasksClient

async with TasksClient() as client:  # KAIJU_TASKS_URL, KAIJU_TASKS_TOKEN
    task = await client.tasks.create(Task(app="orders", commands=[TaskCommand(method="x")]))
    task = await client.tasks.get(task["id"], columns=["status"])
```

``client.tasks`` and ``client.notifications`` have the method names and params of
:class:`~kaiju_tasks.service.TaskService` and :class:`~kaiju_tasks.service.NotificationService`,
return the same plain dicts, and raise the same exceptions: each JSON-RPC error code is mapped
back to its class (:func:`error_for`). What only HTTP can do wrong raises
:class:`~kaiju_tasks.errors.Unreachable` (no connection, no reply within ``timeout``, a reply that
is not JSON-RPC), :class:`~kaiju_tasks.errors.RateLimited` (HTTP 429) or
:class:`~kaiju_tasks.errors.RemoteError` (any other JSON-RPC error, with its ``code`` and
``data``).

Only the calls that change nothing (:data:`RETRIED`) are sent again when the connection fails;
the others are sent once. The token never appears in a message, a log line or a ``repr``.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import datetime as dt
import enum
import itertools
import json
import logging
import os
import random
import re
import threading
import uuid
import weakref
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any, Final, Protocol, TypeVar, overload
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import orjson
import pydantic

from kaiju_tasks import conditions, errors, models, redact
from kaiju_tasks.rpc import protocol

logger = logging.getLogger(__name__)

URL_ENV: Final = "KAIJU_TASKS_URL"
"""Environment variable read for the server's URL when ``url`` is not given."""
TOKEN_ENV: Final = "KAIJU_TASKS_TOKEN"
"""Environment variable read for the bearer token when ``token`` is not given."""
DEFAULT_URL: Final = "http://127.0.0.1:8080"
"""Where ``kaiju-tasks server`` and ``run`` listen by default."""
RPC_PATH: Final = "/public/rpc"
"""The JSON-RPC endpoint, appended to the URL unless the URL already ends with it."""
DEFAULT_TIMEOUT: Final = 40.0
"""Seconds one call may take, retries included: more than the server's default
``request_timeout`` (30 s), so that the server's own timeout error arrives first."""
DEFAULT_RETRIES: Final = 3
"""How many times a call of :data:`RETRIED` is sent again after a connection failure."""
DEFAULT_BACKOFF: Final = 0.5
"""Seconds before the first retry; doubled for each next one (with jitter), at most
:data:`MAX_BACKOFF`."""
MAX_BACKOFF: Final = 4.0
"""Longest pause between two attempts (seconds)."""
KEEPALIVE: Final = 5.0
"""Seconds an idle connection is kept for the next call: under the server's ``header_timeout``
(10 s by default), after which the server closes idle connections itself."""
DEFAULT_LIMIT: Final = 100
"""The default page size of ``list`` (as in the services)."""

RETRIED: Final = frozenset(
    {"tasks.get", "tasks.exists", "tasks.list", "notifications.get", "notifications.list"}
)
"""The methods sent again after a connection failure: they change nothing, so a call that the
server ran before the connection broke can safely run twice. Every other method is sent once."""
RETRY_STATUSES: Final = frozenset({502, 503, 504})
"""HTTP statuses of a proxy in front of a server that is down, retried like connection failures
(when the body is not a JSON-RPC reply)."""

# A run of digits that may be an integer beyond 64 bits, which orjson would read as a float.
_LONG_NUMBER: Final = re.compile(rb"[0-9]{19}")
_TOKEN_CHARS: Final = re.compile(r"[!-~]+")  # visible ASCII: what a header value may carry

Columns = str | Sequence[str] | None
"""``columns`` of the read methods: None or ``"*"`` (all), a column name, or a list of them."""
TaskData = models.Task | Mapping[str, Any]
"""One task to create: a :class:`~kaiju_tasks.models.Task` or a dict of its fields."""
T = TypeVar("T")


# -- errors ------------------------------------------------------------------------------------


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


class _Failed(Exception):
    """One attempt failed at the transport level; ``error`` is what the caller gets."""

    def __init__(self, error: errors.Unreachable, *, retryable: bool) -> None:
        super().__init__(error.message)
        self.error = error
        self.retryable = retryable


# -- JSON --------------------------------------------------------------------------------------


def _model_json(model: pydantic.BaseModel) -> Any:
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
        return _model_json(value)
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


def _encode(body: Any) -> bytes:
    try:
        return orjson.dumps(body, default=_default)
    except TypeError:  # an integer beyond 64 bits, or nesting deeper than orjson's limit
        return json.dumps(body, default=_default, separators=(",", ":")).encode()


def _decode(raw: bytes) -> Any:
    if _LONG_NUMBER.search(raw):  # maybe an integer orjson would turn into a float
        return json.loads(raw)
    return orjson.loads(raw)


def _request_body(method: str, params: dict[str, Any], request_id: int) -> bytes:
    """The request as JSON; a param that is not JSON is refused like the services refuse it."""
    body = protocol.request(method, params, request_id)
    try:
        return _encode(body)
    except (TypeError, ValueError, RecursionError) as exc:
        field = None
        for name, value in params.items():
            try:
                _encode(value)
            except (TypeError, ValueError, RecursionError):
                field = name
                break
        raise errors.ValidationError(f"not JSON: {exc}", field=field) from None


# -- configuration -----------------------------------------------------------------------------


def _endpoint(url: str, source: str) -> str:
    """The JSON-RPC endpoint of ``url``: the URL itself if it ends with ``/public/rpc``."""
    shown = redact.url(url)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        raise errors.ConfigError(f"{source}: {shown!r} is not a URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise errors.ConfigError(
            f"{source} must be an http(s) URL such as {DEFAULT_URL}, got {shown!r}"
        )
    if parts.username is not None or parts.password is not None:
        raise errors.ConfigError(
            f"{source}: {shown!r} holds a user or password; give the token as token= or "
            f"{TOKEN_ENV} instead"
        )
    if parts.query or parts.fragment:
        raise errors.ConfigError(f"{source}: {shown!r} has a query or fragment; remove it")
    path = parts.path.rstrip("/")
    if not path.endswith(RPC_PATH):
        path += RPC_PATH
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def _token(token: str | None, source: str) -> str | None:
    if token is None:
        return None
    token = token.strip()
    if not token:
        return None
    if _TOKEN_CHARS.fullmatch(token) is None:
        # Never quote the token: only say where it came from.
        raise errors.ConfigError(
            f"the token from {source} holds characters an HTTP header cannot carry"
        )
    return token


# -- the asyncio client ------------------------------------------------------------------------


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
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        backoff: float = DEFAULT_BACKOFF,
    ) -> None:
        if url is None:
            url = os.environ.get(URL_ENV) or DEFAULT_URL
            url_source = URL_ENV if os.environ.get(URL_ENV) else "the default URL"
        else:
            url_source = "url"
        token_source = "token=" if token is not None else TOKEN_ENV
        if token is None:
            token = os.environ.get(TOKEN_ENV)
        if not timeout > 0:
            raise errors.ConfigError(f"timeout must be > 0, got {timeout!r}")
        if retries < 0 or backoff < 0:
            raise errors.ConfigError("retries and backoff must be >= 0")
        self.endpoint: Final = _endpoint(url, url_source)
        """The JSON-RPC URL the calls are posted to."""
        self.timeout: Final = float(timeout)
        self.retries: Final = int(retries)
        self.backoff: Final = float(backoff)
        self._token = _token(token, token_source)
        self._shown = redact.url(self.endpoint)
        self._ids = itertools.count(1)
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self.tasks: Final = Tasks(self)
        """The methods of TaskService: ``create``, ``get``, ``exists``, ``list``, ``update``,
        ``delete``, ``reset``, ``copy``, ``write_message``, ``cancel``."""
        self.notifications: Final = Notifications(self)
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
                connector=aiohttp.TCPConnector(keepalive_timeout=KEEPALIVE),
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
        body = _request_body(method, params, request_id)
        retried = method in RETRIED
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
                    pause = min(self.backoff * 2 ** (attempt - 1), MAX_BACKOFF)
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
        reply = self._reply(raw)
        if reply is None:
            if status in RETRY_STATUSES:
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
            raised = error_for(method, refusal if isinstance(refusal, dict) else {})
            if isinstance(raised, errors.RateLimited) and raised.retry_after is None:
                with contextlib.suppress(ValueError):
                    raised.retry_after = float(retry_after) if retry_after else None
            if isinstance(raised, errors.NotAuthorized) and not self._token:
                raised.message = f"{raised.message} (no token: give token= or set {TOKEN_ENV})"
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

    @staticmethod
    def _reply(raw: bytes) -> dict[str, Any] | None:
        """The JSON-RPC reply object in ``raw``, or None when there is none."""
        try:
            reply = _decode(raw)
        except (ValueError, RecursionError):
            return None
        if not isinstance(reply, dict) or reply.get("jsonrpc") != "2.0":
            return None
        if "error" not in reply and "result" not in reply:
            return None
        return reply


def _columns(params: dict[str, Any], columns: Columns) -> dict[str, Any]:
    if columns is not None:
        params["columns"] = columns if isinstance(columns, str) else builtins.list(columns)
    return params


def _task_json(item: Any) -> Any:
    return _model_json(item) if isinstance(item, models.Task) else item


def _dict(value: Any, method: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise errors.Unreachable(f"{method}: the reply is {type(value).__name__}, not an object")
    return value


class Tasks:
    """``client.tasks``: the methods of :class:`~kaiju_tasks.service.TaskService` over HTTP.

    Each has the Python method's params and result, and raises what it raises (see
    :func:`error_for`); ``docs/guide.md`` explains what they do.
    """

    def __init__(self, client: TasksClient) -> None:
        self._client = client

    @overload
    async def create(self, data: TaskData, *, columns: Columns = None) -> dict[str, Any]: ...

    @overload
    async def create(
        self, data: Sequence[TaskData], *, columns: Columns = None
    ) -> builtins.list[dict[str, Any]]: ...

    async def create(
        self, data: TaskData | Sequence[TaskData], *, columns: Columns = None
    ) -> dict[str, Any] | builtins.list[dict[str, Any]]:
        """Create one task, or many in one transaction when ``data`` is a list.

        ``data`` holds :class:`~kaiju_tasks.models.Task` models or dicts. Sent once, never
        retried. Returns the created task(s) as dicts of ``columns``.
        """
        return await self._create(data, columns)

    async def _create(
        self, data: TaskData | Sequence[TaskData], columns: Columns
    ) -> dict[str, Any] | builtins.list[dict[str, Any]]:
        many = isinstance(data, Sequence) and not isinstance(data, str | bytes)
        payload = [_task_json(item) for item in data] if many else _task_json(data)
        result = await self._client.call("tasks.create", _columns({"data": payload}, columns))
        if many:
            if not isinstance(result, builtins.list):
                raise errors.Unreachable("tasks.create: the reply is not a list")
            return [_dict(row, "tasks.create") for row in result]
        return _dict(result, "tasks.create")

    async def get(self, id: str, columns: Columns = None) -> dict[str, Any]:
        """Return a task as a dict of ``columns`` (default: all); raise TaskNotFound."""
        return _dict(
            await self._client.call("tasks.get", _columns({"id": id}, columns)), "tasks.get"
        )

    async def exists(self, id: str) -> bool:
        """Return whether a task the caller may see exists."""
        return bool(await self._client.call("tasks.exists", {"id": id}))

    async def list(
        self,
        conditions: Any = None,
        sort: Any = None,
        offset: int = 0,
        limit: int = DEFAULT_LIMIT,
        count: bool = True,
        columns: Columns = None,
    ) -> dict[str, Any]:
        """Return a page of tasks: ``{count, offset, page, pages, on_page, data}``."""
        params: dict[str, Any] = {"offset": offset, "limit": limit, "count": count}
        if conditions is not None:
            params["conditions"] = conditions
        if sort is not None:
            params["sort"] = sort
        return _dict(await self._client.call("tasks.list", _columns(params, columns)), "tasks.list")

    async def update(
        self,
        id: str,
        data: models.TaskUpdate | Mapping[str, Any],
        *,
        columns: Columns = None,
    ) -> dict[str, Any]:
        """Change the fields a user may change (a dict or a TaskUpdate); return the task."""
        params = _columns({"id": id, "data": data}, columns)
        return _dict(await self._client.call("tasks.update", params), "tasks.update")

    async def delete(self, id: str) -> None:
        """Delete a task that is not running."""
        await self._client.call("tasks.delete", {"id": id})

    async def reset(self, id: str) -> dict[str, Any]:
        """Return a task to its initial state and queue it again with a new ``job_id``."""
        return _dict(await self._client.call("tasks.reset", {"id": id}), "tasks.reset")

    async def copy(
        self,
        id: str,
        app_name: str | None = None,
        *,
        app: str | None = None,
        columns: Columns = None,
    ) -> dict[str, Any]:
        """Create a new task that runs what task ``id`` runs, for ``app_name`` (or ``app``)."""
        params: dict[str, Any] = {"id": id}
        if app_name is not None:
            params["app_name"] = app_name
        if app is not None:
            params["app"] = app
        return _dict(await self._client.call("tasks.copy", _columns(params, columns)), "tasks.copy")

    async def write_message(self, id: str, data: Any = None) -> dict[str, Any]:
        """Deliver ``data`` to a task waiting on a Message stage; return the task."""
        params = {"id": id, "data": data}
        return _dict(await self._client.call("tasks.write_message", params), "tasks.write_message")

    async def cancel(self, id: str) -> dict[str, Any]:
        """Abort a task that has not ended (FAILED, exit code 130); return it."""
        return _dict(await self._client.call("tasks.cancel", {"id": id}), "tasks.cancel")


class Notifications:
    """``client.notifications``: the methods of NotificationService over HTTP.

    See :class:`~kaiju_tasks.service.NotificationService` and :class:`Tasks`.
    """

    def __init__(self, client: TasksClient) -> None:
        self._client = client

    async def get(self, id: int, columns: Columns = None) -> dict[str, Any]:
        """Return one notification; raise NotificationNotFound."""
        params = _columns({"id": id}, columns)
        return _dict(await self._client.call("notifications.get", params), "notifications.get")

    async def list(
        self,
        conditions: Any = None,
        sort: Any = None,
        offset: int = 0,
        limit: int = DEFAULT_LIMIT,
        count: bool = True,
        columns: Columns = None,
    ) -> dict[str, Any]:
        """Return a page of notifications, filtered like ``tasks.list``."""
        params: dict[str, Any] = {"offset": offset, "limit": limit, "count": count}
        if conditions is not None:
            params["conditions"] = conditions
        if sort is not None:
            params["sort"] = sort
        params = _columns(params, columns)
        return _dict(await self._client.call("notifications.list", params), "notifications.list")

    async def update(
        self, id: int, data: models.NotificationUpdate | Mapping[str, Any]
    ) -> dict[str, Any]:
        """Mark a notification read (``{"read": True}``) or unread; return it."""
        params = {"id": id, "data": data}
        return _dict(
            await self._client.call("notifications.update", params), "notifications.update"
        )

    async def delete(self, id: int) -> None:
        """Delete a notification."""
        await self._client.call("notifications.delete", {"id": id})


# -- the blocking client -----------------------------------------------------------------------


def _serve(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


def _shutdown(
    loop: asyncio.AbstractEventLoop, thread: threading.Thread, client: TasksClient, pid: int
) -> None:
    """Close the client in its loop, stop the loop and its thread (not in a forked child)."""
    if os.getpid() != pid or loop.is_closed() or not thread.is_alive():
        return
    closing = asyncio.run_coroutine_threadsafe(client.close(), loop)
    with contextlib.suppress(Exception):
        closing.result(timeout=5)
    loop.call_soon_threadsafe(loop.stop)
    if thread is not threading.current_thread():
        thread.join(timeout=5)


class SyncTasksClient:
    """A blocking :class:`TasksClient`, for scripts, Django views and other code without a loop.

    Same arguments, same ``tasks`` and ``notifications`` methods (not coroutines), same results
    and exceptions. It runs one private event loop in a daemon thread (started on the first call,
    and again in a process forked after it), where one :class:`TasksClient` makes every call;
    the calling thread blocks until the result arrives. So it works:

    - in a thread that has no event loop (a script, a WSGI worker thread);
    - in a thread whose event loop is running (the call blocks that loop while it waits; in
      asyncio code use :class:`TasksClient` instead);
    - from many threads at once: share one instance (e.g. module level in a Django app).

    Call :meth:`close` (or use ``with SyncTasksClient() as client:``) to stop the thread; one
    left open is closed when it is garbage-collected or at interpreter exit.
    """

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        backoff: float = DEFAULT_BACKOFF,
    ) -> None:
        self._client = TasksClient(url, token, timeout=timeout, retries=retries, backoff=backoff)
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._stop: weakref.finalize[Any, SyncTasksClient] | None = None
        self._closed = False
        self.endpoint: Final = self._client.endpoint
        """The JSON-RPC URL the calls are posted to."""
        self.tasks: Final = SyncTasks(self._run)
        """The methods of TaskService, blocking."""
        self.notifications: Final = SyncNotifications(self._run)
        """The methods of NotificationService, blocking."""

    def __repr__(self) -> str:
        return repr(self._client).replace(type(self._client).__name__, type(self).__name__, 1)

    def __enter__(self) -> SyncTasksClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the session and stop the private thread; later calls raise RuntimeError."""
        with self._lock:
            self._closed = True
            stop, self._stop = self._stop, None
        if stop is not None:
            stop()

    def _started(self) -> tuple[asyncio.AbstractEventLoop, TasksClient]:
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{type(self).__name__} is closed")
            pid = os.getpid()
            if self._loop is None or self._pid != pid:
                if self._stop is not None:  # forked: the parent's thread does not exist here
                    self._stop.detach()
                    self._client = self._client._copy()
                loop = asyncio.new_event_loop()
                thread = threading.Thread(
                    target=_serve, args=(loop,), name="kaiju-tasks-client", daemon=True
                )
                thread.start()
                self._loop, self._thread, self._pid = loop, thread, pid
                self._stop = weakref.finalize(self, _shutdown, loop, thread, self._client, pid)
            return self._loop, self._client

    def _run(self, call: Callable[[TasksClient], Coroutine[Any, Any, T]]) -> T:
        loop, client = self._started()
        if threading.current_thread() is self._thread:
            raise RuntimeError(f"{type(self).__name__} called from its own event loop")

        async def run() -> T:
            return await call(client)

        future = asyncio.run_coroutine_threadsafe(run(), loop)
        try:
            return future.result()
        except BaseException:  # e.g. KeyboardInterrupt while waiting: abandon the call
            future.cancel()
            raise


class _Runner(Protocol):
    """Runs a call of the async client in the private loop and returns its result."""

    def __call__(self, call: Callable[[TasksClient], Coroutine[Any, Any, T]]) -> T: ...


class SyncTasks:
    """``sync_client.tasks``: :class:`Tasks`, blocking."""

    def __init__(self, run: _Runner) -> None:
        self._run = run

    @overload
    def create(self, data: TaskData, *, columns: Columns = None) -> dict[str, Any]: ...

    @overload
    def create(
        self, data: Sequence[TaskData], *, columns: Columns = None
    ) -> builtins.list[dict[str, Any]]: ...

    def create(
        self, data: TaskData | Sequence[TaskData], *, columns: Columns = None
    ) -> dict[str, Any] | builtins.list[dict[str, Any]]:
        """Create one task, or many in one transaction when ``data`` is a list (never retried)."""
        return self._run(lambda c: c.tasks._create(data, columns))

    def get(self, id: str, columns: Columns = None) -> dict[str, Any]:
        """Return a task as a dict of ``columns`` (default: all); raise TaskNotFound."""
        return self._run(lambda c: c.tasks.get(id, columns))

    def exists(self, id: str) -> bool:
        """Return whether a task the caller may see exists."""
        return self._run(lambda c: c.tasks.exists(id))

    def list(
        self,
        conditions: Any = None,
        sort: Any = None,
        offset: int = 0,
        limit: int = DEFAULT_LIMIT,
        count: bool = True,
        columns: Columns = None,
    ) -> dict[str, Any]:
        """Return a page of tasks: ``{count, offset, page, pages, on_page, data}``."""
        return self._run(lambda c: c.tasks.list(conditions, sort, offset, limit, count, columns))

    def update(
        self,
        id: str,
        data: models.TaskUpdate | Mapping[str, Any],
        *,
        columns: Columns = None,
    ) -> dict[str, Any]:
        """Change the fields a user may change (a dict or a TaskUpdate); return the task."""
        return self._run(lambda c: c.tasks.update(id, data, columns=columns))

    def delete(self, id: str) -> None:
        """Delete a task that is not running."""
        self._run(lambda c: c.tasks.delete(id))

    def reset(self, id: str) -> dict[str, Any]:
        """Return a task to its initial state and queue it again with a new ``job_id``."""
        return self._run(lambda c: c.tasks.reset(id))

    def copy(
        self,
        id: str,
        app_name: str | None = None,
        *,
        app: str | None = None,
        columns: Columns = None,
    ) -> dict[str, Any]:
        """Create a new task that runs what task ``id`` runs, for ``app_name`` (or ``app``)."""
        return self._run(lambda c: c.tasks.copy(id, app_name, app=app, columns=columns))

    def write_message(self, id: str, data: Any = None) -> dict[str, Any]:
        """Deliver ``data`` to a task waiting on a Message stage; return the task."""
        return self._run(lambda c: c.tasks.write_message(id, data))

    def cancel(self, id: str) -> dict[str, Any]:
        """Abort a task that has not ended (FAILED, exit code 130); return it."""
        return self._run(lambda c: c.tasks.cancel(id))


class SyncNotifications:
    """``sync_client.notifications``: :class:`Notifications`, blocking."""

    def __init__(self, run: _Runner) -> None:
        self._run = run

    def get(self, id: int, columns: Columns = None) -> dict[str, Any]:
        """Return one notification; raise NotificationNotFound."""
        return self._run(lambda c: c.notifications.get(id, columns))

    def list(
        self,
        conditions: Any = None,
        sort: Any = None,
        offset: int = 0,
        limit: int = DEFAULT_LIMIT,
        count: bool = True,
        columns: Columns = None,
    ) -> dict[str, Any]:
        """Return a page of notifications, filtered like ``tasks.list``."""
        return self._run(
            lambda c: c.notifications.list(conditions, sort, offset, limit, count, columns)
        )

    def update(
        self, id: int, data: models.NotificationUpdate | Mapping[str, Any]
    ) -> dict[str, Any]:
        """Mark a notification read (``{"read": True}``) or unread; return it."""
        return self._run(lambda c: c.notifications.update(id, data))

    def delete(self, id: int) -> None:
        """Delete a notification."""
        self._run(lambda c: c.notifications.delete(id))
