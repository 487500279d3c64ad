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

The package, by part
    ``settings`` (the defaults, ``KAIJU_TASKS_URL`` and ``KAIJU_TASKS_TOKEN``, URL and token
    validation), ``codec`` (requests and replies as JSON), ``error_map`` (JSON-RPC error codes
    back to exceptions), ``transport`` (:class:`TasksClient`: the session, retries, timeouts),
    ``service`` (``client.tasks`` and ``client.notifications``) and ``sync``
    (:class:`SyncTasksClient`, whose methods are derived from the async ones). Every name is
    re-exported here, where the documentation names it.
"""

from __future__ import annotations

from kaiju_tasks.client import codec
from kaiju_tasks.client.error_map import error_for
from kaiju_tasks.client.service import Columns, Notifications, TaskData, Tasks
from kaiju_tasks.client.settings import (
    DEFAULT_BACKOFF,
    DEFAULT_LIMIT,
    DEFAULT_RETRIES,
    DEFAULT_TIMEOUT,
    DEFAULT_URL,
    KEEPALIVE,
    MAX_BACKOFF,
    RETRIED,
    RETRY_STATUSES,
    RPC_PATH,
    TOKEN_ENV,
    URL_ENV,
)
from kaiju_tasks.client.sync import SyncNotifications, SyncTasks, SyncTasksClient
from kaiju_tasks.client.transport import TasksClient

__all__ = [
    "DEFAULT_BACKOFF",
    "DEFAULT_LIMIT",
    "DEFAULT_RETRIES",
    "DEFAULT_TIMEOUT",
    "DEFAULT_URL",
    "KEEPALIVE",
    "MAX_BACKOFF",
    "RETRIED",
    "RETRY_STATUSES",
    "RPC_PATH",
    "TOKEN_ENV",
    "URL_ENV",
    "Columns",
    "Notifications",
    "SyncNotifications",
    "SyncTasks",
    "SyncTasksClient",
    "TaskData",
    "Tasks",
    "TasksClient",
    "error_for",
]

_decode = codec.decode  # not public: the tests check the decoder directly
