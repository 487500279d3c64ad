"""Log record enrichment and formats: every record about a task carries its ``job_id``.

``TaskContextFilter`` copies the running stage's ``task_id``, ``job_id``, ``stage`` and
``executor_id`` (see :mod:`kaiju_tasks.context`) onto each record, unless the record already
has them; ``JsonFormatter`` writes one JSON object per line, ``TextFormatter`` one line of text.
``configure`` installs the filter and a formatter; an application that configures logging itself
adds the filter to its handlers.

Secrets, last line of defence: code that writes a URL or DSN into a message redacts it first
(:mod:`kaiju_tasks.redact`); both formatters also pass every line they write through
:func:`kaiju_tasks.redact.text` (message, extras and traceback alike), and ``RedactFilter`` does
the same to the records of any other handler. Only a text holding ``://``, ``password`` or
``passfile`` is rewritten, so a line without any costs two substring searches.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from kaiju_tasks import context, redact

CONTEXT_KEYS = ("task_id", "job_id", "stage", "executor_id")
_STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
_TRACEBACKS = logging.Formatter()


def _suspect(text: str) -> bool:
    """Whether ``text`` may hold a secret redact.text hides: a URL or a DSN setting."""
    if "://" in text:
        return True
    lowered = text.lower()
    return "password" in lowered or "passfile" in lowered


def _redacted(value: Any) -> Any:
    """``value`` with every string in it (keys aside) passed through redact.text."""
    if isinstance(value, str):
        return redact.text(value) if _suspect(value) else value
    if isinstance(value, dict):
        return {key: _redacted(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_redacted(item) for item in value]
    if value is None or isinstance(value, bool | int | float):
        return value
    return _redacted(str(value))


class TaskContextFilter(logging.Filter):
    """Adds the running task's ids to every record (never drops a record)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Enrich ``record``."""
        current = context.get()
        for key in CONTEXT_KEYS:
            if not hasattr(record, key):
                setattr(record, key, current.get(key) if current else None)
        return True


class RedactFilter(logging.Filter):
    """Hides URL and DSN secrets in each record, for handlers other than :func:`configure`'s.

    The message (its arguments merged in), every string extra, the traceback and the stack are
    passed through :func:`kaiju_tasks.redact.text` when they hold ``://``, ``password`` or
    ``passfile``. Never drops a record.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Redact ``record`` in place."""
        message = record.getMessage()
        if _suspect(message):
            record.msg, record.args = redact.text(message), None
        fields = record.__dict__
        for key in fields.keys() - _STANDARD:
            value = fields[key]
            if isinstance(value, str) and _suspect(value):
                fields[key] = redact.text(value)
        if record.exc_info and not record.exc_text:
            record.exc_text = _TRACEBACKS.formatException(record.exc_info)
        if record.exc_text and _suspect(record.exc_text):
            record.exc_text = redact.text(record.exc_text)
        if record.stack_info and _suspect(record.stack_info):
            record.stack_info = redact.text(record.stack_info)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message and every extra field.

    A line that may hold a secret is written again with every string value redacted.
    """

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
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            body["exc_info"] = record.exc_text
        if record.stack_info:
            body["stack_info"] = record.stack_info
        line = json.dumps(body, default=str)
        return json.dumps(_redacted(body)) if _suspect(line) else line


class TextFormatter(logging.Formatter):
    """``time level logger: message key=value ...`` with the task ids when present.

    A line that may hold a secret is passed through :func:`kaiju_tasks.redact.text`.
    """

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` as one line of text."""
        line = super().format(record)
        extras = [
            f"{key}={value}"
            for key, value in vars(record).items()
            if key not in _STANDARD and not key.startswith("_") and value is not None
        ]
        if extras:
            line = f"{line} {' '.join(extras)}"
        return redact.text(line) if _suspect(line) else line


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


OUTAGE_FIRST_REMINDER = 10.0
"""Seconds from the loss of the database to the first reminder that it is still gone."""
OUTAGE_MAX_REMINDER = 300.0
"""Longest interval between two reminders; each interval doubles until it reaches this."""


