"""Log record enrichment and formats: every record about a task carries its ``job_id``.

``TaskContextFilter`` copies the running stage's ``task_id``, ``job_id``, ``stage`` and
``executor_id`` (see :mod:`kaiju_tasks.context`) onto each record, unless the record already
has them; ``JsonFormatter`` writes one JSON object per line. ``configure`` installs both; an
application that configures logging itself adds the filter to its handlers.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

from kaiju_tasks import context

CONTEXT_KEYS = ("task_id", "job_id", "stage", "executor_id")
_STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class TaskContextFilter(logging.Filter):
    """Adds the running task's ids to every record (never drops a record)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Enrich ``record``."""
        current = context.get()
        for key in CONTEXT_KEYS:
            if not hasattr(record, key):
                setattr(record, key, current.get(key) if current else None)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message and every extra field."""

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` as a JSON line."""
        body: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                body[key] = value
        if record.exc_info:
            body["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(body, default=str)


class TextFormatter(logging.Formatter):
    """``time level logger: message key=value ...`` with the task ids when present."""

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` as one line of text."""
        line = super().format(record)
        extras = [
            f"{key}={value}"
            for key, value in vars(record).items()
            if key not in _STANDARD and not key.startswith("_") and value is not None
        ]
        return f"{line} {' '.join(extras)}" if extras else line


def configure(level: str = "INFO", fmt: str = "text") -> None:
    """Send kaiju-tasks logs (and the root logger's) to stderr in ``fmt`` (text or json)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(TaskContextFilter())
    handler.setFormatter(
        JsonFormatter()
        if fmt == "json"
        else TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
