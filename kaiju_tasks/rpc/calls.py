"""The calls of one JSON-RPC request: parsing, shape checks, batches, dispatch and error codes.

A body is parsed (no NaN or Infinity, no NUL character), a batch bounded by ``max_batch`` and
run one call after another in array order, each call within ``request_timeout``. Errors become
JSON-RPC errors through one table (:data:`ERROR_CODES`); anything unexpected is logged (a
bounded line, a traceback at most once a minute per method, and the task a call is for when it
comes from an executor) and answered with -32603 and a generic message.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import re
import time
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from aiohttp import web

from kaiju_tasks import errors, limits, models, templates
from kaiju_tasks.rpc import auth, protocol, reply
from kaiju_tasks.service import TokenService

if TYPE_CHECKING:
    from kaiju_tasks.rpc import server

# Logged under the server's name: operators and tests filter the server's log on it
# (docs/rpc.md), whichever of its modules writes the line.
logger = logging.getLogger("kaiju_tasks.rpc.server")

TRACEBACK_EVERY: Final = 60.0
"""Seconds between two logged tracebacks of the same method."""
LOG_MESSAGE_CHARS: Final = 500
"""Longest exception text copied into the log line of an internal error."""
TRACEBACK_FRAMES: Final = 20
"""Innermost frames of a logged traceback."""
TRACEBACK_CHARS: Final = 8000
"""Longest logged traceback."""

ERROR_CODES: tuple[tuple[type[Exception], int], ...] = (
    (errors.ValidationError, protocol.INVALID_PARAMS),
    (errors.NotAuthorized, protocol.NOT_AUTHORIZED),
    (errors.TaskNotFound, protocol.NOT_FOUND),
    (errors.NotificationNotFound, protocol.NOT_FOUND),
    (errors.Conflict, protocol.CONFLICT),
    (errors.InvalidTransition, protocol.CONFLICT),
)
"""Error class -> JSON-RPC code; the first match wins. Everything else is -32603."""

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


# A JSON escape of a UTF-16 surrogate (\ud800-\udfff): only then can a string be invalid Unicode.
_SURROGATE_ESCAPE: Final = re.compile(rb"\\u[dD][89a-fA-F]")


async def respond(
    api: server.Api,
    raw: bytes,
    tokens: TokenService,
    token: str | None,
    *,
    correlation_id: str | None = None,
) -> web.Response:
    """Answer the request body ``raw``: one call or a batch, authenticated by ``token``.

    ``correlation_id`` is the request's ``X-Correlation-Id`` header (an executor sends the
    task's ``job_id`` in it): the log record of an internal error names it.
    """
    try:
        payload = json.loads(raw, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError, RecursionError):
        error = protocol.error(protocol.PARSE_ERROR, "parse error")
        return reply.json_response(reply.envelope(None, error=error))
    if b"\\u0000" in raw:  # PostgreSQL text and jsonb cannot hold NUL characters
        error = protocol.error(protocol.INVALID_PARAMS, "NUL characters (\\u0000) are not allowed")
        return reply.json_response(reply.envelope(None, error=error))
    surrogates = _SURROGATE_ESCAPE.search(raw) is not None

    if isinstance(payload, list):
        if not payload:
            error = protocol.error(protocol.INVALID_REQUEST, "empty batch")
            return reply.json_response(reply.envelope(None, error=error))
        if len(payload) > api.max_batch:
            error = protocol.error(
                protocol.INVALID_REQUEST, f"batch longer than {api.max_batch} calls"
            )
            return reply.json_response(reply.envelope(None, error=error))
        caller = await auth.caller(tokens, token)
        replies = reply.Reply(limits.active().reply_bytes)
        # One after another, in array order: a later call sees what an earlier one did.
        for call in payload:
            if replies.full:
                replies.refuse(call)
                continue
            replies.add(call, await _call(api, call, caller, surrogates, correlation_id))
        return replies.response(batch=True)
    caller = await auth.caller(tokens, token)
    replies = reply.Reply(limits.active().reply_bytes)
    replies.add(payload, await _call(api, payload, caller, surrogates, correlation_id))
    return replies.response(batch=False)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _invalid(call: Any) -> tuple[str, str | None] | None:
    """What is wrong with the shape of a request: (message, field), or None."""
    if not isinstance(call, dict):
        return "a request must be a JSON object", None
    if call.get("jsonrpc") != "2.0":
        return 'jsonrpc must be "2.0"', "jsonrpc"
    if not isinstance(call.get("method"), str):
        return "method must be a string", "method"
    if not reply.valid_id(call.get("id")):
        return "id must be a string, an integer or null", "id"
    if "params" in call and not isinstance(call["params"], dict | list):
        return "params must be an object or an array", "params"
    return None


def bad_unicode(value: Any) -> str | None:
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
    api: server.Api,
    call: Any,
    caller: models.Caller | errors.NotAuthorized,
    surrogates: bool = False,
    correlation_id: str | None = None,
) -> dict[str, Any] | None:
    """Run one call; None for a notification."""
    problem = _invalid(call)
    if problem is None and surrogates:
        where = bad_unicode(call.get("method"))
        if where is not None:
            problem = ("method must be valid Unicode (no lone surrogate)", "method")
    if problem is not None:
        message, field = problem
        request_id = call.get("id") if isinstance(call, dict) else None
        return reply.envelope(
            request_id
            if isinstance(request_id, str | int) and reply.valid_id(request_id)
            else None,
            error=protocol.error(
                protocol.INVALID_REQUEST, f"invalid request: {message}", {"field": field}
            ),
        )
    request_id = call.get("id")
    if surrogates and not _encodable(str(request_id)):
        return reply.envelope(
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
            where = bad_unicode(call.get("params"))
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
            error = _error(
                exc, method if known else "", lambda: _task_of(request_id, correlation_id)
            )
        return None if notification else reply.envelope(request_id, error=error)
    return None if notification else reply.envelope(request_id, result=result)


def _error(
    exc: Exception, method: str, task: Callable[[], dict[str, Any]] | None = None
) -> dict[str, Any]:
    """The JSON-RPC error for ``exc``; an internal one is logged with ``task()``'s fields."""
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
    _log_internal(exc, method or "(unknown)", task() if task is not None else None)
    return protocol.error(protocol.INTERNAL_ERROR, "internal error")


