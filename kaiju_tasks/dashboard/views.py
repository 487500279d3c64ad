"""The dashboard's routes, security headers and live stream.

Pages are rendered on the server (Jinja2, autoescaped) and work without JavaScript; a small
static script follows ``GET /stream`` (server-sent events) and swaps in the page's live part
(``?partial=1``) when something changed, so nothing reloads; the live part holds a task's action
buttons too, so they always match the status shown.

The handlers live by concern: :mod:`~kaiju_tasks.dashboard.pages` (overview, tasks, one task,
workers), :mod:`~kaiju_tasks.dashboard.actions` (reset, cancel, message),
:mod:`~kaiju_tasks.dashboard.session` (login, logout, sessions, form checks) and
:mod:`~kaiju_tasks.dashboard.render` (the shared Dashboard object, templates and filters).

A task id may hold any character, ``/``, ``?``, ``#``, ``%`` and ``..`` included: links name a
task with :func:`task_url` (every character outside the unreserved set percent-encoded; the ids
``.`` and ``..``, which a browser would resolve as path steps whatever their encoding, go in the
query of ``/task?id=``), and actions post the id in the form body to ``/actions/<action>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from kaiju_tasks import models
from kaiju_tasks.dashboard import actions, pages, render, session
from kaiju_tasks.dashboard.data import DashboardData, EventHub

logger = logging.getLogger(__name__)

KEEPALIVE = 15.0  # seconds between comments on an idle stream
MAX_STREAMS = 20  # live pages open at once per token

# Names other modules and tests have always imported from here.
Dashboard = render.Dashboard
DASHBOARD_KEY = render.DASHBOARD_KEY
COOKIE = session.COOKIE
task_url = render.task_url
_csrf = render.csrf
_nice = pages.nice


def setup(app: web.Application, dashboard: Dashboard) -> None:
    """Add the dashboard's routes to ``app`` (pages at ``/``, assets at ``/static``)."""
    app[DASHBOARD_KEY] = dashboard
    app.router.add_get("/", pages.overview_page)
    app.router.add_get("/tasks", pages.tasks_page)
    app.router.add_get("/tasks/{id}", pages.task_by_id)
    app.router.add_get("/task", pages.task_by_query)
    app.router.add_post("/actions/{action:reset|cancel|message}", actions.action)
    app.router.add_get("/workers", pages.workers_page)
    app.router.add_get("/login", session.login_form)
    app.router.add_post("/login", session.login)
    app.router.add_post("/logout", session.logout)
    app.router.add_get("/stream", _stream)
    app.router.add_get("/favicon.ico", _favicon)
    app.router.add_static("/static", _static_dir(), name="static", append_version=True)
    app.on_response_prepare.append(_security_headers)
    app.on_startup.append(_start)
    app.on_shutdown.append(_close)


def _static_dir() -> str:
    from importlib import resources

    return str(resources.files("kaiju_tasks.dashboard") / "static")


async def _favicon(request: web.Request) -> web.StreamResponse:
    """Browsers ask for ``/favicon.ico`` on their own; pages link the same icon."""
    from pathlib import Path

    icon = Path(_static_dir()) / "favicon.svg"
    return web.FileResponse(
        icon, headers={"Content-Type": "image/svg+xml", "Cache-Control": "max-age=86400"}
    )


async def _start(app: web.Application) -> None:
    hub = app[DASHBOARD_KEY].data.hub
    if hub is not None:
        hub.start()


async def _close(app: web.Application) -> None:
    await app[DASHBOARD_KEY].data.close()


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    if request.path.startswith(("/public/", "/metrics", "/health")):
        return
    response.headers.setdefault(
        "Content-Security-Policy",
        "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
        "frame-ancestors 'none'; form-action 'self'",
    )
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "same-origin")


# -- live updates -------------------------------------------------------------------------------


@session.login_required
async def _stream(request: web.Request, auth: render.Auth) -> web.StreamResponse:
    """Server-sent events: one ``message`` per lifecycle event, for pages to refresh."""
    dashboard = request.app[DASHBOARD_KEY]
    hub = dashboard.data.hub
    if hub is None:
        raise web.HTTPNotFound(text="live updates are off")
    holder = auth.holder
    if dashboard.streams[holder] >= MAX_STREAMS:
        raise web.HTTPTooManyRequests(text=f"at most {MAX_STREAMS} live pages per token")
    dashboard.streams[holder] += 1
    try:
        return await _follow(request, dashboard, hub, auth.caller)
    finally:
        dashboard.streams[holder] -= 1
        if dashboard.streams[holder] <= 0:
            del dashboard.streams[holder]


async def _follow(
    request: web.Request, dashboard: Dashboard, hub: EventHub, caller: models.Caller
) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-store",
            "X-Accel-Buffering": "no",
        }
    )
    loop = asyncio.get_running_loop()
    quiet_since = checked_at = loop.time()
    owners = _Owners(dashboard.data)
    async with hub.subscribe() as queue:
        # Subscribed before the client hears "open": a page refreshes once on open, so what
        # happened between its rendering and now is shown, and everything later arrives here.
        await response.prepare(request)
        await response.write(b"retry: 2000\n: connected\n\n")
        while not _gone(request):
            if loop.time() - checked_at > KEEPALIVE:  # a revoked token ends its streams
                checked_at = loop.time()
                if await session.caller(request) is None:
                    break
            try:
                async with asyncio.timeout(1.0):
                    event = await queue.get()
            except TimeoutError:
                if loop.time() - quiet_since < KEEPALIVE:
                    continue  # look again whether the client went away
                payload = b": keepalive\n\n"
            else:
                if event is None:  # the server is shutting down
                    break
                if not caller.views_all and not await owners.owns(event, caller.user_id):
                    continue  # others' work is not theirs to see, not even that it happened
                payload = _sse(event, caller)
            quiet_since = loop.time()
            try:
                await response.write(payload)
            except (ConnectionResetError, RuntimeError):
                break
    with contextlib.suppress(ConnectionResetError, RuntimeError):
        await response.write_eof()
    return response


class _Owners:
    """Who owns the tasks a stream's events are about, remembered for the stream's life."""

    LIMIT = 10_000

    def __init__(self, data: DashboardData) -> None:
        self.data = data
        self.known: dict[str, str | None] = {}

    async def owns(self, event: Mapping[str, Any], user_id: str | None) -> bool:
        task_id = event.get("task_id")
        if not task_id or user_id is None:
            return False
        if task_id not in self.known:
            if len(self.known) >= self.LIMIT:
                self.known.clear()
            self.known[task_id] = await self.data.owner(task_id)
        return self.known[task_id] == user_id


def _gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def _sse(event: Mapping[str, Any], caller: models.Caller) -> bytes:
    if caller.views_all:
        shown = {
            key: event.get(key)
            for key in ("id", "type", "task_id", "status", "stage", "app_name", "executor_id")
        }
    else:  # about one of their own tasks; their pages re-read what they may see
        shown = {"type": "change"}
    return f"event: change\ndata: {json.dumps(shown, default=str)}\n\n".encode()
