"""The dashboard's pages, actions, login and live stream, as aiohttp handlers.

Pages are rendered on the server (Jinja2, autoescaped) and work without JavaScript; a small
static script follows ``GET /stream`` (server-sent events) and swaps in the page's live part
(``?partial=1``) when something changed, so nothing reloads. Callers log in with an API token,
kept in an HttpOnly, SameSite=Strict cookie; every form carries a CSRF token derived from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import math
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import jinja2
from aiohttp import web

from kaiju_tasks import clock as clock_
from kaiju_tasks import errors, models, templates
from kaiju_tasks.dashboard.data import TIMELINE_LIMIT, DashboardData
from kaiju_tasks.service import TaskService, TokenService

logger = logging.getLogger(__name__)

COOKIE = "kaiju_tasks_session"
PAGE_SIZE = 50
ALIVE_WITHIN = timedelta(seconds=30)
WORKERS_SINCE = timedelta(hours=1)
KEEPALIVE = 15.0  # seconds between comments on an idle stream
STATUSES = tuple(s.value for s in models.TaskStatus)
LIST_COLUMNS = [
    "id",
    "app_name",
    "status",
    "stage",
    "stages",
    "exit_code",
    "priority",
    "job_id",
    "created",
    "status_change",
    "description",
]
TREE_COLUMNS = ["id", "parent_id", "app_name", "status", "stage", "stages", "created"]
TREE_LIMIT = 1000


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
        self.env = jinja2.Environment(
            loader=jinja2.PackageLoader("kaiju_tasks.dashboard", "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters.update(
            when=_when, ago=lambda v: _ago(v, self.clock.now()), pretty=_pretty, stage=_stage
        )


DASHBOARD_KEY = web.AppKey("dashboard", Dashboard)


def setup(app: web.Application, dashboard: Dashboard) -> None:
    """Add the dashboard's routes to ``app`` (pages at ``/``, assets at ``/static``)."""
    app[DASHBOARD_KEY] = dashboard
    app.router.add_get("/", _overview)
    app.router.add_get("/tasks", _tasks)
    app.router.add_get("/tasks/{id}", _task)
    app.router.add_post("/tasks/{id}/{action:reset|cancel|message}", _action)
    app.router.add_get("/workers", _workers)
    app.router.add_get("/login", _login_form)
    app.router.add_post("/login", _login)
    app.router.add_post("/logout", _logout)
    app.router.add_get("/stream", _stream)
    app.router.add_static("/static", _static_dir(), name="static", append_version=True)
    app.on_response_prepare.append(_security_headers)
    app.on_startup.append(_start)
    app.on_shutdown.append(_close)


def _static_dir() -> str:
    from importlib import resources

    return str(resources.files("kaiju_tasks.dashboard") / "static")


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


# -- auth ---------------------------------------------------------------------------------------


def _csrf(token: str) -> str:
    return hmac.new(token.encode(), b"kaiju-tasks-dashboard-csrf", hashlib.sha256).hexdigest()


async def _caller(request: web.Request) -> tuple[models.Caller, str] | None:
    dashboard = request.app[DASHBOARD_KEY]
    token = request.cookies.get(COOKIE)
    if not token:
        header = request.headers.get("Authorization", "")
        token = header[7:].strip() if header[:7].lower() == "bearer " else None
    try:
        return await dashboard.tokens.authenticate(token), token or ""
    except errors.NotAuthorized:
        return None


Handler = Callable[[web.Request, models.Caller, str], Awaitable[web.StreamResponse]]


