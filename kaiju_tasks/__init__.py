"""kaiju-tasks: a PostgreSQL-backed task manager for asyncio applications.

A task is a pipeline of JSON-RPC calls declared as data; its stages pass results to each other
through templates, can sleep durably (Timer) or wait for an outside message (Message), and are
retried, timed out, scheduled by cron and chained, with PostgreSQL as the only moving part.
"""

from __future__ import annotations

from kaiju_tasks.client import SyncTasksClient, TasksClient
from kaiju_tasks.clock import Clock, SystemClock
from kaiju_tasks.conditions import Condition
from kaiju_tasks.errors import (
    ConfigError,
    Conflict,
    InvalidTransition,
    KaijuTasksError,
    MigrationError,
    NotAuthorized,
    NotificationNotFound,
    RateLimited,
    RemoteCallError,
    RemoteError,
    StageError,
    StageTimeout,
    StoreError,
    TaskNotFound,
    TransportError,
    Unreachable,
    ValidationError,
)
from kaiju_tasks.executor import Executor
from kaiju_tasks.manager import Manager
from kaiju_tasks.methods import MethodError, Methods, Reject
from kaiju_tasks.models import (
    SYSTEM,
    Caller,
    ExitCode,
    Limit,
    Message,
    Permission,
    Priority,
    RestartPolicy,
    Task,
    TaskCommand,
    TaskStatus,
    TaskUpdate,
    Timer,
)
from kaiju_tasks.runtime import TaskRuntime
from kaiju_tasks.service import NotificationService, TaskService

__version__ = "0.1.0"

__all__ = [
    "SYSTEM",
    "Caller",
    "Clock",
    "Condition",
    "ConfigError",
    "Conflict",
    "Executor",
    "ExitCode",
    "InvalidTransition",
    "KaijuTasksError",
    "Limit",
    "Manager",
    "Message",
    "MethodError",
    "Methods",
    "MigrationError",
    "NotAuthorized",
    "NotificationNotFound",
    "NotificationService",
    "Permission",
    "Priority",
    "RateLimited",
    "Reject",
    "RemoteCallError",
    "RemoteError",
    "RestartPolicy",
    "StageError",
    "StageTimeout",
    "StoreError",
    "SyncTasksClient",
    "SystemClock",
    "Task",
    "TaskCommand",
    "TaskNotFound",
    "TaskRuntime",
    "TaskService",
    "TaskStatus",
    "TaskUpdate",
    "TasksClient",
    "Timer",
    "TransportError",
    "Unreachable",
    "ValidationError",
    "__version__",
]
