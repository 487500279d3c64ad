"""The aiohttp app exposing TaskService and NotificationService over JSON-RPC 2.0.

``POST /public/rpc`` takes single calls, batches and notifications (calls without an id get no
reply). Callers authenticate with ``Authorization: Bearer <token>``. Every error is a JSON-RPC
error from one table; anything unexpected is logged (a bounded line, a traceback at most once a
minute per method) and answered with -32603 and a generic message. ``GET /health`` reports
whether the database answers; ``GET /public/rpc/openrpc.json`` describes every method.

What a client can make the server spend is bounded here: the time to send a request head
(``header_timeout``) and a body (``body_timeout``), the body size, the batch length, the time of
each call, the size of the reply (``limits.reply_bytes``, a batch included) and the failed
authentications per client address (``auth_failures`` per ``auth_window``, HTTP 429 beyond).
Serve the app with :func:`runner`, which applies the header timeout.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import dataclasses
import inspect
import ipaddress
import json
import logging
import math
import re
import time
import traceback
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Final

import orjson
from aiohttp import web

from kaiju_tasks import errors, limits, methods, models, templates, tracing
from kaiju_tasks.rpc import protocol
from kaiju_tasks.service import NotificationService, TaskService, TokenService

logger = logging.getLogger(__name__)

DEFAULT_MAX_BODY = 1024 * 1024  # bytes
DEFAULT_MAX_BATCH = 100  # calls per batch
DEFAULT_REQUEST_TIMEOUT = 30.0  # seconds per call
DEFAULT_HEADER_TIMEOUT = 10.0  # seconds to deliver a request head
DEFAULT_BODY_TIMEOUT = 30.0  # seconds to deliver a request body
DEFAULT_AUTH_FAILURES = 20  # failed authentications per address per window
DEFAULT_AUTH_WINDOW = 60.0  # seconds
DEFAULT_AUTH_CLIENTS = 10_000  # addresses tracked at once
LINGER_TIME: Final = 2.0
"""Most seconds the rest of a refused body is read and dropped before the connection closes."""
TRACEBACK_EVERY: Final = 60.0
"""Seconds between two logged tracebacks of the same method."""
LOG_MESSAGE_CHARS: Final = 500
"""Longest exception text copied into the log line of an internal error."""
TRACEBACK_FRAMES: Final = 20
"""Innermost frames of a logged traceback."""
TRACEBACK_CHARS: Final = 8000
"""Longest logged traceback."""

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

ERROR_CODES: tuple[tuple[type[Exception], int], ...] = (
    (errors.ValidationError, protocol.INVALID_PARAMS),
    (errors.NotAuthorized, protocol.NOT_AUTHORIZED),
    (errors.TaskNotFound, protocol.NOT_FOUND),
    (errors.NotificationNotFound, protocol.NOT_FOUND),
    (errors.Conflict, protocol.CONFLICT),
    (errors.InvalidTransition, protocol.CONFLICT),
)
"""Error class -> JSON-RPC code; the first match wins. Everything else is -32603."""


@dataclasses.dataclass(frozen=True, slots=True)
class Api:
    """What the server calls, and the bounds it applies (``[server]``).

    ``on_auth_refused`` is called with ``"invalid"`` for each failed authentication and with
    ``"rate_limited"`` for each request refused with HTTP 429 (e.g. a Prometheus counter).
    """

    tasks: TaskService
    notifications: NotificationService
    tokens: TokenService
    methods: methods.Methods
    health: Callable[[], Awaitable[dict[str, Any]]]
    metrics: Callable[[], Awaitable[bytes]] | None = None
    max_body: int = DEFAULT_MAX_BODY
    max_batch: int = DEFAULT_MAX_BATCH
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT
    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    body_timeout: float = DEFAULT_BODY_TIMEOUT
    auth_failures: int = DEFAULT_AUTH_FAILURES
    auth_window: float = DEFAULT_AUTH_WINDOW
    auth_clients: int = DEFAULT_AUTH_CLIENTS
    trusted_proxies: Sequence[Network] = ()
    on_auth_refused: Callable[[str], None] | None = None


API_KEY = web.AppKey("api", Api)

SERVICE_METHODS: dict[str, tuple[str, str]] = {
    "tasks.create": ("tasks", "create"),
    "tasks.get": ("tasks", "get"),
    "tasks.exists": ("tasks", "exists"),
    "tasks.list": ("tasks", "list"),
    "tasks.update": ("tasks", "update"),
    "tasks.delete": ("tasks", "delete"),
    "tasks.reset": ("tasks", "reset"),
    "tasks.copy": ("tasks", "copy"),
    "tasks.write_message": ("tasks", "write_message"),
    "tasks.cancel": ("tasks", "cancel"),
    "notifications.get": ("notifications", "get"),
    "notifications.list": ("notifications", "list"),
    "notifications.update": ("notifications", "update"),
    "notifications.delete": ("notifications", "delete"),
}
"""JSON-RPC method -> (service, method). Params are named and mirror the Python methods."""


class _RpcError(Exception):
    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data


# -- failed authentications ------------------------------------------------------------------


class AuthLimiter:
    """Failed authentications per client address: a token bucket each, in a bounded table.

    Each address may fail ``failures`` times at once, and earns one more try every
    ``window / failures`` seconds. At most ``clients`` addresses are tracked; beyond, the one
    that failed least recently is forgotten. Addresses that never fail take no room.
    """

    def __init__(
        self,
        failures: int,
        window: float,
        clients: int,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failures = failures
        self.rate = failures / window  # tries earned per second
        self.clients = clients
        self._now = now
        self._buckets: collections.OrderedDict[str, tuple[float, float]] = collections.OrderedDict()

    def _tokens(self, address: str) -> float:
        tokens, at = self._buckets.get(address, (float(self.failures), self._now()))
        return min(float(self.failures), tokens + (self._now() - at) * self.rate)

    def retry_after(self, address: str) -> float:
        """Seconds until ``address`` may try again (0: now)."""
        if address not in self._buckets:
            return 0.0
        tokens = self._tokens(address)
        return 0.0 if tokens >= 1 else (1 - tokens) / self.rate

    def failed(self, address: str) -> None:
        """Count one failed authentication of ``address``."""
        tokens = max(0.0, self._tokens(address) - 1)
        self._buckets[address] = (tokens, self._now())
        self._buckets.move_to_end(address)
        while len(self._buckets) > self.clients:
            self._buckets.popitem(last=False)

    def __len__(self) -> int:
        return len(self._buckets)


LIMITER_KEY = web.AppKey("auth_limiter", AuthLimiter)
_CLIENT: contextvars.ContextVar[str] = contextvars.ContextVar("kaiju_tasks_client", default="")


class CountedTokens(TokenService):
    """A TokenService whose failed authentications count against the caller's address.

    The server and the dashboard authenticate through it, so one budget covers both.
    """

    def __init__(self, inner: TokenService, limiter: AuthLimiter, api: Api) -> None:
        super().__init__(inner.store, inner.clock)
        self._limiter = limiter
        self._api = api

    async def authenticate(self, token: str | None) -> models.Caller:
        """Return the caller of ``token``; count a failure against the current address."""
        try:
            return await super().authenticate(token)
        except errors.NotAuthorized:
            self._limiter.failed(_CLIENT.get())
            if self._api.on_auth_refused is not None:
                self._api.on_auth_refused("invalid")
            raise


TOKENS_KEY = web.AppKey("counted_tokens", CountedTokens)


def client_address(request: web.Request, trusted: Sequence[Network]) -> str:
    """The address the request comes from.

    ``X-Forwarded-For`` is read only when the peer is a trusted proxy: its addresses are walked
    from the right, skipping trusted proxies, and the first other one is the client.
    """
    peer = request.remote or ""
    if not trusted or not _is_trusted(peer, trusted):
        return peer
    hops = [h.strip() for h in ",".join(request.headers.getall("X-Forwarded-For", [])).split(",")]
    for hop in reversed([h for h in hops if h]):
        if not _is_trusted(hop, trusted):
            try:
                return str(ipaddress.ip_address(hop))
            except ValueError:
                return hop[:64]  # not an address: whatever the proxy wrote, bounded
    return peer


def _is_trusted(address: str, trusted: Sequence[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in trusted)


# -- the app -----------------------------------------------------------------------------------


def create_app(api: Api) -> web.Application:
    """Build the aiohttp application (serve it with :func:`runner`)."""
    app = web.Application(client_max_size=api.max_body, middlewares=[_guard])
    app[API_KEY] = api
    limiter = AuthLimiter(api.auth_failures, api.auth_window, api.auth_clients)
    app[LIMITER_KEY] = limiter
    app[TOKENS_KEY] = CountedTokens(api.tokens, limiter, api)
    app.router.add_post("/public/rpc", _rpc)
    app.router.add_get("/public/rpc/openrpc.json", _openrpc)
    app.router.add_get("/health", _health)
    app.router.add_get("/metrics", _metrics)
    return app


def counted_tokens(app: web.Application) -> TokenService:
    """The token service to give the dashboard: its failures count against the address too."""
    return app[TOKENS_KEY]


def runner(app: web.Application) -> web.AppRunner:
    """An AppRunner for ``app`` that closes connections slow to send a request head.

    A connection must deliver a complete request head within ``header_timeout`` seconds of
    connecting or of its previous response, else it is closed; an idle keep-alive connection is
    closed after the same time. (aiohttp's keep-alive timer, armed at connect and after each
    response, closes a connection still waiting for a complete head.)
    """
    api = app[API_KEY]
    return web.AppRunner(
        app,
        access_log=None,
        keepalive_timeout=api.header_timeout,
        # After a refused body (408, 413), read what the client still sends this long at most,
        # so it can see the reply, then close.
        lingering_time=min(LINGER_TIME, api.body_timeout),
    )


_UNGUARDED: Final = frozenset({"/health", "/metrics", "/public/rpc/openrpc.json"})


@web.middleware
async def _guard(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Refuse addresses over their failed-authentication budget; read bodies within a bound."""
    api = request.app[API_KEY]
    address = client_address(request, api.trusted_proxies)
    _CLIENT.set(address)
    rpc = request.path == "/public/rpc"
    if request.path not in _UNGUARDED:
        wait = request.app[LIMITER_KEY].retry_after(address)
        if wait > 0:
            if api.on_auth_refused is not None:
                api.on_auth_refused("rate_limited")
            seconds = max(1, math.ceil(wait))
            message = f"too many failed authentications from this address; retry in {seconds} s"
            headers = {"Retry-After": str(seconds)}
            if rpc:
                error = protocol.error(protocol.RATE_LIMITED, message, {"retry_after": seconds})
                return _json(_reply(None, error=error), status=429, headers=headers)
            return web.Response(status=429, text=message, headers=headers)
    if request.body_exists and not request.content_type.startswith("multipart/"):
        try:
            async with asyncio.timeout(api.body_timeout):
                await request.read()  # kept by aiohttp: the handler's read() returns it
        except TimeoutError:
            message = f"request body not received within body_timeout ({api.body_timeout:g} s)"
            response: web.Response
            if rpc:
                error = protocol.error(protocol.INVALID_REQUEST, message)
                response = _json(_reply(None, error=error), status=408)
            else:
                response = web.Response(status=408, text=message)
            response.force_close()
            return response
        except web.HTTPRequestEntityTooLarge:
            if not rpc:
                raise
            error = protocol.error(
                protocol.INVALID_REQUEST, f"request body larger than {api.max_body} bytes"
            )
            return _json(_reply(None, error=error), status=413)
    return await handler(request)