class Outage:
    """Says once that a component lost the database, reminds, then says when it is back.

    Every call of ``failed`` during one outage but the first is silent, except a one-line
    reminder (no traceback) after 10 s, 20 s more, 40 s more... up to every 5 minutes; the
    first ``ok`` after it writes ``<component>: database back after N s``. Components call
    ``failed`` where they used to log each failed database call, and ``ok`` after a call that
    worked: a call costs a comparison when nothing is wrong.

    Args:
        logger: where the lines go.
        component: who speaks (``executor <id>``, ``manager``, ``listener``...).
        first_reminder: seconds to the first reminder.
        max_reminder: longest interval between reminders.
        monotonic: the time source (seconds; ``time.monotonic``).
    """

    def __init__(
        self,
        logger: logging.Logger,
        component: str,
        *,
        first_reminder: float = OUTAGE_FIRST_REMINDER,
        max_reminder: float = OUTAGE_MAX_REMINDER,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.component = component
        self.first_reminder = first_reminder
        self.max_reminder = max_reminder
        self._monotonic = monotonic
        self.since: float | None = None
        """When the current outage began (``monotonic`` seconds), or None when there is none."""
        self._next = 0.0
        self._interval = first_reminder
        self._failures = 0

    @property
    def lost(self) -> bool:
        """Whether the database is out of reach as far as this component knows."""
        return self.since is not None

    def failed(self, exc: BaseException) -> None:
        """Record a failed database call (logged only as described above)."""
        now = self._monotonic()
        self._failures += 1
        if self.since is None:
            self.since = now
            self._interval = self.first_reminder
            self._next = now + self._interval
            self.logger.warning(
                "%s: database unreachable: %s",
                self.component,
                _one_line(exc),
                extra={"event": "database_lost", "component": self.component},
            )
            return
        if now >= self._next:
            self.logger.warning(
                "%s: database still unreachable after %.0f s (%d failed calls)",
                self.component,
                now - self.since,
                self._failures,
                extra={"event": "database_still_lost", "component": self.component},
            )
            self._interval = min(self._interval * 2, self.max_reminder)
            self._next = now + self._interval

    def ok(self) -> None:
        """Record a database call that worked; ends the outage if there was one."""
        if self.since is None:
            return
        gone = self._monotonic() - self.since
        self.since = None
        self._failures = 0
        self.logger.warning(
            "%s: database back after %.1f s",
            self.component,
            gone,
            extra={"event": "database_back", "component": self.component, "seconds": gone},
        )


class PoolFloorFilter(logging.Filter):
    """Turns asyncpg's pool refill warnings into one short line a minute.

    While the database is down, asyncpg's pool logs "Failed to restore the pool connection
    floor" with a full traceback every time it retries (about once a second per pool). The
    components already log the outage once, remind, and log its end (:class:`Outage`): this
    keeps one line of asyncpg's own, without the traceback, at most every ``every`` seconds.
    """

    def __init__(self, every: float = 60.0) -> None:
        super().__init__("asyncpg.pool")
        self.every = every
        self._last: float | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        """Keep ``record`` unless it repeats a refill warning within ``every`` seconds."""
        if not str(record.msg).startswith("Failed to restore the pool connection floor"):
            return True
        now = time.monotonic()
        if self._last is not None and now - self._last < self.every:
            return False
        self._last = now
        if record.exc_info and record.exc_info[1] is not None:
            record.msg = f"{record.msg}: {_one_line(record.exc_info[1])}"
            record.args = None
        record.exc_info = record.exc_text = None
        return True


def quiet_pool_refills() -> None:
    """Install :class:`PoolFloorFilter` on asyncpg's pool logger (once per process)."""
    pool_logger = logging.getLogger("asyncpg.pool")
    if not any(isinstance(f, PoolFloorFilter) for f in pool_logger.filters):
        pool_logger.addFilter(PoolFloorFilter())


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."