def _login_required(handler: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def wrapped(request: web.Request) -> web.StreamResponse:
        found = await _caller(request)
        if found is None:
            if request.query.get("partial") or request.path == "/stream":
                raise web.HTTPUnauthorized(text="log in again")
            target = urllib.parse.quote(request.path_qs, safe="")
            raise web.HTTPSeeOther(f"/login?next={target}")
        return await handler(request, *found)

    return wrapped


def _safe_next(value: str | None) -> str:
    """Only a path on this server: never ``//host`` or ``scheme:``."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/"
    return value


async def _login_form(request: web.Request) -> web.StreamResponse:
    return _render(
        request, "login.html", {"next": _safe_next(request.query.get("next")), "error": None}
    )


async def _login(request: web.Request) -> web.StreamResponse:
    dashboard = request.app[DASHBOARD_KEY]
    form = await request.post()
    token = str(form.get("token", "")).strip()
    target = _safe_next(str(form.get("next", "/")))
    try:
        await dashboard.tokens.authenticate(token)
    except errors.NotAuthorized:
        return _render(
            request,
            "login.html",
            {"next": target, "error": "That token is not valid or has been revoked."},
            status=401,
        )
    response = web.HTTPSeeOther(target)
    response.set_cookie(
        COOKIE, token, httponly=True, samesite="Strict", secure=request.secure, path="/"
    )
    raise response


async def _logout(request: web.Request) -> web.StreamResponse:
    found = await _caller(request)
    form = await request.post()
    if found is not None and not hmac.compare_digest(str(form.get("csrf", "")), _csrf(found[1])):
        raise web.HTTPForbidden(text="bad form token; reload the page")
    response = web.HTTPSeeOther("/login")
    response.del_cookie(COOKIE, path="/")
    raise response


# -- rendering ----------------------------------------------------------------------------------


def _render(
    request: web.Request,
    name: str,
    context: Mapping[str, Any],
    *,
    status: int = 200,
    caller: models.Caller | None = None,
    token: str | None = None,
) -> web.Response:
    dashboard = request.app[DASHBOARD_KEY]
    partial = bool(request.query.get("partial"))
    template = dashboard.env.get_template(name)
    values = {
        "user": caller.user_id if caller else None,
        "system": bool(caller and caller.is_system),
        "csrf": _csrf(token) if token else "",
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


def _stage(task: Mapping[str, Any]) -> str:
    stages = task.get("stages") or 0
    stage = task.get("stage") or 0
    if task.get("status") == "FINISHED":
        return f"{stages}/{stages}"
    return f"{min(stage + 1, stages)}/{stages}" if stages else "-"


# -- pages --------------------------------------------------------------------------------------


class _BadFilter(Exception):
    pass


def _task_filters(query: Mapping[str, str]) -> tuple[dict[str, str], Any]:
    """Read the tasks page's filter form; return what to show back and the conditions."""
    shown = {key: query.get(key, "").strip() for key in ("status", "app", "q", "since", "until")}
    base: dict[str, Any] = {}
    if shown["status"]:
        if shown["status"] not in STATUSES:
            raise _BadFilter(f"unknown status {shown['status']!r}")
        base["status"] = shown["status"]
    if shown["app"]:
        base["app_name"] = shown["app"]
    created: dict[str, str] = {}
    for key, op in (("since", "ge"), ("until", "le")):
        if shown[key]:
            try:
                moment = datetime.fromisoformat(shown[key])
            except ValueError:
                raise _BadFilter(f"{key}: {shown[key]!r} is not a date and time") from None
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=UTC)
            created[op] = moment.isoformat()
    if created:
        base["created"] = created
    if not shown["q"]:
        return shown, base
    pattern = "%" + _like_escape(shown["q"]) + "%"
    return shown, [
        {**base, column: {"like": pattern}}
        for column in ("id", "job_id", "app_name", "description")
    ]


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


@_login_required
async def _tasks(request: web.Request, caller: models.Caller, token: str) -> web.StreamResponse:
    dashboard = request.app[DASHBOARD_KEY]
    try:
        page_number = max(1, int(request.query.get("page", "1")))
    except ValueError:
        page_number = 1
    context: dict[str, Any] = {"error": None, "statuses": STATUSES, "page": None}
    status = 200
    try:
        shown, conditions = _task_filters(request.query)
    except _BadFilter as exc:
        shown = {
            key: request.query.get(key, "") for key in ("status", "app", "q", "since", "until")
        }
        context["error"] = str(exc)
        conditions, status = None, 400
    context["filters"] = shown
    if status == 200:
        page = await dashboard.tasks.list(
            conditions=conditions,
            sort=[{"desc": "created"}, {"desc": "id"}],
            offset=(page_number - 1) * PAGE_SIZE,
            limit=PAGE_SIZE,
            columns=LIST_COLUMNS,
            caller=caller,
        )
        context["page"] = page
        context["links"] = _page_links(request, page)
    return _render(request, "tasks.html", context, status=status, caller=caller, token=token)


def _page_links(request: web.Request, page: Mapping[str, Any]) -> dict[str, str | None]:
    def link(number: int) -> str:
        query = {k: v for k, v in request.query.items() if k not in ("page", "partial") and v}
        query["page"] = str(number)
        return "/tasks?" + urllib.parse.urlencode(query)

    pages = page["pages"] or 1
    current = page["page"]
    return {
        "prev": link(current - 1) if current > 1 else None,
        "next": link(current + 1) if current < pages else None,
    }


@_login_required
async def _task(request: web.Request, caller: models.Caller, token: str) -> web.StreamResponse:
    return await _task_page(request, caller, token)