def _reply(
    request_id: Any, *, result: Any = None, error: dict[str, Any] | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id}
    if error is not None:
        body["error"] = error
    else:
        body["result"] = result
    return body


def _json(body: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(
        body=_encode(body),
        status=status,
        content_type="application/json",
        charset="utf-8",
        headers=headers,
    )


def _encode(value: Any) -> bytes:
    """JSON bytes of ``value``.

    What orjson cannot encode (integers over 64 bits, lone surrogates from an application
    method) goes through the standard library instead.
    """
    try:
        return orjson.dumps(value, default=str, option=orjson.OPT_NON_STR_KEYS)
    except (TypeError, orjson.JSONEncodeError):
        return json.dumps(value, default=str).encode()


# A JSON escape of a UTF-16 surrogate (\ud800-\udfff): only then can a string be invalid Unicode.
_SURROGATE_ESCAPE: Final = re.compile(rb"\\u[dD][89a-fA-F]")


async def _rpc(request: web.Request) -> web.Response:
    # A caller's W3C trace context (traceparent) is current while its calls run: a created
    # task stores it (see kaiju_tasks.tracing).
    with tracing.attached(request.headers):
        return await _rpc_calls(request)


async def _rpc_calls(request: web.Request) -> web.Response:
    api = request.app[API_KEY]
    raw = await request.read()  # read within body_timeout and max_body by _guard
    try:
        payload = json.loads(raw, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return _json(_reply(None, error=protocol.error(protocol.PARSE_ERROR, "parse error")))
    if b"\\u0000" in raw:  # PostgreSQL text and jsonb cannot hold NUL characters
        error = protocol.error(protocol.INVALID_PARAMS, "NUL characters (\\u0000) are not allowed")
        return _json(_reply(None, error=error))
    surrogates = _SURROGATE_ESCAPE.search(raw) is not None
    token = bearer_token(request)
    tokens = request.app[TOKENS_KEY]

    if isinstance(payload, list):
        if not payload:
            error = protocol.error(protocol.INVALID_REQUEST, "empty batch")
            return _json(_reply(None, error=error))
        if len(payload) > api.max_batch:
            error = protocol.error(
                protocol.INVALID_REQUEST, f"batch longer than {api.max_batch} calls"
            )
            return _json(_reply(None, error=error))
        caller = await _caller(tokens, token)
        reply = _Reply(limits.active().reply_bytes)
        # One after another, in array order: a later call sees what an earlier one did.
        for call in payload:
            if reply.full:
                reply.refuse(call)
                continue
            reply.add(call, await _call(api, call, caller, surrogates))
        return reply.response(batch=True)
    caller = await _caller(tokens, token)
    reply = _Reply(limits.active().reply_bytes)
    reply.add(payload, await _call(api, payload, caller, surrogates))
    return reply.response(batch=False)


class _Reply:
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
        return _reply(
            request_id if _valid_id(request_id) else None,
            error=protocol.error(protocol.REPLY_TOO_LARGE, message, data),
        )

    def add(self, call: Any, reply: dict[str, Any] | None) -> None:
        if reply is None:
            return
        encoded = _encode(reply)
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
            self.parts.append(_encode(error))  # small: not counted against the limit

    def response(self, *, batch: bool) -> web.Response:
        if not self.parts:
            return web.Response(status=204)
        body = b"[" + b",".join(self.parts) + b"]" if batch else self.parts[0]
        return web.Response(body=body, content_type="application/json", charset="utf-8")


def bearer_token(request: web.Request) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    header = request.headers.get("Authorization", "")
    return header[7:].strip() if header[:7].lower() == "bearer " else None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


async def _caller(tokens: TokenService, token: str | None) -> models.Caller | errors.NotAuthorized:
    try:
        return await tokens.authenticate(token)
    except errors.NotAuthorized as exc:
        return exc


def _valid_id(request_id: Any) -> bool:
    return isinstance(request_id, str | int | type(None)) and not isinstance(request_id, bool)


def _invalid(call: Any) -> tuple[str, str | None] | None:
    """What is wrong with the shape of a request: (message, field), or None."""
    if not isinstance(call, dict):
        return "a request must be a JSON object", None
    if call.get("jsonrpc") != "2.0":
        return 'jsonrpc must be "2.0"', "jsonrpc"
    if not isinstance(call.get("method"), str):
        return "method must be a string", "method"
    if not _valid_id(call.get("id")):
        return "id must be a string, an integer or null", "id"
    if "params" in call and not isinstance(call["params"], dict | list):
        return "params must be an object or an array", "params"
    return None


def _bad_unicode(value: Any) -> str | None:
    """The dotted path of the first string (key or value) that is not valid Unicode, or None.

    Iterative, so any depth the JSON parser accepted is walked without recursion; each item
    keeps only a link to its parent, and the path is spelled out only for the bad string found,
    so the walk takes memory in proportion to the payload, however long its keys.
    """
    stack: list[tuple[Any, _Link]] = [(value, None)]
    while stack:
        item, link = stack.pop()
        if isinstance(item, str):
            if not _encodable(item):
                return _spelled(link)
        elif isinstance(item, dict):
            for key, child in item.items():
                if not _encodable(key):
                    return _spelled((link, key))
                stack.append((child, (link, key)))
        elif isinstance(item, list):
            stack.extend((child, (link, i)) for i, child in enumerate(item))
    return None


_Link = tuple[Any, str | int] | None
"""Where an item sits: ``(parent's link, key or index)``, None at the top."""


def _spelled(link: _Link) -> str:
    parts: list[str] = []
    while link is not None:
        link, key = link
        parts.append(_shown(key) if isinstance(key, str) else str(key))
    return ".".join(reversed(parts))


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _shown(key: str) -> str:
    """A key as it can be shown in a message: lone surrogates as backslash escapes."""
    return key.encode("utf-8", "backslashreplace").decode("utf-8")[:100]


async def _call(
    api: Api,
    call: Any,
    caller: models.Caller | errors.NotAuthorized,
    surrogates: bool = False,
) -> dict[str, Any] | None:
    """Run one call; None for a notification."""
    problem = _invalid(call)
    if problem is None and surrogates:
        where = _bad_unicode(call.get("method"))
        if where is not None:
            problem = ("method must be valid Unicode (no lone surrogate)", "method")
    if problem is not None:
        message, field = problem
        request_id = call.get("id") if isinstance(call, dict) else None
        return _reply(
            request_id if isinstance(request_id, str | int) and _valid_id(request_id) else None,
            error=protocol.error(
                protocol.INVALID_REQUEST, f"invalid request: {message}", {"field": field}
            ),
        )
    request_id = call.get("id")
    if surrogates and not _encodable(str(request_id)):
        return _reply(
            None,
            error=protocol.error(
                protocol.INVALID_REQUEST,
                "invalid request: id must be valid Unicode (no lone surrogate)",
                {"field": "id"},
            ),
        )
    notification = "id" not in call
    method = call["method"]
    deadline = asyncio.timeout(api.request_timeout)
    try:
        if isinstance(caller, errors.NotAuthorized):
            raise caller
        if surrogates:
            where = _bad_unicode(call.get("params"))
            if where is not None:
                raise errors.ValidationError(
                    f"{where or 'params'}: not valid Unicode: a lone surrogate "
                    "(\\ud800-\\udfff) is not a character",
                    field=where or None,
                )
        async with deadline:
            result = await _dispatch(api, method, call.get("params"), caller)
    except Exception as exc:  # noqa: BLE001 - the one place that turns errors into replies
        if isinstance(exc, TimeoutError) and deadline.expired():
            error = protocol.error(protocol.TIMEOUT, "request timed out")
        else:
            known = method in api.methods or method in SERVICE_METHODS
            error = _error(exc, method if known else "")
        return None if notification else _reply(request_id, error=error)
    return None if notification else _reply(request_id, result=result)


def _error(exc: Exception, method: str) -> dict[str, Any]:
    if isinstance(exc, _RpcError):
        return protocol.error(exc.code, exc.message, exc.data)
    if isinstance(exc, errors.StageRejected):  # an application method rejected its task
        return protocol.error(protocol.REJECTED, exc.message, {"requeue": exc.requeue})
    if isinstance(exc, errors.RemoteCallError):  # an application method's own error
        data = exc.remote_data
        if not exc.retryable:  # tell a calling executor not to retry
            data = (
                {**data, "retryable": False}
                if isinstance(data, dict)
                else ({"retryable": False} if data is None else data)
            )
        return protocol.error(exc.code, exc.message, data)
    for kind, code in ERROR_CODES:
        if isinstance(exc, kind):
            data = exc.data if isinstance(exc, errors.ValidationError) else None
            return protocol.error(
                code, exc.message if isinstance(exc, errors.KaijuTasksError) else str(exc), data
            )
    if isinstance(exc, RecursionError):  # only the shape of the input nests this deep
        logger.warning(
            "RPC params nested too deeply",
            extra={"event": "rpc_too_deep", "method": method or "(unknown)"},
        )
        return protocol.error(
            protocol.INVALID_PARAMS,
            "params nested too deeply",
            {"errors": [{"field": None, "message": "nested too deeply"}]},
        )
    _log_internal(exc, method or "(unknown)")
    return protocol.error(protocol.INTERNAL_ERROR, "internal error")


_LAST_TRACEBACK: dict[str, float] = {}


def _log_internal(exc: Exception, method: str) -> None:
    """One bounded line per internal error; a bounded traceback at most once a minute per method.

    ``method`` is a served method's name or ``(unknown)``, so the table stays bounded.
    """
    now = time.monotonic()
    last = _LAST_TRACEBACK.get(method)
    with_traceback = last is None or now - last >= TRACEBACK_EVERY
    if with_traceback:
        _LAST_TRACEBACK[method] = now
    text = _bounded(str(exc), LOG_MESSAGE_CHARS)
    stack = ""
    if with_traceback:  # the innermost frames, never the (unbounded) message again
        frames = traceback.format_tb(exc.__traceback__, limit=-TRACEBACK_FRAMES)
        stack = _bounded("\nTraceback (innermost frames):\n" + "".join(frames), TRACEBACK_CHARS)
    logger.error(
        "RPC method failed: %s: %s%s",
        type(exc).__name__,
        text,
        stack,
        extra={"event": "rpc_error", "method": method[:200]},
    )


def _bounded(text: str, most: int) -> str:
    return text if len(text) <= most else text[:most] + f"... ({len(text):,} characters)"


async def _dispatch(api: Api, method: str, params: Any, caller: models.Caller) -> Any:
    target = SERVICE_METHODS.get(method)
    if target is None:
        if method in api.methods:
            if not api.methods.allowed(method, caller):
                raise _RpcError(
                    protocol.NOT_AUTHORIZED,
                    f"not allowed to call {method!r}",
                    {"needs": api.methods.access(method).describe()},
                )
            return await api.methods.call(method, params)
        raise _RpcError(protocol.METHOD_NOT_FOUND, f"method {method[:200]!r} not found")
    service, name = target
    function = getattr(getattr(api, service), name)
    if isinstance(params, list):
        raise _RpcError(protocol.INVALID_PARAMS, "params are named (an object)")
    kwargs = dict(params or {})
    if "caller" in kwargs:
        raise errors.ValidationError("unknown parameter", field="caller")
    signature = _signature(function)
    for key in kwargs:
        if key not in signature.parameters:
            known = ", ".join(p for p in signature.parameters if p != "caller")
            raise errors.ValidationError(f"unknown parameter; known: {known}", field=key)
    for parameter in signature.parameters.values():
        if (
            parameter.default is inspect.Parameter.empty
            and parameter.name != "caller"
            and parameter.name not in kwargs
        ):
            raise errors.ValidationError("required parameter missing", field=parameter.name)
    with templates.parse_allowance():  # one request parses a bounded amount of templates
        return await function(**kwargs, caller=caller)


_SIGNATURES: dict[Any, inspect.Signature] = {}


def _signature(function: Any) -> inspect.Signature:
    key = getattr(function, "__func__", function)
    if key not in _SIGNATURES:
        _SIGNATURES[key] = inspect.signature(function)
    return _SIGNATURES[key]


async def _health(request: web.Request) -> web.Response:
    api = request.app[API_KEY]
    try:
        status = await api.health()
    except Exception as exc:  # noqa: BLE001 - health reports, never raises
        logger.warning("Health check failed", extra={"event": "health_failed", "error": str(exc)})
        return _json({"status": "unavailable", "database": False}, status=503)
    return _json(status, status=200 if status.get("database") else 503)


async def _metrics(request: web.Request) -> web.Response:
    api = request.app[API_KEY]
    if api.metrics is None:
        raise web.HTTPNotFound()
    body = await api.metrics()
    return web.Response(body=body, content_type="text/plain", charset="utf-8")


async def _openrpc(request: web.Request) -> web.Response:
    return _json(openrpc_document(request.app[API_KEY]))


def openrpc_document(api: Api) -> dict[str, Any]:
    """Describe every method: name, summary, named params (required or not), from the code."""
    described = []
    for name, (service, attribute) in SERVICE_METHODS.items():
        function = getattr(getattr(api, service), attribute)
        params = [
            {
                "name": p.name,
                "required": p.default is inspect.Parameter.empty,
                "schema": _schema_for(name, p.name),
            }
            for p in _signature(function).parameters.values()
            if p.name != "caller"
        ]
        summary = (inspect.getdoc(function) or "").split("\n", 1)[0]
        described.append(
            {
                "name": name,
                "summary": summary,
                "params": params,
                "result": {"name": "result", "schema": {}},
            }
        )
    for name in api.methods:
        described.append(
            {
                "name": name,
                "summary": "application method",
                "params": [],
                "x-access": api.methods.access(name).describe(),
                "result": {"name": "result", "schema": {}},
            }
        )
    return {
        "openrpc": "1.2.6",
        "info": {"title": "kaiju-tasks", "version": _version()},
        "servers": [{"name": "kaiju-tasks", "url": "/public/rpc"}],
        "methods": described,
        "components": {
            "schemas": {
                "Task": models.Task.model_json_schema(),
                "TaskUpdate": models.TaskUpdate.model_json_schema(),
            }
        },
        "x-errors": [{"code": code, "error": kind.__name__} for kind, code in ERROR_CODES]
        + [
            {"code": protocol.TIMEOUT, "error": "request timed out"},
            {"code": protocol.REPLY_TOO_LARGE, "error": "reply larger than reply_bytes"},
            {"code": protocol.RATE_LIMITED, "error": "too many failed authentications"},
            {"code": protocol.INTERNAL_ERROR, "error": "internal error"},
        ],
    }


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("kaiju-tasks")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def _schema_for(method: str, param: str) -> Mapping[str, Any]:
    if method == "tasks.create" and param == "data":
        ref = {"$ref": "#/components/schemas/Task"}
        return {"oneOf": [ref, {"type": "array", "items": ref}]}
    if method == "tasks.update" and param == "data":
        return {"$ref": "#/components/schemas/TaskUpdate"}
    if param in ("id",):
        return {"type": "integer"} if method.startswith("notifications.") else {"type": "string"}
    if param == "offset":
        return {"type": "integer", "minimum": 0}
    if param == "limit":
        return {"type": "integer", "minimum": 1, "maximum": 1000}
    if param == "count":
        return {"type": "boolean"}
    return {}
