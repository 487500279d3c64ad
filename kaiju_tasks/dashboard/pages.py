"""The dashboard's pages: overview, tasks, one task, workers.

A task page never fails because of what the task holds: a stage whose template or condition
cannot be evaluated says so, and a task whose content cannot be formatted at all is shown as the
JSON text stored in the database. Each stage is shown as its kind says (:mod:`kaiju_tasks.stages`).
"""

from __future__ import annotations

import logging
import math
import urllib.parse
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web

from kaiju_tasks import conditions, errors, insights, models, templates
from kaiju_tasks import stages as stage_kinds
from kaiju_tasks.dashboard import render, session
from kaiju_tasks.dashboard.data import TIMELINE_LIMIT

# The dashboard's handlers log under one name, the one their records always had.
logger = logging.getLogger("kaiju_tasks.dashboard.views")


PAGE_SIZE = 50
MAX_PAGE = 100_000
ALIVE_WITHIN = insights.ALIVE_WITHIN
WORKERS_SINCE = timedelta(hours=1)
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


@session.login_required
async def tasks_page(request: web.Request, auth: render.Auth) -> web.StreamResponse:
    """``/tasks``: tasks filtered by status, app, text and creation time, paged on the server."""
    dashboard = request.app[render.DASHBOARD_KEY]
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
    return render.render(request, "tasks.html", context, status=status, auth=auth)


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


@session.login_required
async def task_by_id(request: web.Request, auth: render.Auth) -> web.StreamResponse:
    """``/tasks/{id}``: the page of one task."""
    return await task_page(request, auth, request.match_info["id"])


@session.login_required
async def task_by_query(request: web.Request, auth: render.Auth) -> web.StreamResponse:
    """``/task?id=``: the page of a task whose id cannot be a path segment (``.``, ``..``)."""
    return await task_page(request, auth, request.query.get("id", ""))


async def task_page(
    request: web.Request,
    auth: render.Auth,
    task_id: str,
    *,
    notice: str | None = None,
    error: str | None = None,
    status: int = 200,
    message: str = "",
) -> web.Response:
    """The page of task ``task_id`` (with a notice or error from an action), or "not found"."""
    dashboard = request.app[render.DASHBOARD_KEY]
    caller = auth.caller
    missing = render.render(request, "missing.html", {"task_id": task_id}, status=404, auth=auth)
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
        return render.render(request, "task.html", page, status=status, auth=auth)
    except errors.TaskNotFound:
        return missing
    except Exception as exc:  # noqa: BLE001 - a task's content must never make its page fail
        # Whatever the content did (nested past a recursion limit, undecodable, a value no
        # filter expected), the page still answers: with the JSON as stored in the database.
        logger.warning(
            "Task page shown as stored JSON",
            extra={"event": "dashboard_task_raw", "task_id": task_id, "error": type(exc).__name__},
        )
    raw = await dashboard.data.raw_task(task_id, render.SHOWN_JSON)
    if raw is None:
        return missing
    context = {
        "task": raw,
        "canonical": render.task_url(raw["id"]),
        **_actions(raw["status"], raw.get("user_id"), caller, waits_for_message=False),
        **shown,
    }
    return render.render(request, "task_raw.html", context, status=status, auth=auth)


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
    dashboard: render.Dashboard, task_id: str, created: Any, caller: models.Caller
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
        and stages[task["stage"]]["takes_message"]
    )
    return {
        "task": task,
        "stages": stages,
        **_actions(status_now, task.get("user_id"), caller, waits_for_message=waits_for_message),
        "canonical": render.task_url(task["id"]),
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
    for index, stored in enumerate(commands if isinstance(commands, list) else []):
        kind = stage_kinds.kind_of(stored)  # None: not a stage, or of a kind no entry names
        command = stored if isinstance(stored, Mapping) else {"value": stored}
        item: dict[str, Any] = {
            "index": index,
            "kind": kind.name if kind is not None else command.get("kind"),
            "label": stage_kinds.label(stored),
            "label_is_code": kind is not None and kind.label_is_code,
            "shown": kind.shown if kind is not None else (),
            "takes_message": kind is not None and kind.takes_message,
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
        if kind is not None and kind.templated and index < reached and not item["skipped"]:
            try:
                item["evaluated"] = {
                    field: templates.render(command.get(field), visible, now=now, budget=budget)
                    for field in kind.templated
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
    dashboard: render.Dashboard, task: Mapping[str, Any], caller: models.Caller
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


@session.login_required
async def overview_page(request: web.Request, auth: render.Auth) -> web.StreamResponse:
    """``/``: finished and failed per minute, queues per app, tasks by status."""
    dashboard = request.app[render.DASHBOARD_KEY]
    caller = auth.caller
    now = dashboard.clock.now()
    context: dict[str, Any] = {"allowed": caller.views_all}
    if caller.views_all:
        series = await dashboard.data.throughput(now)
        queues = await dashboard.data.queues(now)
        workers = await dashboard.data.workers(now - ALIVE_WITHIN)
        lost = insights.unserved(
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
    return render.render(request, "overview.html", context, auth=auth)


def _chart(series: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Bar geometry for the per-minute chart: finished stacked under failed, in SVG units."""
    width, height, gap = 600, 160, 2
    top = max([s["finished"] + s["failed"] for s in series] + [1])
    scale = nice(top)
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


def nice(value: int) -> int:
    """The smallest 1, 2 or 5 times a power of ten that is at least ``value``."""
    power = int(10 ** max(0, math.floor(math.log10(value))))
    for step in (1, 2, 5, 10):
        if step * power >= value:
            return step * power
    return 10 * power


@session.login_required
async def workers_page(request: web.Request, auth: render.Auth) -> web.StreamResponse:
    """``/workers``: the executors seen in the last hour."""
    dashboard = request.app[render.DASHBOARD_KEY]
    caller = auth.caller
    now = dashboard.clock.now()
    context: dict[str, Any] = {"allowed": caller.views_all, "workers": []}
    if caller.views_all:  # hosts, pids and what runs where are cluster-wide figures
        workers = await dashboard.data.workers(now - WORKERS_SINCE)
        for worker in workers:
            worker["online"] = insights.alive(worker, alive_since=now - ALIVE_WITHIN)
        context["workers"] = workers
    return render.render(request, "workers.html", context, auth=auth)
