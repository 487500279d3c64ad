"""The dashboard's pages, actions, login and live stream, as aiohttp handlers.

Pages are rendered on the server (Jinja2, autoescaped) and work without JavaScript; a small
static script follows ``GET /stream`` (server-sent events) and swaps in the page's live part
(``?partial=1``) when something changed, so nothing reloads. Callers log in with an API token,
kept in an HttpOnly, SameSite=Strict cookie; every form carries a CSRF token derived from it.
"""

from __future__ import annotations

import asyncio
import collections
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
from kaiju_tasks import conditions, errors, models, templates
from kaiju_tasks.dashboard.data import TIMELINE_LIMIT, DashboardData, EventHub
from kaiju_tasks.rpc.server import bearer_token
from kaiju_tasks.service import TaskService, TokenService

logger = logging.getLogger(__name__)

COOKIE = "kaiju_tasks_session"
PAGE_SIZE = 50
MAX_PAGE = 100_000
ALIVE_WITHIN = timedelta(seconds=30)
WORKERS_SINCE = timedelta(hours=1)
KEEPALIVE = 15.0  # seconds between comments on an idle stream
MAX_STREAMS = 20  # live pages open at once per token
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
        self.streams: collections.Counter[str] = collections.Counter()
        """Open live streams by token (hashed), to cap them."""
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
    token = request.cookies.get(COOKIE) or bearer_token(request)
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
    """Only a path on this server.

    Never ``//host``, ``scheme:`` or anything a browser or URL library could turn into one
    (backslashes, control characters such as a tab).
    """
    if (
        not value
        or not value.startswith("/")
        or value.startswith("//")
        or "\\" in value
        or any(ord(c) < 0x20 or ord(c) == 0x7F for c in value)
    ):
        return "/"
    parsed = urllib.parse.urlsplit(value)
    if parsed.scheme or parsed.netloc or not parsed.path.startswith("/"):
        return "/"
    return value


def _same_origin(request: web.Request) -> bool:
    """False when the browser says the form came from another site."""
    origin = request.headers.get("Origin")
    if not origin or origin == "null":
        return True  # no Origin sent: SameSite=Strict and the form token still apply
    return urllib.parse.urlsplit(origin).netloc == request.host


def _token_matches(given: object, expected: str) -> bool:
    return hmac.compare_digest(str(given).encode(), expected.encode())


def _secure(request: web.Request) -> bool:
    """HTTPS here or at a proxy in front (a spoofed header only makes the cookie stricter)."""
    return request.secure or request.headers.get("X-Forwarded-Proto", "").lower() == "https"


async def _login_form(request: web.Request) -> web.StreamResponse:
    return _render(
        request, "login.html", {"next": _safe_next(request.query.get("next")), "error": None}
    )


async def _login(request: web.Request) -> web.StreamResponse:
    dashboard = request.app[DASHBOARD_KEY]
    if not _same_origin(request):
        raise web.HTTPForbidden(text="cross-site form")
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
        COOKIE, token, httponly=True, samesite="Strict", secure=_secure(request), path="/"
    )
    raise response


async def _logout(request: web.Request) -> web.StreamResponse:
    found = await _caller(request)
    form = await request.post()
    if found is not None and not _token_matches(form.get("csrf", ""), _csrf(found[1])):
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


SHOWN_EVENT = 2_000  # characters of an event's details shown in a timeline row


def _compact(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    if len(text) <= SHOWN_EVENT:
        return text
    return f"{text[:SHOWN_EVENT]} … (cut: {len(text):,} characters in all)"


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
    for key, value in shown.items():
        if "\x00" in value:
            raise _BadFilter(f"{key}: NUL characters are not allowed")
    base: dict[str, Any] = {}
    if shown["status"]:
        if shown["status"] not in STATUSES:
            raise _BadFilter(f"unknown status {shown['status']!r}")
        base["status"] = shown["status"]
    if shown["app"]:
        base["app_name"] = shown["app"]
    created: dict[str, str] = {}
    for key in ("since", "until"):
        if shown[key]:
            try:
                moment = datetime.fromisoformat(shown[key])
            except ValueError:
                raise _BadFilter(f"{key}: {shown[key]!r} is not a date and time") from None
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=UTC)
            if key == "since":
                created["ge"] = moment.isoformat()
            elif moment.microsecond:
                created["le"] = moment.isoformat()
            else:  # "to 10:00:00" takes in the whole second, as the table shows whole seconds
                created["lt"] = (moment + timedelta(seconds=1)).isoformat()
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
        page_number = min(max(1, int(request.query.get("page", "1"))), MAX_PAGE)
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
        try:
            page = await dashboard.tasks.list(
                conditions=conditions,
                sort=[{"desc": "created"}, {"desc": "id"}],
                offset=(page_number - 1) * PAGE_SIZE,
                limit=PAGE_SIZE,
                columns=LIST_COLUMNS,
                caller=caller,
            )
        except errors.ValidationError as exc:
            context["error"] = exc.message
            status = 400
        else:
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
        "prev": link(min(current - 1, pages)) if current > 1 else None,
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
    missing = _render(
        request, "missing.html", {"task_id": task_id}, status=404, caller=caller, token=token
    )
    if "\x00" in task_id:
        return missing
    try:
        # May the caller see it? Only then read its events: those since it was created, so
        # the events of an earlier task deleted under the same id never show.
        seen = await dashboard.tasks.get(task_id, ["created"], caller=caller)
        timeline = await dashboard.data.timeline(task_id, since=seen["created"])
        # Read again after the events: each event is written with its transition, so the task
        # is at least as new as its timeline (never a failure listed on a running task).
        task = await dashboard.tasks.get(task_id, caller=caller)
    except (errors.TaskNotFound, errors.ValidationError):
        return missing
    done = request.query.get("done")
    if notice is None and done in ("reset", "cancel", "message"):
        notice = {
            "reset": "Task reset: it will run again from its first stage.",
            "cancel": "Task cancelled.",
            "message": "Message delivered.",
        }[done]
    tree = await _tree(dashboard, task, caller)
    stages = _stages(task, dashboard.clock.now())
    status_now = task["status"]
    waits_for_message = (
        status_now == "WAITING"
        and task["stage"] < len(stages)
        and stages[task["stage"]]["kind"] == "message"
    )
    context = {
        "task": task,
        "stages": stages,
        "can_modify": caller.modifies_all or task.get("user_id") == caller.user_id,
        "can_reset": status_now != "EXECUTED",
        "can_cancel": status_now not in ("FINISHED", "FAILED"),
        "can_message": waits_for_message or bool(message),
        "canonical": "/tasks/" + urllib.parse.quote(task["id"], safe=""),
        "timeline": timeline,
        "timeline_cut": len(timeline) >= TIMELINE_LIMIT,
        "tree": tree,
        "tree_ids": [node["task"]["id"] for node in tree],
        "notice": notice,
        "error": error,
        "message": message,
    }
    return _render(request, "task.html", context, status=status, caller=caller, token=token)


