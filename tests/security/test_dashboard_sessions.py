"""Issue 10, row 11: dashboard sessions are server-side; logging out ends them.

The cookie once held the raw API token, so a cookie replayed after logout still logged in. Now it
holds a random session id whose SHA-256 is kept in ``dashboard_sessions``: logout deletes the
row, a revoked token ends its sessions, sessions expire (idle and absolute), each token keeps at
most ``SESSIONS_PER_TOKEN``, and every server process on the database shares them.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from aiohttp import web

from kaiju_tasks import methods
from kaiju_tasks.dashboard import data as dashboard_data
from kaiju_tasks.dashboard import views
from kaiju_tasks.dashboard.views import COOKIE, _csrf
from kaiju_tasks.rpc import server as rpc_server
from kaiju_tasks.service import NotificationService, TaskService, TokenService
from kaiju_tasks.store import postgres
from kaiju_tasks.testing import FrozenClock
from tests.integration import test_dashboard_http as http

Client = http.Client


def _web_app(store: postgres.PostgresEngineStore, dsn: str, clock: Any = None) -> web.Application:
    """The API with the dashboard, as ``kaiju-tasks serve`` builds it, on its own pool."""

    async def health() -> dict[str, Any]:
        return {"database": True}

    api = rpc_server.Api(
        tasks=TaskService(store),
        notifications=NotificationService(store),
        tokens=TokenService(store),
        methods=methods.Methods(),
        health=health,
    )
    app = rpc_server.create_app(api)
    data = dashboard_data.DashboardData(store.pool, dsn)
    views.setup(app, views.Dashboard(api.tasks, api.tokens, data, clock=clock))
    return app


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock()


@pytest.fixture
async def client(
    store: postgres.PostgresEngineStore, dsn: str, clock: FrozenClock, aiohttp_client: Any
) -> Client:
    made: Client = await aiohttp_client(_web_app(store, dsn, clock))
    return made


@pytest.fixture
async def token(store: postgres.PostgresEngineStore) -> dict[str, Any]:
    created: dict[str, Any] = await TokenService(store).create("root", ["system"], "sessions")
    return created


async def _login(client: Client, token: str, **headers: str) -> str:
    response = await client.post(
        "/login", data={"token": token}, headers=headers, allow_redirects=False
    )
    assert response.status == 303, await response.text()
    session_id: str = response.cookies[COOKIE].value
    client.session.cookie_jar.clear()  # each request below names its session itself
    return session_id


async def _logged_in(client: Client, session_id: str) -> bool:
    """Whether the cookie logs in: the tasks page, or a redirect to the login form."""
    response = await client.get("/tasks", headers=http._cookie(session_id), allow_redirects=False)
    assert response.status in (200, 303)
    if response.status == 303:
        assert response.headers["Location"].startswith("/login?next=")
    return response.status == 200


async def _rows(store: postgres.PostgresEngineStore, token_id: int | None = None) -> int:
    async with store.pool.acquire() as connection:
        count: int = await connection.fetchval(
            "SELECT count(*) FROM dashboard_sessions WHERE $1::bigint IS NULL OR token_id = $1",
            token_id,
        )
    return count


async def test_logout_then_replaying_the_old_cookie_is_refused(
    client: Client, token: dict[str, Any], store: postgres.PostgresEngineStore
) -> None:
    session_id = await _login(client, token["token"])
    assert await _logged_in(client, session_id)
    logout = await client.post(
        "/logout",
        data={"csrf": _csrf(session_id)},
        headers=http._cookie(session_id),
        allow_redirects=False,
    )
    assert logout.status == 303
    assert f'{COOKIE}=""' in logout.headers["Set-Cookie"]
    # The old cookie, replayed: no page, no live part, no stream, no action.
    assert not await _logged_in(client, session_id)
    headers = http._cookie(session_id)
    assert (await client.get("/tasks?partial=1", headers=headers)).status == 401
    assert (await client.get("/stream", headers=headers)).status == 401
    task = await TaskService(store).create(http._task())
    assert isinstance(task, dict)
    action = await client.post(
        "/actions/cancel",
        data={"csrf": _csrf(session_id), "id": task["id"]},
        headers=headers,
        allow_redirects=False,
    )
    assert action.status == 303
    assert action.headers["Location"].startswith("/login")
    assert (await TaskService(store).get(task["id"], ["status"]))["status"] == "QUEUED"
    assert await _rows(store) == 0  # the session is gone from the database
    # The token itself still works: it logs in again, with a new session.
    again = await _login(client, token["token"])
    assert again != session_id
    assert await _logged_in(client, again)


async def test_the_cookie_holds_a_random_session_id_never_the_token(
    client: Client, token: dict[str, Any], store: postgres.PostgresEngineStore
) -> None:
    response = await client.post("/login", data={"token": token["token"]}, allow_redirects=False)
    cookie = response.headers["Set-Cookie"]
    session_id = response.cookies[COOKIE].value
    client.session.cookie_jar.clear()
    assert token["token"] not in cookie
    assert len(session_id) == 43  # secrets.token_urlsafe(32)
    assert "HttpOnly" in cookie
    assert "SameSite=Strict" in cookie
    assert "Path=/" in cookie
    assert "Secure" not in cookie  # this request came over plain http
    async with store.pool.acquire() as connection:
        stored = await connection.fetchval("SELECT id_hash FROM dashboard_sessions")
    assert stored == hashlib.sha256(session_id.encode()).hexdigest()  # never the id itself
    # A cookie holding a raw API token (as the dashboard once set) logs nobody in.
    assert not await _logged_in(client, token["token"])


async def test_the_cookie_is_secure_when_the_request_came_over_https(
    client: Client, token: dict[str, Any]
) -> None:
    response = await client.post(
        "/login",
        data={"token": token["token"]},
        headers={"X-Forwarded-Proto": "https"},
        allow_redirects=False,
    )
    assert "Secure" in response.headers["Set-Cookie"]


async def test_a_revoked_token_ends_its_sessions(
    client: Client, token: dict[str, Any], store: postgres.PostgresEngineStore
) -> None:
    tokens = TokenService(store)
    other = await tokens.create("other", [], "stays")
    first = await _login(client, token["token"])
    second = await _login(client, token["token"])
    kept = await _login(client, other["token"])
    await tokens.revoke(token["id"])
    assert not await _logged_in(client, first)
    assert not await _logged_in(client, second)
    assert await _logged_in(client, kept)
    await _login(client, other["token"])  # each login prunes ended sessions
    assert await _rows(store, token["id"]) == 0
    refused = await client.post("/login", data={"token": token["token"]}, allow_redirects=False)
    assert refused.status == 401


async def test_sessions_expire_when_idle_and_after_their_lifetime(
    client: Client, token: dict[str, Any], clock: FrozenClock
) -> None:
    idle = dashboard_data.SESSION_IDLE
    session_id = await _login(client, token["token"])
    clock.advance(idle - timedelta(minutes=5))
    assert await _logged_in(client, session_id)  # used: its idle expiry moves on
    clock.advance(idle - timedelta(minutes=5))
    assert await _logged_in(client, session_id)
    clock.advance(idle + timedelta(seconds=1))  # then left alone longer than the idle time
    assert not await _logged_in(client, session_id)

    busy = await _login(client, token["token"])
    started = clock.now()
    while clock.now() - started < dashboard_data.SESSION_LIFETIME - idle:
        clock.advance(idle / 2)
        assert await _logged_in(client, busy)
    clock.set(started + dashboard_data.SESSION_LIFETIME)
    assert not await _logged_in(client, busy)  # however busy, it ends with its lifetime


async def test_each_token_keeps_a_bounded_number_of_sessions_oldest_ended_first(
    client: Client, token: dict[str, Any], clock: FrozenClock, store: postgres.PostgresEngineStore
) -> None:
    limit = dashboard_data.SESSIONS_PER_TOKEN
    made = []
    for _ in range(limit + 5):
        made.append(await _login(client, token["token"]))
        clock.advance(1)  # logins in a known order
    assert await _rows(store, token["id"]) == limit
    for old in made[:5]:
        assert not await _logged_in(client, old)
    for kept in made[5:]:
        assert await _logged_in(client, kept)
    # Expired sessions are pruned: the next login, whoever's, removes them.
    clock.advance(dashboard_data.SESSION_IDLE + timedelta(seconds=1))
    other = await TokenService(store).create("other")
    await _login(client, other["token"])
    assert await _rows(store, token["id"]) == 0
    assert await _rows(store) == 1


async def test_a_session_s_form_token_is_its_own(
    client: Client, token: dict[str, Any], store: postgres.PostgresEngineStore
) -> None:
    mine = await _login(client, token["token"])
    theirs = await _login(client, token["token"])
    task = await TaskService(store).create(http._task())
    assert isinstance(task, dict)
    refused = await client.post(
        "/actions/cancel",
        data={"csrf": _csrf(theirs), "id": task["id"]},
        headers=http._cookie(mine),
    )
    assert refused.status == 403
    assert (await TaskService(store).get(task["id"], ["status"]))["status"] == "QUEUED"


@pytest.fixture
async def second_store(dsn: str) -> AsyncIterator[postgres.PostgresEngineStore]:
    pool = await postgres.create_pool(dsn, min_size=1, max_size=2, application_name="second")
    yield postgres.PostgresEngineStore(pool)
    await pool.close()


async def test_sessions_survive_a_restart_and_are_shared_by_servers(
    store: postgres.PostgresEngineStore,
    second_store: postgres.PostgresEngineStore,
    dsn: str,
    token: dict[str, Any],
    aiohttp_client: Any,
) -> None:
    first: Client = await aiohttp_client(_web_app(store, dsn))
    other: Client = await aiohttp_client(_web_app(second_store, dsn))
    session_id = await _login(first, token["token"])
    assert await _logged_in(other, session_id)  # another server on the same database
    await first.close()  # the first server stops ...
    restarted: Client = await aiohttp_client(_web_app(second_store, dsn))
    assert await _logged_in(restarted, session_id)  # ... and a new one knows the session
    logout = await other.post(
        "/logout",
        data={"csrf": _csrf(session_id)},
        headers=http._cookie(session_id),
        allow_redirects=False,
    )
    assert logout.status == 303
    assert not await _logged_in(restarted, session_id)  # logged out everywhere
