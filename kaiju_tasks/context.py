"""The task a stage runs for, visible to the stage's code and to log records (contextvars)."""

from __future__ import annotations

import contextvars
from typing import Any

current_task: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "kaiju_tasks_current_task", default=None
)
"""While a stage runs: ``{task_id, job_id, stage, app_name, executor_id, deadline}``."""


def get() -> dict[str, Any] | None:
    """Return the running stage's task context, or None outside a stage."""
    return current_task.get()