async def _task_page(
    request: web.Request,
    caller: models.Caller,
    token: str,
    *,
    notice: str | None = None,
    error: str | None = None,
    status: int = 200,
    message: str = "",
) -> web.Response:
    dashboard = request.app[DASHBOARD_KEY]
    task_id = request.match_info["id"]
    # Events first, then the task: each event is written with its transition, so the task read
    # afterwards is at least as new as the timeline (never a failure listed on a running task).
    timeline = await dashboard.data.timeline(task_id)
    try:
        task = await dashboard.tasks.get(task_id, caller=caller)
    except (errors.TaskNotFound, errors.ValidationError):
        return _render(
            request,
            "missing.html",
            {"task_id": task_id},
            status=404,
            caller=caller,
            token=token,
        )
    done = request.query.get("done")
    if notice is None and done in ("reset", "cancel", "message"):
        notice = {
            "reset": "Task reset: it will run again from its first stage.",
            "cancel": "Task cancelled.",
            "message": "Message delivered.",
        }[done]
    tree = await _tree(dashboard, task, caller)
    context = {
        "task": task,
        "stages": _stages(task, dashboard.clock.now()),
        "timeline": timeline,
        "timeline_cut": len(timeline) >= TIMELINE_LIMIT,
        "tree": tree,
        "tree_ids": [node["task"]["id"] for node in _walk(tree)],
        "notice": notice,
        "error": error,
        "message": message,
    }
    return _render(request, "task.html", context, status=status, caller=caller, token=token)


def _stages(task: Mapping[str, Any], now: datetime) -> list[dict[str, Any]]:
    """Each stage as written and, once it has started, as evaluated from the stored results."""
    results = task.get("result")
    done = results if isinstance(results, list) else []
    data: dict[str, Any] = {"id": task["id"], "kws": task.get("kws") or {}, "executor": {}}
    for index, value in enumerate(done):
        data[str(index)] = value
    current = task.get("stage") or 0
    reached = len(done) if task.get("status") == "FINISHED" else current + 1
    stages = []
    for index, command in enumerate(task.get("commands") or []):
        kind = command.get("kind") or "call"
        item: dict[str, Any] = {
            "index": index,
            "kind": kind,
            "command": command,
            "reached": index < reached,
            "has_result": index < len(done),
            "result": done[index] if index < len(done) else None,
            "evaluated": None,
            "evaluation_error": None,
        }
        if kind == "call" and index < reached:
            # Only results of earlier stages are visible to a stage, as in the executor.
            visible = {k: v for k, v in data.items() if not k.isdigit() or int(k) < index}
            try:
                item["evaluated"] = {
                    "method": templates.render(command.get("method"), visible, now=now),
                    "params": templates.render(command.get("params"), visible, now=now),
                }
            except errors.ValidationError as exc:
                item["evaluation_error"] = exc.message
        stages.append(item)
    return stages


async def _tree(
    dashboard: Dashboard, task: Mapping[str, Any], caller: models.Caller
) -> list[dict[str, Any]]:
    """The task's tree (its root and every task under it), nested by parent."""
    root_id = task.get("root_id") or task["id"]
    page = await dashboard.tasks.list(
        conditions=[{"root_id": root_id}, {"id": root_id}],
        sort=["created", "id"],
        limit=TREE_LIMIT,
        count=False,
        columns=TREE_COLUMNS,
        caller=caller,
    )
    rows = page["data"]
    if len(rows) <= 1 and not task.get("parent_id"):
        return []  # a lone task has no tree to show
    children: dict[str | None, list[dict[str, Any]]] = {}
    known = {row["id"] for row in rows}
    for row in rows:
        parent = row["parent_id"] if row["parent_id"] in known else None
        children.setdefault(parent, []).append(row)

    def build(parent: str | None) -> list[dict[str, Any]]:
        return [{"task": row, "children": build(row["id"])} for row in children.get(parent, [])]

    return build(None)


