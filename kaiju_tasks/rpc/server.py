"""The aiohttp app exposing TaskService and NotificationService over JSON-RPC 2.0.

``POST /public/rpc`` takes single calls, batches and notifications (calls without an id get no
reply). Callers authenticate with ``Authorization: Bearer <token>``. Every error is a JSON-RPC
error from one table; anything unexpected is logged with its traceback and answered with
-32603 and a generic message. ``GET /health`` reports whether the database answers;
``GET /public/rpc/openrpc.json`` describes every method.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web

from kaiju_tasks import errors, methods, models
from kaiju_tasks.rpc import protocol
from kaiju_tasks.service import NotificationService, TaskService, TokenService

logger = logging.getLogger(__name__)

DEFAULT_MAX_BODY = 1024 * 1024  # bytes
DEFAULT_MAX_BATCH = 100  # calls per batch
DEFAULT_REQUEST_TIMEOUT = 30.0  # seconds per call

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
    """What the server calls."""

    tasks: TaskService
    notifications: NotificationService
    tokens: TokenService
    methods: methods.Methods
    health: Callable[[], Awaitable[dict[str, Any]]]
    metrics: Callable[[], Awaitable[bytes]] | None = None
    max_body: int = DEFAULT_MAX_BODY
    max_batch: int = DEFAULT_MAX_BATCH
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT


API_KEY = web.AppKey("api", Api)

SERVICE_METHODS: dict[str, tuple[str, str]] = {
    "tasks.create": ("tasks", "create"),
    "tasks.get": ("tasks", "get"),
    "tasks.exists": ("tasks", "exists"),
    "tasks.list": ("tasks", "list"),
    "tasks.update": ("tasks", "update"),
    "tasks.delete": ("tasks", "delete"),
    "tasks.reset": ("tasks", "reset"),
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


def create_app(api: Api) -> web.Application:
    """Build the aiohttp application."""
    app = web.Application(client_max_size=api.max_body)
    app[API_KEY] = api
    app.router.add_post("/public/rpc", _rpc)
    app.router.add_get("/public/rpc/openrpc.json", _openrpc)
    app.router.add_get("/health", _health)
    app.router.add_get("/metrics", _metrics)
    return app


def _reply(
    request_id: Any, *, result: Any = None, error: dict[str, Any] | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id}
    if error is not None:
        body["error"] = error
    else:
        body["result"] = result
    return body


def _json(body: Any, status: int = 200) -> web.Response:
    return web.json_response(body, status=status, dumps=lambda v: json.dumps(v, default=str))


async def _rpc(request: web.Request) -> web.Response:
    api = request.app[API_KEY]
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        error = protocol.error(
            protocol.INVALID_REQUEST, f"request body larger than {api.max_body} bytes"
        )
        return _json(_reply(None, error=error), status=413)
    try:
        payload = json.loads(raw, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return _json(_reply(None, error=protocol.error(protocol.PARSE_ERROR, "parse error")))
    if b"\\u0000" in raw:  # PostgreSQL text and jsonb cannot hold NUL characters
        error = protocol.error(protocol.INVALID_PARAMS, "NUL characters (\\u0000) are not allowed")
        return _json(_reply(None, error=error))
    token = bearer_token(request)

    if isinstance(payload, list):
        if not payload:
            error = protocol.error(protocol.INVALID_REQUEST, "empty batch")
            return _json(_reply(None, error=error))
        if len(payload) > api.max_batch:
            error = protocol.error(
                protocol.INVALID_REQUEST, f"batch longer than {api.max_batch} calls"
            )
            return _json(_reply(None, error=error))
        caller = await _caller(api, token)
        # The calls of a batch are independent (JSON-RPC 2.0 allows any order): run them at once.
        replies = await asyncio.gather(*(_call(api, call, caller) for call in payload))
        answered = [r for r in replies if r is not None]
        return _json(answered) if answered else web.Response(status=204)
    reply = await _call(api, payload, await _caller(api, token))
    return _json(reply) if reply is not None else web.Response(status=204)


def bearer_token(request: web.Request) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    header = request.headers.get("Authorization", "")
    return header[7:].strip() if header[:7].lower() == "bearer " else None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


async def _caller(api: Api, token: str | None) -> models.Caller | errors.NotAuthorized:
    try:
        return await api.tokens.authenticate(token)
    except errors.NotAuthorized as exc:
        return exc


async def _call(
    api: Api, call: Any, caller: models.Caller | errors.NotAuthorized
) -> dict[str, Any] | None:
    """Run one call; None for a notification."""
    if not isinstance(call, dict):
        return _reply(None, error=protocol.error(protocol.INVALID_REQUEST, "invalid request"))
    request_id = call.get("id")
    notification = "id" not in call
    if (
        call.get("jsonrpc") != "2.0"
        or not isinstance(call.get("method"), str)
        or not isinstance(request_id, str | int | type(None))
        or isinstance(request_id, bool)
        or ("params" in call and not isinstance(call["params"], dict | list))
    ):
        return _reply(
            request_id if isinstance(request_id, str | int) else None,
            error=protocol.error(protocol.INVALID_REQUEST, "invalid request"),
        )
    deadline = asyncio.timeout(api.request_timeout)
    try:
        if isinstance(caller, errors.NotAuthorized):
            raise caller
        async with deadline:
            result = await _dispatch(api, call["method"], call.get("params"), caller)
    except Exception as exc:  # noqa: BLE001 - the one place that turns errors into replies
        if isinstance(exc, TimeoutError) and deadline.expired():
            error = protocol.error(protocol.TIMEOUT, "request timed out")
        else:
            error = _error(exc, call["method"])
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
    logger.error("RPC method failed", exc_info=exc, extra={"event": "rpc_error", "method": method})
    return protocol.error(protocol.INTERNAL_ERROR, "internal error")


async def _dispatch(api: Api, method: str, params: Any, caller: models.Caller) -> Any:
    target = SERVICE_METHODS.get(method)
    if target is None:
        if method in api.methods:
            return await api.methods.call(method, params)
        raise _RpcError(protocol.METHOD_NOT_FOUND, f"method {method!r} not found")
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
