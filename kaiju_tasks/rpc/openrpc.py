"""The OpenRPC document the server serves at ``GET /public/rpc/openrpc.json``.

Every method is described from the code: the service methods' names, summaries and named
params from their signatures, the application methods with who may call them, and the error
codes from the server's one table.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from kaiju_tasks import models
from kaiju_tasks.rpc import calls, protocol

if TYPE_CHECKING:
    from kaiju_tasks.rpc import server


def openrpc_document(api: server.Api) -> dict[str, Any]:
    """Describe every method: name, summary, named params (required or not), from the code."""
    described = []
    for name, (service, attribute) in calls.SERVICE_METHODS.items():
        function = getattr(getattr(api, service), attribute)
        params = [
            {
                "name": p.name,
                "required": p.default is inspect.Parameter.empty,
                "schema": _schema_for(name, p.name),
            }
            for p in calls.signature(function).parameters.values()
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
        "x-errors": [{"code": code, "error": kind.__name__} for kind, code in calls.ERROR_CODES]
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