_LAST_TRACEBACK: dict[str, float] = {}

# An executor's request id: task id, job_id, stage and retries (see executor/pipeline.py).
_EXECUTOR_REQUEST_ID: Final = re.compile(
    r"(?P<task_id>.{1,256}):(?P<job_id>[^:]{1,64}):(?P<stage>[0-9]{1,6}):[0-9]{1,9}"
)
MAX_CORRELATION_ID: Final = 64
"""Longest ``X-Correlation-Id`` copied into a log record (characters; a longer one is cut)."""


def _task_of(request_id: Any, correlation_id: str | None) -> dict[str, Any]:
    """The task a call is for, as log fields: what an executor's request says, else nothing.

    An executor's call has the id ``task_id:job_id:stage:retries`` and the header
    ``X-Correlation-Id: job_id``. Anyone may send either, so they are only read, bounded, into
    fields of the record (never into the reply or the message).
    """
    fields: dict[str, Any] = {}
    if correlation_id:
        fields["job_id"] = correlation_id[:MAX_CORRELATION_ID]
    found = _EXECUTOR_REQUEST_ID.fullmatch(request_id) if isinstance(request_id, str) else None
    if found is not None:
        fields["task_id"] = found["task_id"]
        fields["job_id"] = found["job_id"]  # per call: a batch's header is per request
        fields["stage"] = int(found["stage"])
    return fields


def _log_internal(exc: Exception, method: str, task: dict[str, Any] | None = None) -> None:
    """Log an internal error once, as an error tracker reads it; a traceback once a minute.

    The record is an ERROR with a fixed message (the exception's type and its first
    :data:`LOG_MESSAGE_CHARS` characters as arguments), the fields ``event`` (``rpc_error``),
    ``method`` and, for an executor's call, ``task_id``, ``job_id`` and ``stage``. At most
    once a minute per method it also carries the exception as ``exc_info``, for Sentry's and
    structlog's logging integrations, with its text rendering (``exc_text``, what a
    ``logging.Formatter`` writes) bounded to the innermost frames: a method that fails on every
    call, or a caller sending the same bad input again and again, would otherwise write one
    traceback per call, each quoting what may be a very long exception text.

    ``method`` is a served method's name or ``(unknown)``, so the table stays bounded.
    """
    if not logger.isEnabledFor(logging.ERROR):
        return
    now = time.monotonic()
    last = _LAST_TRACEBACK.get(method)
    with_traceback = last is None or now - last >= TRACEBACK_EVERY
    if with_traceback:
        _LAST_TRACEBACK[method] = now
    text = _bounded(str(exc), LOG_MESSAGE_CHARS)
    fields = {"event": "rpc_error", "method": method[:200], **(task or {})}
    record = logger.makeRecord(
        logger.name,
        logging.ERROR,
        __file__,
        0,
        "RPC method failed: %s: %s",
        (type(exc).__name__, text),
        (type(exc), exc, exc.__traceback__) if with_traceback else None,
        "_log_internal",
        fields,
    )
    if with_traceback:  # the innermost frames, and the message no longer than in the line
        frames = traceback.format_tb(exc.__traceback__, limit=-TRACEBACK_FRAMES)
        record.exc_text = (
            _bounded(
                "Traceback (innermost frames):\n" + "".join(frames).rstrip("\n"), TRACEBACK_CHARS
            )
            + f"\n{type(exc).__name__}: {text}"
        )
    logger.handle(record)


def _bounded(text: str, most: int) -> str:
    return text if len(text) <= most else text[:most] + f"... ({len(text):,} characters)"


async def _dispatch(api: server.Api, method: str, params: Any, caller: models.Caller) -> Any:
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
    parameters = signature(function).parameters
    for key in kwargs:
        if key not in parameters:
            known = ", ".join(p for p in parameters if p != "caller")
            raise errors.ValidationError(f"unknown parameter; known: {known}", field=key)
    for parameter in parameters.values():
        if (
            parameter.default is inspect.Parameter.empty
            and parameter.name != "caller"
            and parameter.name not in kwargs
        ):
            raise errors.ValidationError("required parameter missing", field=parameter.name)
    with templates.parse_allowance():  # one request parses a bounded amount of templates
        return await function(**kwargs, caller=caller)


_SIGNATURES: dict[Any, inspect.Signature] = {}


def signature(function: Any) -> inspect.Signature:
    """The signature of a service method, computed once per function."""
    key = getattr(function, "__func__", function)
    if key not in _SIGNATURES:
        _SIGNATURES[key] = inspect.signature(function)
    return _SIGNATURES[key]
