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

This module holds the app, its bounds (:class:`Api`) and its HTTP handlers; the calls of a
request (parsing, batches, dispatch, the error table) are in :mod:`kaiju_tasks.rpc.calls`,
authentication and its failure budget in :mod:`kaiju_tasks.rpc.auth`, replies in
:mod:`kaiju_tasks.rpc.reply` and the OpenRPC document in :mod:`kaiju_tasks.rpc.openrpc`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

from aiohttp import web

from kaiju_tasks import defaults, methods, redact, tracing
from kaiju_tasks.rpc import auth, calls, openrpc, protocol, reply
from kaiju_tasks.service import NotificationService, TaskService, TokenService

logger = logging.getLogger(__name__)

DEFAULT_MAX_BODY = defaults.SERVER_MAX_BODY  # bytes
DEFAULT_MAX_BATCH = defaults.SERVER_MAX_BATCH  # calls per batch
DEFAULT_REQUEST_TIMEOUT = defaults.SERVER_REQUEST_TIMEOUT  # seconds per call
DEFAULT_HEADER_TIMEOUT = defaults.SERVER_HEADER_TIMEOUT  # seconds to deliver a request head
DEFAULT_BODY_TIMEOUT = defaults.SERVER_BODY_TIMEOUT  # seconds to deliver a request body
DEFAULT_AUTH_FAILURES = defaults.SERVER_AUTH_FAILURES  # per address per window
DEFAULT_AUTH_WINDOW = defaults.SERVER_AUTH_WINDOW  # seconds
DEFAULT_AUTH_CLIENTS = defaults.SERVER_AUTH_CLIENTS  # addresses tracked at once
LINGER_TIME: Final = 2.0
"""Most seconds the rest of a refused body is read and dropped before the connection closes."""

# What other modules and tests read from here, wherever it is defined.
AuthLimiter = auth.AuthLimiter
SERVICE_METHODS = calls.SERVICE_METHODS


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
    trusted_proxies: Sequence[auth.Network] = ()
    on_auth_refused: Callable[[str], None] | None = None


API_KEY = web.AppKey("api", Api)


# -- the app -----------------------------------------------------------------------------------


def create_app(api: Api) -> web.Application:
    """Build the aiohttp application (serve it with :func:`runner`)."""
    app = web.Application(client_max_size=api.max_body, middlewares=[_guard])
    app[API_KEY] = api
    limiter = auth.AuthLimiter(api.auth_failures, api.auth_window, api.auth_clients)
    app[auth.LIMITER_KEY] = limiter
    app[auth.TOKENS_KEY] = auth.CountedTokens(api.tokens, limiter, api)
    app.router.add_post("/public/rpc", _rpc)
    app.router.add_get("/public/rpc/openrpc.json", _openrpc)
    app.router.add_get("/health", _health)
    app.router.add_get("/metrics", _metrics)
    return app


def counted_tokens(app: web.Application) -> TokenService:
    """The token service to give the dashboard: its failures count against the address too."""
    return app[auth.TOKENS_KEY]


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
    address = auth.client_address(request, api.trusted_proxies)
    auth.CLIENT.set(address)
    rpc = request.path == "/public/rpc"
    if request.path not in _UNGUARDED:
        wait = request.app[auth.LIMITER_KEY].retry_after(address)
        if wait > 0:
            if api.on_auth_refused is not None:
                api.on_auth_refused("rate_limited")
            seconds = max(1, math.ceil(wait))
            message = f"too many failed authentications from this address; retry in {seconds} s"
            headers = {"Retry-After": str(seconds)}
            if rpc:
                error = protocol.error(protocol.RATE_LIMITED, message, {"retry_after": seconds})
                return reply.json_response(
                    reply.envelope(None, error=error), status=429, headers=headers
                )
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
                response = reply.json_response(reply.envelope(None, error=error), status=408)
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
            return reply.json_response(reply.envelope(None, error=error), status=413)
    return await handler(request)


async def _rpc(request: web.Request) -> web.Response:
    # A caller's W3C trace context (traceparent) is current while its calls run: a created
    # task stores it (see kaiju_tasks.tracing).
    with tracing.attached(request.headers):
        return await _rpc_calls(request)


async def _rpc_calls(request: web.Request) -> web.Response:
    api = request.app[API_KEY]
    raw = await request.read()  # read within body_timeout and max_body by _guard
    token = auth.bearer_token(request)
    return await calls.respond(
        api,
        raw,
        request.app[auth.TOKENS_KEY],
        token,
        correlation_id=request.headers.get(protocol.CORRELATION_HEADER),
    )


async def _health(request: web.Request) -> web.Response:
    api = request.app[API_KEY]
    try:
        status = await api.health()
    except Exception as exc:  # noqa: BLE001 - health reports, never raises
        logger.warning(
            "Health check failed",
            extra={"event": "health_failed", "error": redact.text(str(exc))},
        )
        return reply.json_response({"status": "unavailable", "database": False}, status=503)
    return reply.json_response(status, status=200 if status.get("database") else 503)


async def _metrics(request: web.Request) -> web.Response:
    api = request.app[API_KEY]
    if api.metrics is None:
        raise web.HTTPNotFound()
    body = await api.metrics()
    return web.Response(body=body, content_type="text/plain", charset="utf-8")


async def _openrpc(request: web.Request) -> web.Response:
    return reply.json_response(openrpc.openrpc_document(request.app[API_KEY]))