def _stages(task: Mapping[str, Any], now: datetime) -> list[dict[str, Any]]:
    """Each stage as written and, once it has run or runs, as evaluated from stored results.

    Evaluated here and now, as the executor would from the same results: ``executor`` data is
    not known here (a template that needs it says so), and ``now``/``uuid4`` helpers give
    today's values, not the ones the stage got.
    """
    results = task.get("result")
    done = results if isinstance(results, list) else []
    data: dict[str, Any] = {"id": task["id"], "kws": task.get("kws") or {}, "executor": {}}
    for index, value in enumerate(done):
        data[str(index)] = value
    current = task.get("stage") or 0
    status = task.get("status")
    if status == "FINISHED":
        reached = len(done)
    elif status in ("EXECUTED", "WAITING", "FAILED"):
        reached = current + 1  # the current stage runs, waits or failed
    else:
        reached = current  # QUEUED, IDLE, SUSPENDED: the current stage has not started (again)
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
            "skipped": False,
        }
        # Only results of earlier stages are visible to a stage, as in the executor.
        visible = {k: v for k, v in data.items() if not k.isdigit() or int(k) < index}
        condition = command.get("condition")
        if condition is not None and index < len(done) and done[index] is None:
            with contextlib.suppress(errors.ValidationError):
                item["skipped"] = not conditions.evaluate(condition, visible, now=now)
        if kind == "call" and index < reached and not item["skipped"]:
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
    """The task's tree (its root and every task under it) in depth-first order.

    Each entry is ``{"task": row, "depth": n}``; empty for a task alone. Built iteratively, so
    a tree of any depth renders.
    """
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
    flat: list[dict[str, Any]] = []
    stack = [(row, 0) for row in reversed(children.get(None, []))]
    while stack:
        row, depth = stack.pop()
        flat.append({"task": row, "depth": depth})
        stack.extend((child, depth + 1) for child in reversed(children.get(row["id"], [])))
    return flat


@_login_required
async def _action(request: web.Request, caller: models.Caller, token: str) -> web.StreamResponse:
    dashboard = request.app[DASHBOARD_KEY]
    task_id = request.match_info["id"]
    action = request.match_info["action"]
    form = await request.post()
    if not _token_matches(form.get("csrf", ""), _csrf(token)):
        raise web.HTTPForbidden(text="bad form token; reload the page")
    if not _same_origin(request):
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
    context: dict[str, Any] = {"allowed": caller.views_all, "workers": []}
    if caller.views_all:  # hosts, pids and what runs where are cluster-wide figures
        workers = await dashboard.data.workers(now - WORKERS_SINCE)
        for worker in workers:
            worker["online"] = (
                worker["stopped_at"] is None and now - worker["heartbeat_at"] < ALIVE_WITHIN
            )
        context["workers"] = workers
    return _render(request, "workers.html", context, caller=caller, token=token)


# -- live updates -------------------------------------------------------------------------------


@_login_required
async def _stream(request: web.Request, caller: models.Caller, token: str) -> web.StreamResponse:
    """Server-sent events: one ``message`` per lifecycle event, for pages to refresh."""
    dashboard = request.app[DASHBOARD_KEY]
    hub = dashboard.data.hub
    if hub is None:
        raise web.HTTPNotFound(text="live updates are off")
    holder = hashlib.sha256(token.encode()).hexdigest()
    if dashboard.streams[holder] >= MAX_STREAMS:
        raise web.HTTPTooManyRequests(text=f"at most {MAX_STREAMS} live pages per token")
    dashboard.streams[holder] += 1
    try:
        return await _follow(request, dashboard, hub, caller)
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
                if await _caller(request) is None:
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