def _walk(nodes: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    found: list[Mapping[str, Any]] = []
    for node in nodes:
        found.append(node)
        found.extend(_walk(node["children"]))
    return found


@_login_required
async def _action(request: web.Request, caller: models.Caller, token: str) -> web.StreamResponse:
    dashboard = request.app[DASHBOARD_KEY]
    task_id = request.match_info["id"]
    action = request.match_info["action"]
    form = await request.post()
    if not hmac.compare_digest(str(form.get("csrf", "")), _csrf(token)):
        raise web.HTTPForbidden(text="bad form token; reload the page")
    origin = request.headers.get("Origin")
    if origin and origin != "null" and urllib.parse.urlsplit(origin).netloc != request.host:
        raise web.HTTPForbidden(text="cross-site form")
    text = str(form.get("data", ""))
    try:
        if action == "reset":
            await dashboard.tasks.reset(task_id, caller=caller)
        elif action == "cancel":
            await dashboard.tasks.cancel(task_id, caller=caller)
        else:
            try:
                data = json.loads(text) if text.strip() else None
            except ValueError as exc:
                raise errors.ValidationError(f"not valid JSON: {exc}", field="data") from None
            await dashboard.tasks.write_message(task_id, data, caller=caller)
    except errors.KaijuTasksError as exc:
        code = {
            errors.ValidationError: 400,
            errors.NotAuthorized: 403,
            errors.TaskNotFound: 404,
        }.get(type(exc), 409)
        return await _task_page(
            request, caller, token, error=exc.message, status=code, message=text
        )
    quoted = urllib.parse.quote(task_id, safe="")
    raise web.HTTPSeeOther(f"/tasks/{quoted}?done={action}")


@_login_required
async def _overview(request: web.Request, caller: models.Caller, token: str) -> web.StreamResponse:
    dashboard = request.app[DASHBOARD_KEY]
    now = dashboard.clock.now()
    context: dict[str, Any] = {"allowed": caller.views_all}
    if caller.views_all:
        series = await dashboard.data.throughput(now)
        context.update(
            series=series,
            chart=_chart(series),
            queues=await dashboard.data.queues(now),
            counts=await dashboard.data.status_counts(),
            statuses=STATUSES,
            alive=sum(
                1
                for w in await dashboard.data.workers(now - ALIVE_WITHIN)
                if w["stopped_at"] is None
            ),
        )
    return _render(request, "overview.html", context, caller=caller, token=token)


def _chart(series: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Bar geometry for the per-minute chart: finished stacked under failed, in SVG units."""
    width, height, gap = 600, 160, 2
    top = max([s["finished"] + s["failed"] for s in series] + [1])
    scale = _nice(top)
    slot = width / max(len(series), 1)
    bars = []
    for i, item in enumerate(series):
        finished_h = height * item["finished"] / scale
        failed_h = height * item["failed"] / scale
        bars.append(
            {
                "x": round(i * slot + gap / 2, 2),
                "w": round(slot - gap, 2),
                "finished_y": round(height - finished_h, 2),
                "finished_h": round(finished_h, 2),
                "failed_y": round(height - finished_h - failed_h, 2),
                "failed_h": round(failed_h, 2),
                "label": (
                    f"{item['minute']:%H:%M}: {item['finished']} finished, {item['failed']} failed"
                ),
            }
        )
    return {"width": width, "height": height, "max": scale, "bars": bars}


def _nice(value: int) -> int:
    """The smallest 1, 2 or 5 times a power of ten that is at least ``value``."""
    power = int(10 ** max(0, math.floor(math.log10(value))))
    for step in (1, 2, 5, 10):
        if step * power >= value:
            return step * power
    return 10 * power


@_login_required
async def _workers(request: web.Request, caller: models.Caller, token: str) -> web.StreamResponse:
    dashboard = request.app[DASHBOARD_KEY]
    now = dashboard.clock.now()
    workers = await dashboard.data.workers(now - WORKERS_SINCE)
    for worker in workers:
        worker["online"] = (
            worker["stopped_at"] is None and now - worker["heartbeat_at"] < ALIVE_WITHIN
        )
    context = {"workers": workers, "show_tasks": caller.views_all}
    return _render(request, "workers.html", context, caller=caller, token=token)


# -- live updates -------------------------------------------------------------------------------


@_login_required
async def _stream(request: web.Request, caller: models.Caller, token: str) -> web.StreamResponse:
    """Server-sent events: one ``message`` per lifecycle event, for pages to refresh."""
    dashboard = request.app[DASHBOARD_KEY]
    hub = dashboard.data.hub
    if hub is None:
        raise web.HTTPNotFound(text="live updates are off")
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-store",
            "X-Accel-Buffering": "no",
        }
    )
    loop = asyncio.get_running_loop()
    quiet_since = loop.time()
    async with hub.subscribe() as queue:
        # Subscribed before the client hears "open": a page refreshes once on open, so what
        # happened between its rendering and now is shown, and everything later arrives here.
        await response.prepare(request)
        await response.write(b"retry: 2000\n: connected\n\n")
        while not _gone(request):
            try:
                event = await asyncio.wait_for(queue.get(), 1.0)
            except TimeoutError:
                if loop.time() - quiet_since < KEEPALIVE:
                    continue  # look again whether the client went away
                payload = b": keepalive\n\n"
            else:
                if event is None:  # the server is shutting down
                    break
                payload = _sse(event, caller)
            quiet_since = loop.time()
            try:
                await response.write(payload)
            except (ConnectionResetError, RuntimeError):
                break
    with contextlib.suppress(ConnectionResetError, RuntimeError):
        await response.write_eof()
    return response


def _gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def _sse(event: Mapping[str, Any], caller: models.Caller) -> bytes:
    if caller.views_all:
        shown = {
            key: event.get(key)
            for key in ("id", "type", "task_id", "status", "stage", "app_name", "executor_id")
        }
    else:  # others learn that something changed, not what: their pages re-read what they see
        shown = {"type": "change"}
    return f"event: change\ndata: {json.dumps(shown, default=str)}\n\n".encode()
