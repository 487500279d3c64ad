"""Who is logged in: sessions, the login and logout forms, and the checks every form passes.

Callers log in with an API token. The token itself never goes into a cookie: a login starts a
server-side session (:meth:`DashboardData.start_session`) and the HttpOnly, SameSite=Strict
cookie holds only the session's random id. Logging out deletes the session, a revoked token ends
its sessions, and a session ends after ``SESSION_IDLE`` without a request (or
``SESSION_LIFETIME`` after the login). Scripts may send the API token as a bearer token instead.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import urllib.parse
from collections.abc import Awaitable, Callable

from aiohttp import web

from kaiju_tasks import errors, models
from kaiju_tasks.dashboard import render
from kaiju_tasks.rpc.auth import bearer_token

logger = logging.getLogger(__name__)


COOKIE = "kaiju_tasks_session"
"""The session cookie: a random session id (``secrets.token_urlsafe(32)``), never a token."""
SESSION_ID_CHARS = 64  # longer cookie values are not session ids: no database lookup


async def caller(request: web.Request) -> render.Auth | None:
    """Who sent ``request``: its session cookie, or a bearer token; None when neither holds."""
    dashboard = request.app[render.DASHBOARD_KEY]
    session_id = request.cookies.get(COOKIE)
    if session_id and len(session_id) <= SESSION_ID_CHARS:
        found = await dashboard.data.session(session_id, now=dashboard.clock.now())
        if found is not None:
            caller = models.Caller.user(found["user_id"], found["permissions"])
            return render.Auth(caller, session_id, f"token:{found['token_id']}")
    token = bearer_token(request)  # scripts may send the API token in a header instead
    if token is None:
        return None
    try:
        caller = await dashboard.tokens.authenticate(token)
    except errors.NotAuthorized:
        return None
    return render.Auth(caller, token, "bearer:" + hashlib.sha256(token.encode()).hexdigest())


Handler = Callable[[web.Request, render.Auth], Awaitable[web.StreamResponse]]


def login_required(handler: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """Call ``handler`` with who is logged in; send anyone else to the login form."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        found = await caller(request)
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


def same_origin(request: web.Request) -> bool:
    """False when the browser says the form came from another site."""
    origin = request.headers.get("Origin")
    if not origin or origin == "null":
        return True  # no Origin sent: SameSite=Strict and the form token still apply
    return urllib.parse.urlsplit(origin).netloc == request.host


def token_matches(given: object, expected: str) -> bool:
    """Whether a form echoes the expected token (compared in constant time)."""
    return hmac.compare_digest(str(given).encode(), expected.encode())


def _secure(request: web.Request) -> bool:
    """HTTPS here or at a proxy in front (a spoofed header only makes the cookie stricter)."""
    return request.secure or request.headers.get("X-Forwarded-Proto", "").lower() == "https"


async def login_form(request: web.Request) -> web.StreamResponse:
    """``GET /login``."""
    return render.render(
        request, "login.html", {"next": _safe_next(request.query.get("next")), "error": None}
    )


async def login(request: web.Request) -> web.StreamResponse:
    """``POST /login``: check the API token and start a session."""
    dashboard = request.app[render.DASHBOARD_KEY]
    if not same_origin(request):
        raise web.HTTPForbidden(text="cross-site form")
    form = await request.post()
    token = str(form.get("token", "")).strip()
    target = _safe_next(str(form.get("next", "/")))
    refused = render.render(
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


async def logout(request: web.Request) -> web.StreamResponse:
    """``POST /logout``: end the session."""
    dashboard = request.app[render.DASHBOARD_KEY]
    found = await caller(request)
    form = await request.post()
    if found is not None and not token_matches(form.get("csrf", ""), render.csrf(found.secret)):
        raise web.HTTPForbidden(text="bad form token; reload the page")
    session_id = request.cookies.get(COOKIE)
    if found is not None and session_id == found.secret:
        await dashboard.data.end_session(session_id)
    response = web.HTTPSeeOther("/login")
    response.del_cookie(COOKIE, path="/")
    raise response
