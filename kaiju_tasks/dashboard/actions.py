"""The dashboard's actions on one task: reset, cancel and message.

Actions post the task id in the form body to ``/actions/<action>``, never in the path, so no
character of an id can make the browser post to another task's address. Every form carries the
session's CSRF token and must come from this site.
"""

from __future__ import annotations

import json
import logging

from aiohttp import web

from kaiju_tasks import errors
from kaiju_tasks.dashboard import pages, render, session

# The dashboard's handlers log under one name, the one their records always had.
logger = logging.getLogger("kaiju_tasks.dashboard.views")


@session.login_required
async def action(request: web.Request, auth: render.Auth) -> web.StreamResponse:
    """Reset, cancel or message the task named by the form's ``id`` field.

    The id travels in the body, never in the path, so no character of it can make the browser
    post to another task's address.
    """
    dashboard = request.app[render.DASHBOARD_KEY]
    caller = auth.caller
    action = request.match_info["action"]
    form = await request.post()
    if not session.token_matches(form.get("csrf", ""), render.csrf(auth.secret)):
        raise web.HTTPForbidden(text="bad form token; reload the page")
    if not session.same_origin(request):
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
        return await pages.task_page(
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
        return await pages.task_page(request, auth, task_id, error=why, status=422, message=text)
    raise web.HTTPSeeOther(render.task_url(task_id, done=action))
