"""What every dashboard handler shares: the Dashboard object, who is logged in, and rendering.

:class:`Dashboard` holds the services, the dashboard reads, the Jinja2 environment (autoescaped)
and the clock; :class:`Auth` says who made a request and :func:`csrf` derives the form token
its forms carry; :func:`render` renders a page (or its live part, ``?partial=1``) with the
values every template uses; the filters format times, JSON and stages for pages.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import hmac
import json
import logging
import urllib.parse
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, cast

import jinja2
from aiohttp import web

from kaiju_tasks import clock as clock_
from kaiju_tasks import models
from kaiju_tasks.dashboard.data import DashboardData
from kaiju_tasks.service import TaskService, TokenService

logger = logging.getLogger(__name__)


class Dashboard:
    """Everything the handlers need: services, dashboard reads, templates and a clock."""

    def __init__(
        self,
        tasks: TaskService,
        tokens: TokenService,
        data: DashboardData,
        clock: clock_.Clock | None = None,
    ) -> None:
        self.tasks = tasks
        self.tokens = tokens
        self.data = data
        self.clock = clock or clock_.SystemClock()
        self.streams: collections.Counter[str] = collections.Counter()
        """Open live streams by API token (``Auth.holder``), to cap them."""
        self.env = jinja2.Environment(
            loader=jinja2.PackageLoader("kaiju_tasks.dashboard", "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters.update(
            when=_when,
            ago=lambda v: _ago(v, self.clock.now()),
            pretty=_pretty,
            compact=_compact,
            stage=_stage,
            task_url=task_url,
        )


DASHBOARD_KEY = web.AppKey("dashboard", Dashboard)


def task_url(task_id: str, **query: str) -> str:
    """The dashboard page of exactly this task, whatever characters its id holds.

    Every character outside the unreserved set is percent-encoded, so ``/``, ``?``, ``#`` and
    ``%`` stay inside the one path segment. A browser resolves a segment ``.`` or ``..`` (even
    written ``%2E%2E``) as a step in the path, so those two ids go in a query instead.
    """
    if task_id in ("", ".", ".."):
        return "/task?" + urllib.parse.urlencode({"id": task_id, **query})
    url = "/tasks/" + urllib.parse.quote(task_id, safe="")
    return f"{url}?{urllib.parse.urlencode(query)}" if query else url


def csrf(secret: str) -> str:
    """The form token of a session (or of a bearer token): forms must echo it."""
    return hmac.new(secret.encode(), b"kaiju-tasks-dashboard-csrf", hashlib.sha256).hexdigest()


@dataclasses.dataclass(frozen=True, slots=True)
class Auth:
    """Who is logged in, and what their forms and live streams are keyed by."""

    caller: models.Caller
    secret: str
    """The session id, or the bearer token of a scripted request: the CSRF token derives from it."""
    holder: str
    """The API token behind the login (its id, or a hash): live streams are capped per token."""


def render(
    request: web.Request,
    name: str,
    context: Mapping[str, Any],
    *,
    status: int = 200,
    auth: Auth | None = None,
) -> web.Response:
    """Render template ``name`` with ``context`` and the values every page uses."""
    dashboard = request.app[DASHBOARD_KEY]
    partial = bool(request.query.get("partial"))
    template = dashboard.env.get_template(name)
    caller = auth.caller if auth else None
    values = {
        "user": caller.user_id if caller else None,
        "system": bool(caller and caller.is_system),
        "csrf": csrf(auth.secret) if auth else "",
        "path": request.path,
        "partial": partial,
        "now": dashboard.clock.now(),
        "static": lambda name: str(
            cast(web.StaticResource, request.app.router["static"]).url_for(
                filename=name, append_version=True
            )
        ),
        **context,
    }
    body = template.render(values)
    response = web.Response(text=body, status=status, content_type="text/html", charset="utf-8")
    response.headers["Cache-Control"] = "no-store"
    return response


def _when(value: Any) -> str:
    moment = _as_datetime(value)
    return "" if moment is None else moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _as_datetime(value: Any) -> datetime | None:
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value))


def _ago(value: Any, now: datetime) -> str:
    moment = _as_datetime(value)
    if moment is None:
        return ""
    seconds = (now - moment).total_seconds()
    if seconds < 0:
        return "in " + _span(-seconds)
    return _span(seconds) + " ago"


def _span(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


SHOWN_JSON = 100_000  # characters of one value shown on a page; the API has the rest


def _pretty(value: Any) -> str:
    text = json.dumps(value, indent=2, ensure_ascii=False, default=str)
    if len(text) <= SHOWN_JSON:
        return text
    return f"{text[:SHOWN_JSON]}\n… (cut: {len(text):,} characters in all; tasks.get has the rest)"


SHOWN_EVENT = 2_000  # characters of an event's details shown in a timeline row


def _compact(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    if len(text) <= SHOWN_EVENT:
        return text
    return f"{text[:SHOWN_EVENT]} … (cut: {len(text):,} characters in all)"


def _stage(task: Mapping[str, Any]) -> str:
    """``stage/stages``: the stage counted from 0, as in the API and templates (``[0.data]``).

    A finished task is past its last stage: ``stages/stages``.
    """
    stages = task.get("stages") or 0
    stage = task.get("stage") or 0
    if task.get("status") == "FINISHED":
        return f"{stages}/{stages}"
    return f"{min(stage, stages)}/{stages}" if stages else "-"
