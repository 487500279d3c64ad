"""The dashboard's pages, actions, login and live stream, as aiohttp handlers.

Pages are rendered on the server (Jinja2, autoescaped) and work without JavaScript; a small
static script follows ``GET /stream`` (server-sent events) and swaps in the page's live part
(``?partial=1``) when something changed, so nothing reloads; the live part holds a task's action
buttons too, so they always match the status shown.

Callers log in with an API token. The token itself never goes into a cookie: a login starts a
server-side session (:meth:`DashboardData.start_session`) and the HttpOnly, SameSite=Strict
cookie holds only the session's random id. Logging out deletes the session, a revoked token ends
its sessions, and a session ends after ``SESSION_IDLE`` without a request (or
``SESSION_LIFETIME`` after the login). Every form carries a CSRF token derived from the session.

A task id may hold any character, ``/``, ``?``, ``#``, ``%`` and ``..`` included: links name a
task with :func:`task_url` (every character outside the unreserved set percent-encoded; the ids
``.`` and ``..``, which a browser would resolve as path steps whatever their encoding, go in the
query of ``/task?id=``), and actions post the id in the form body to ``/actions/<action>``.

A task page never fails because of what the task holds: a stage whose template or condition
cannot be evaluated says so, and a task whose content cannot be formatted at all is shown as the
JSON text stored in the database.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import hashlib
import hmac
import json
import logging
import math
import secrets
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import jinja2
from aiohttp import web

from kaiju_tasks import clock as clock_
from kaiju_tasks import conditions, errors, models, monitor, templates
from kaiju_tasks.dashboard.data import TIMELINE_LIMIT, DashboardData, EventHub
from kaiju_tasks.rpc.server import bearer_token
from kaiju_tasks.service import TaskService, TokenService

logger = logging.getLogger(__name__)

COOKIE = "kaiju_tasks_session"
"""The session cookie: a random session id (``secrets.token_urlsafe(32)``), never a token."""
SESSION_ID_CHARS = 64  # longer cookie values are not session ids: no database lookup
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


def setup(app: web.Application, dashboard: Dashboard) -> None:
    """Add the dashboard's routes to ``app`` (pages at ``/``, assets at ``/static``)."""
    app[DASHBOARD_KEY] = dashboard
    app.router.add_get("/", _overview)
    app.router.add_get("/tasks", _tasks)
    app.router.add_get("/tasks/{id}", _task)
    app.router.add_get("/task", _task_by_query)
    app.router.add_post("/actions/{action:reset|cancel|message}", _action)
    app.router.add_get("/workers", _workers)
    app.router.add_get("/login", _login_form)
    app.router.add_post("/login", _login)
    app.router.add_post("/logout", _logout)
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


def _csrf(secret: str) -> str:
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


async def _caller(request: web.Request) -> Auth | None:
    dashboard = request.app[DASHBOARD_KEY]
    session_id = request.cookies.get(COOKIE)
    if session_id and len(session_id) <= SESSION_ID_CHARS:
        found = await dashboard.data.session(session_id, now=dashboard.clock.now())
        if found is not None:
            caller = models.Caller.user(found["user_id"], found["permissions"])
            return Auth(caller, session_id, f"token:{found['token_id']}")
    token = bearer_token(request)  # scripts may send the API token in a header instead
    if token is None:
        return None
    try:
        caller = await dashboard.tokens.authenticate(token)
    except errors.NotAuthorized:
        return None
    return Auth(caller, token, "bearer:" + hashlib.sha256(token.encode()).hexdigest())


Handler = Callable[[web.Request, Auth], Awaitable[web.StreamResponse]]


