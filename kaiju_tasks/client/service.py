"""``client.tasks`` and ``client.notifications``: TaskService and NotificationService over HTTP.

Each method has the Python service method's params and result, builds the JSON-RPC params and
checks the shape of the reply; :meth:`TasksClient.call` does the rest.
"""

from __future__ import annotations

import builtins
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, overload

from kaiju_tasks import errors, models
from kaiju_tasks.client import codec, settings

if TYPE_CHECKING:
    from kaiju_tasks.client import transport

Columns = str | Sequence[str] | None
"""``columns`` of the read methods: None or ``"*"`` (all), a column name, or a list of them."""
TaskData = models.Task | Mapping[str, Any]
"""One task to create: a :class:`~kaiju_tasks.models.Task` or a dict of its fields."""


def _columns(params: dict[str, Any], columns: Columns) -> dict[str, Any]:
    if columns is not None:
        params["columns"] = columns if isinstance(columns, str) else builtins.list(columns)
    return params


def _task_json(item: Any) -> Any:
    return codec.model_json(item) if isinstance(item, models.Task) else item


def _dict(value: Any, method: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise errors.Unreachable(f"{method}: the reply is {type(value).__name__}, not an object")
    return value


class Tasks:
    """``client.tasks``: the methods of :class:`~kaiju_tasks.service.TaskService` over HTTP.

    Each has the Python method's params and result, and raises what it raises (see
    :func:`error_for`); ``docs/guide.md`` explains what they do.
    """

    def __init__(self, client: transport.TasksClient) -> None:
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
        limit: int = settings.DEFAULT_LIMIT,
        count: bool = True,
        columns: Columns = None,
    ) -> dict[str, Any]:
        """Return a page of tasks: ``{count, offset, page, pages, on_page, data}``."""
        params = _list_params(conditions, sort, offset, limit, count, columns)
        return _dict(await self._client.call("tasks.list", params), "tasks.list")

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

    def __init__(self, client: transport.TasksClient) -> None:
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
        limit: int = settings.DEFAULT_LIMIT,
        count: bool = True,
        columns: Columns = None,
    ) -> dict[str, Any]:
        """Return a page of notifications, filtered like ``tasks.list``."""
        params = _list_params(conditions, sort, offset, limit, count, columns)
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


def _list_params(
    conditions: Any, sort: Any, offset: int, limit: int, count: bool, columns: Columns
) -> dict[str, Any]:
    """The params of ``tasks.list`` and ``notifications.list``; absent options are left out."""
    params: dict[str, Any] = {"offset": offset, "limit": limit, "count": count}
    if conditions is not None:
        params["conditions"] = conditions
    if sort is not None:
        params["sort"] = sort
    return _columns(params, columns)