def _login_required(handler: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def wrapped(request: web.Request) -> web.StreamResponse:
        found = await _caller(request)
        if found is None:
            if request.query.get("partial") or request.path == "/stream":
                raise web.HTTPUnauthorized(text="log in again")
            # The path as sent: decoded, an id's "%2F.." would become a step up the path.
            target = urllib.parse.quote(request.rel_url.raw_path_qs, safe="")
            raise web.HTTPSeeOther(f"/login?next={target}")
        return await handler(request, found)

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
    refused = _render(
        request,
        "login.html",
        {"next": target, "error": "That token is not valid or has been revoked."},
        status=401,
    )
    try:
        await dashboard.tokens.authenticate(token)
    except errors.NotAuthorized:
        return refused
    session_id = secrets.token_urlsafe(32)
    now = dashboard.clock.now()
    if not await dashboard.data.start_session(session_id, token, now=now):
        return refused  # revoked between the check and the session
    old = request.cookies.get(COOKIE)
    if old and len(old) <= SESSION_ID_CHARS:
        await dashboard.data.end_session(old)  # a new login replaces this browser's session
    response = web.HTTPSeeOther(target)
    response.set_cookie(
        COOKIE, session_id, httponly=True, samesite="Strict", secure=_secure(request), path="/"
    )
    raise response


async def _logout(request: web.Request) -> web.StreamResponse:
    dashboard = request.app[DASHBOARD_KEY]
    found = await _caller(request)
    form = await request.post()
    if found is not None and not _token_matches(form.get("csrf", ""), _csrf(found.secret)):
        raise web.HTTPForbidden(text="bad form token; reload the page")
    session_id = request.cookies.get(COOKIE)
    if found is not None and session_id == found.secret:
        await dashboard.data.end_session(session_id)
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
    auth: Auth | None = None,
) -> web.Response:
    dashboard = request.app[DASHBOARD_KEY]
    partial = bool(request.query.get("partial"))
    template = dashboard.env.get_template(name)
    caller = auth.caller if auth else None
    values = {
        "user": caller.user_id if caller else None,
        "system": bool(caller and caller.is_system),
        "csrf": _csrf(auth.secret) if auth else "",
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
                try:
                    created["lt"] = (moment + timedelta(seconds=1)).isoformat()
                except OverflowError:  # the last second there is: nothing comes after it
                    created["le"] = moment.isoformat()
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
async def _tasks(request: web.Request, auth: Auth) -> web.StreamResponse:
    dashboard = request.app[DASHBOARD_KEY]
    caller = auth.caller
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
    return _render(request, "tasks.html", context, status=status, auth=auth)


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
async def _task(request: web.Request, auth: Auth) -> web.StreamResponse:
    return await _task_page(request, auth, request.match_info["id"])


@_login_required
async def _task_by_query(request: web.Request, auth: Auth) -> web.StreamResponse:
    """``/task?id=``: the page of a task whose id cannot be a path segment (``.``, ``..``)."""
    return await _task_page(request, auth, request.query.get("id", ""))


async def _task_page(
    request: web.Request,
    auth: Auth,
    task_id: str,
    *,
    notice: str | None = None,
    error: str | None = None,
    status: int = 200,
    message: str = "",
) -> web.Response:
    dashboard = request.app[DASHBOARD_KEY]
    caller = auth.caller
    missing = _render(request, "missing.html", {"task_id": task_id}, status=404, auth=auth)
    if not task_id or "\x00" in task_id:
        return missing
    try:
        # May the caller see it? Asked through a listing of chosen columns, which reads none of
        # the task's JSON: this answers even for a task whose content cannot be decoded.
        found = await dashboard.tasks.list(
            conditions={"id": task_id},
            columns=["id", "created"],
            limit=1,
            count=False,
            caller=caller,
        )
    except errors.ValidationError:
        return missing
    if not found["data"]:
        return missing
    done = request.query.get("done")
    if notice is None and done in ("reset", "cancel", "message"):
        notice = {
            "reset": "Task reset: it will run again from its first stage.",
            "cancel": "Task cancelled.",
            "message": "Message delivered.",
        }[done]
    shown = {"notice": notice, "error": error, "message": message}
    try:
        context = await _task_context(dashboard, task_id, found["data"][0]["created"], caller)
        page = {**context, **shown}
        if message:  # a refused message stays in its form, to be fixed and sent again
            page["can_message"] = True
        return _render(request, "task.html", page, status=status, auth=auth)
    except errors.TaskNotFound:
        return missing
    except Exception as exc:  # noqa: BLE001 - a task's content must never make its page fail
        # Whatever the content did (nested past a recursion limit, undecodable, a value no
        # filter expected), the page still answers: with the JSON as stored in the database.
        logger.warning(
            "Task page shown as stored JSON",
            extra={"event": "dashboard_task_raw", "task_id": task_id, "error": type(exc).__name__},
        )
    raw = await dashboard.data.raw_task(task_id, SHOWN_JSON)
    if raw is None:
        return missing
    context = {
        "task": raw,
        "canonical": task_url(raw["id"]),
        **_actions(raw["status"], raw.get("user_id"), caller, waits_for_message=False),
        **shown,
    }
    return _render(request, "task_raw.html", context, status=status, auth=auth)


def _actions(
    status: str, owner: str | None, caller: models.Caller, *, waits_for_message: bool
) -> dict[str, bool]:
    """The actions offered for a task in ``status``: what the page shows is what it offers."""
    return {
        "can_modify": caller.modifies_all or (owner is not None and owner == caller.user_id),
        "can_reset": status != "EXECUTED",
        "can_cancel": status not in ("FINISHED", "FAILED"),
        "can_message": waits_for_message,
    }


async def _task_context(
    dashboard: Dashboard, task_id: str, created: Any, caller: models.Caller
) -> dict[str, Any]:
    # Events since the task was created, so the events of an earlier task deleted under the
    # same id never show.
    timeline = await dashboard.data.timeline(task_id, since=created)
    # Read after the events: each event is written with its transition, so the task is at
    # least as new as its timeline (never a failure listed on a running task).
    task = await dashboard.tasks.get(task_id, caller=caller)
    tree = await _tree(dashboard, task, caller)
    stages = _stages(task, dashboard.clock.now())
    status_now = task["status"]
    waits_for_message = (
        status_now == "WAITING"
        and task["stage"] < len(stages)
        and stages[task["stage"]]["kind"] == "message"
    )
    return {
        "task": task,
        "stages": stages,
        **_actions(status_now, task.get("user_id"), caller, waits_for_message=waits_for_message),
        "canonical": task_url(task["id"]),
        "timeline": timeline,
        "timeline_cut": len(timeline) >= TIMELINE_LIMIT,
        "tree": tree,
        "tree_ids": [node["task"]["id"] for node in tree],
    }


def _stages(task: Mapping[str, Any], now: datetime) -> list[dict[str, Any]]:
    """Each stage as written and, once it has run or runs, as evaluated from stored results.

    Evaluated here and now, as the executor would from the same results: ``executor`` data is
    not known here (a template that needs it says so), and ``now``/``uuid4`` helpers give
    today's values, not the ones the stage got. Each stage's condition and templates are
    evaluated at most once per view. Whatever the evaluation raises is shown on the stage,
    never a failed page.
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
    commands = task.get("commands")
    # One work allowance for the whole page, as much as the executor has for one stage: a view
    # costs a bounded time however many stages the task has.
    budget = templates.Budget()
    for index, command in enumerate(commands if isinstance(commands, list) else []):
        if not isinstance(command, Mapping):
            command = {"kind": "unknown", "value": command}
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
            "condition_error": None,
            "skipped": False,
        }
        # Only results of earlier stages are visible to a stage, as in the executor.
        visible = {k: v for k, v in data.items() if not k.isdigit() or int(k) < index}
        condition = command.get("condition")
        if condition is not None and index < len(done) and done[index] is None:
            try:
                item["skipped"] = not conditions.evaluate(
                    condition, visible, now=now, budget=budget
                )
            except Exception as exc:  # noqa: BLE001 - shown on the stage, never a failed page
                item["condition_error"] = _failure(exc)
        if kind == "call" and index < reached and not item["skipped"]:
            try:
                item["evaluated"] = {
                    "method": templates.render(
                        command.get("method"), visible, now=now, budget=budget
                    ),
                    "params": templates.render(
                        command.get("params"), visible, now=now, budget=budget
                    ),
                }
            except Exception as exc:  # noqa: BLE001 - shown on the stage, never a failed page
                item["evaluation_error"] = _failure(exc)
        stages.append(item)
    return stages


def _failure(exc: Exception) -> str:
    """What to say about a stage that cannot be evaluated here."""
    if isinstance(exc, errors.KaijuTasksError):
        return exc.message
    if isinstance(exc, RecursionError):
        return "nested too deeply to evaluate here"
    return f"evaluation failed ({type(exc).__name__})"


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
async def _action(request: web.Request, auth: Auth) -> web.StreamResponse:
    """Reset, cancel or message the task named by the form's ``id`` field.

    The id travels in the body, never in the path, so no character of it can make the browser
    post to another task's address.
    """
    dashboard = request.app[DASHBOARD_KEY]
    caller = auth.caller
    action = request.match_info["action"]
    form = await request.post()
    if not _token_matches(form.get("csrf", ""), _csrf(auth.secret)):
        raise web.HTTPForbidden(text="bad form token; reload the page")
    if not _same_origin(request):
        raise web.HTTPForbidden(text="cross-site form")
    task_id = form.get("id")
    if not isinstance(task_id, str) or not task_id:
        raise web.HTTPBadRequest(text="the form names no task; reload the page")
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
            request, auth, task_id, error=exc.message, status=code, message=text
        )
    except Exception as exc:  # noqa: BLE001 - a task's content must never make a page fail
        # The statement may have applied: what failed is reading the task back (content no
        # decoder accepts, such as JSON written to the database by hand). Say so, and show it.
        logger.warning(
            "Dashboard action could not read the task back",
            extra={
                "event": "dashboard_action_unreadable",
                "task_id": task_id,
                "action": action,
                "error": type(exc).__name__,
            },
        )
        why = (
            f"The {action} may or may not have been applied: this task's stored content"
            f" cannot be read back ({type(exc).__name__}). The page shows the task as it is now."
        )
        return await _task_page(request, auth, task_id, error=why, status=422, message=text)
    raise web.HTTPSeeOther(task_url(task_id, done=action))


@_login_required
async def _overview(request: web.Request, auth: Auth) -> web.StreamResponse:
    dashboard = request.app[DASHBOARD_KEY]
    caller = auth.caller
    now = dashboard.clock.now()
    context: dict[str, Any] = {"allowed": caller.views_all}
    if caller.views_all:
        series = await dashboard.data.throughput(now)
        queues = await dashboard.data.queues(now)
        workers = await dashboard.data.workers(now - ALIVE_WITHIN)
        lost = monitor.unserved(
            {q["app_name"]: q["queued"] for q in queues}, workers, alive_since=now - ALIVE_WITHIN
        )
        context.update(
            series=series,
            chart=_chart(series),
            queues=queues,
            unserved=[q for q in queues if q["app_name"] in lost],
            counts=await dashboard.data.status_counts(),
            statuses=STATUSES,
            alive=sum(1 for w in workers if w["stopped_at"] is None),
        )
    return _render(request, "overview.html", context, auth=auth)


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
async def _workers(request: web.Request, auth: Auth) -> web.StreamResponse:
    dashboard = request.app[DASHBOARD_KEY]
    caller = auth.caller
    now = dashboard.clock.now()
    context: dict[str, Any] = {"allowed": caller.views_all, "workers": []}
    if caller.views_all:  # hosts, pids and what runs where are cluster-wide figures
        workers = await dashboard.data.workers(now - WORKERS_SINCE)
        for worker in workers:
            worker["online"] = (
                worker["stopped_at"] is None and now - worker["heartbeat_at"] < ALIVE_WITHIN
            )
        context["workers"] = workers
    return _render(request, "workers.html", context, auth=auth)


# -- live updates -------------------------------------------------------------------------------


@_login_required
async def _stream(request: web.Request, auth: Auth) -> web.StreamResponse:
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
