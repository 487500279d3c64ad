"""The dashboard over plain HTTP: login, permissions, CSRF, escaping, headers, live stream,
and the figures behind the overview (no browser needed; tests/browser drives the pages)."""

from __future__ import annotations

import asyncio
import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from markupsafe import escape

from kaiju_tasks import Caller, Task, TaskCommand, cli, dashboard, methods
from kaiju_tasks.dashboard.views import COOKIE, _csrf, _nice
from kaiju_tasks.rpc import server as rpc_server
from kaiju_tasks.service import NotificationService, TaskService, TokenService
from kaiju_tasks.store import postgres
from kaiju_tasks.testing import FrozenClock

Client = TestClient[Any, Any]


@pytest.fixture
async def app(store: postgres.PostgresEngineStore, dsn: str) -> web.Application:
    async def health() -> dict[str, Any]:
        return {"database": True}

    tasks = TaskService(store)
    tokens = TokenService(store)
    api = rpc_server.Api(
        tasks=tasks,
        notifications=NotificationService(store),
        tokens=tokens,
        methods=methods.Methods(),
        health=health,
    )
    created = rpc_server.create_app(api)
    data = dashboard.DashboardData(store.pool, dsn)
    dashboard.setup(created, dashboard.Dashboard(tasks, tokens, data))
    return created


@pytest.fixture
async def client(app: web.Application, aiohttp_client: Any) -> Client:
    # ``app`` first: fixtures tear down in reverse, so the server (and its event follower)
    # stops before the database it follows is dropped.
    made: Client = await aiohttp_client(app)
    return made


@pytest.fixture
async def tokens(store: postgres.PostgresEngineStore) -> dict[str, str]:
    service = TokenService(store)
    return {
        "system": (await service.create("root", ["system"]))["token"],
        "alice": (await service.create("alice"))["token"],
        "bob": (await service.create("bob"))["token"],
    }


@pytest.fixture
async def sessions(client: Client, tokens: dict[str, str]) -> dict[str, str]:
    """A dashboard session id per user, each from a real login."""
    return {name: await _session(client, token) for name, token in tokens.items()}


async def _session(client: Client, token: str) -> str:
    """Log in with an API token through the form; return the session id its cookie holds."""
    response = await client.post("/login", data={"token": token}, allow_redirects=False)
    assert response.status == 303
    session_id: str = response.cookies[COOKIE].value
    client.session.cookie_jar.clear()  # each request names its session in its own header
    return session_id


def _cookie(session_id: str) -> dict[str, str]:
    return {"Cookie": f"{COOKIE}={session_id}"}


async def _create(
    store: postgres.PostgresEngineStore, task: Task, caller: Caller | None = None
) -> dict[str, Any]:
    row = await TaskService(store).create(task, caller=caller or Caller.user("root", ["system"]))
    assert isinstance(row, dict)
    return row


def _task(**fields: Any) -> Task:
    return Task(app="shop", commands=[TaskCommand(method="shop.list")], **fields)


async def test_pages_need_a_login(client: Client) -> None:
    for path in ("/", "/tasks", "/workers", "/tasks/x"):
        response = await client.get(path, allow_redirects=False)
        assert response.status == 303
        assert response.headers["Location"].startswith("/login?next=")
    assert (await client.get("/tasks?partial=1", allow_redirects=False)).status == 401
    assert (await client.get("/stream", allow_redirects=False)).status == 401
    response = await client.post(
        "/actions/reset", data={"csrf": "x", "id": "x"}, allow_redirects=False
    )
    assert response.status == 303  # to the login page; nothing was done


async def test_login_sets_a_strict_http_only_session_cookie(
    client: Client, tokens: dict[str, str]
) -> None:
    response = await client.post(
        "/login", data={"token": tokens["alice"], "next": "/tasks"}, allow_redirects=False
    )
    assert response.status == 303
    assert response.headers["Location"] == "/tasks"
    cookie = response.headers["Set-Cookie"]
    assert tokens["alice"] not in cookie  # the cookie holds a session id, never the token
    assert len(response.cookies[COOKIE].value) >= 43  # 32 random bytes
    assert "HttpOnly" in cookie
    assert "SameSite=Strict" in cookie
    assert "Secure" not in cookie  # plain http here; see tests/security for https

    bad = await client.post("/login", data={"token": "kt_nope"}, allow_redirects=False)
    assert bad.status == 401
    assert "not valid" in await bad.text()
    assert "Set-Cookie" not in bad.headers


@pytest.mark.parametrize(
    "target",
    [
        "//evil.example/x",
        "https://evil.example/",
        "/\\evil.example",
        "javascript:x",
        "/\t/evil.example",
        "/\n/evil.example",
        "/\x7f/evil.example",
    ],
)
async def test_login_never_redirects_off_site(
    client: Client, tokens: dict[str, str], target: str
) -> None:
    response = await client.post(
        "/login", data={"token": tokens["alice"], "next": target}, allow_redirects=False
    )
    assert response.headers["Location"] == "/"


async def test_a_bearer_header_works_like_the_cookie(
    client: Client, tokens: dict[str, str]
) -> None:
    response = await client.get(
        "/tasks", headers={"Authorization": f"Bearer {tokens['alice']}"}, allow_redirects=False
    )
    assert response.status == 200


async def test_each_user_sees_only_their_own_tasks(
    client: Client,
    sessions: dict[str, str],
    tokens: dict[str, str],
    store: postgres.PostgresEngineStore,
) -> None:
    alice = await _create(store, _task(description="alice's"), Caller.user("alice"))
    bob = await _create(store, _task(description="bob's"), Caller.user("bob"))
    page = await (await client.get("/tasks", headers=_cookie(sessions["alice"]))).text()
    assert alice["id"] in page
    assert bob["id"] not in page
    other = await client.get(f"/tasks/{bob['id']}", headers=_cookie(sessions["alice"]))
    assert other.status == 404
    assert bob["id"] in await other.text()  # names what was asked for, shows nothing of it
    assert "bob's" not in await other.text()
    # Acting on someone else's task is refused and changes nothing.
    csrf = _csrf(sessions["alice"])
    refused = await client.post(
        "/actions/cancel", data={"csrf": csrf, "id": bob["id"]}, headers=_cookie(sessions["alice"])
    )
    assert refused.status == 404
    assert (await TaskService(store).get(bob["id"], ["status"]))["status"] == "QUEUED"
    # Cluster-wide figures are for callers who may view others.
    overview = await (await client.get("/", headers=_cookie(sessions["alice"]))).text()
    assert "view_others" in overview
    assert "throughput-chart" not in overview
    system = await (await client.get("/", headers=_cookie(sessions["system"]))).text()
    assert "throughput-chart" in system


async def test_actions_need_the_form_token(
    client: Client,
    sessions: dict[str, str],
    tokens: dict[str, str],
    store: postgres.PostgresEngineStore,
) -> None:
    task = await _create(store, _task())
    url = "/actions/cancel"
    for form in ({}, {"csrf": ""}, {"csrf": _csrf(sessions["bob"])}, {"csrf": tokens["system"]}):
        response = await client.post(
            url, data={**form, "id": task["id"]}, headers=_cookie(sessions["system"])
        )
        assert response.status == 403
    cross = await client.post(
        url,
        data={"csrf": _csrf(sessions["system"]), "id": task["id"]},
        headers={**_cookie(sessions["system"]), "Origin": "https://evil.example"},
    )
    assert cross.status == 403
    assert (await TaskService(store).get(task["id"], ["status"]))["status"] == "QUEUED"

    done = await client.post(
        url,
        data={"csrf": _csrf(sessions["system"]), "id": task["id"]},
        headers=_cookie(sessions["system"]),
        allow_redirects=False,
    )
    assert done.status == 303
    assert done.headers["Location"] == f"/tasks/{task['id']}?done=cancel"
    assert (await TaskService(store).get(task["id"], ["status"]))["status"] == "FAILED"


async def test_user_data_is_escaped(
    client: Client,
    sessions: dict[str, str],
    tokens: dict[str, str],
    store: postgres.PostgresEngineStore,
) -> None:
    evil = "<script>alert(1)</script>"
    task = await _create(
        store,
        Task(
            app="<b>shop</b>",
            description=evil,
            kws={"x": evil},
            commands=[TaskCommand(method="shop.list", params={"q": f"</pre>{evil}"})],
        ),
    )
    for path in (f"/tasks/{task['id']}", "/tasks", f"/tasks?q={evil}", "/"):
        body = await (await client.get(path, headers=_cookie(sessions["system"]))).text()
        assert "<script>alert" not in body, path
        assert "<b>shop</b>" not in body, path
    body = await (
        await client.get(f"/tasks/{task['id']}", headers=_cookie(sessions["system"]))
    ).text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in body


async def test_pages_carry_security_headers(
    client: Client, sessions: dict[str, str], tokens: dict[str, str]
) -> None:
    response = await client.get("/tasks", headers=_cookie(sessions["system"]))
    policy = response.headers["Content-Security-Policy"]
    assert "default-src 'self'" in policy
    assert "frame-ancestors 'none'" in policy
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Cache-Control"] == "no-store"
    css = await client.get("/static/dashboard.css")
    assert css.status == 200
    assert "text/css" in css.headers["Content-Type"]


async def test_bad_filters_are_explained(
    client: Client, sessions: dict[str, str], tokens: dict[str, str]
) -> None:
    for query, text in (
        ("since=yesterday", "not a date and time"),
        ("status=BOGUS", "unknown status"),
    ):
        response = await client.get(f"/tasks?{query}", headers=_cookie(sessions["system"]))
        assert response.status == 400
        assert text in await response.text()
    response = await client.get("/tasks?page=abc", headers=_cookie(sessions["system"]))
    assert response.status == 200  # a nonsense page number shows the first page


async def test_text_filter_treats_wildcards_literally(
    client: Client,
    sessions: dict[str, str],
    tokens: dict[str, str],
    store: postgres.PostgresEngineStore,
) -> None:
    hit = await _create(store, _task(description="100% done"))
    miss = await _create(store, _task(description="1000 done"))
    body = await (await client.get("/tasks?q=100%25", headers=_cookie(sessions["system"]))).text()
    assert hit["id"] in body
    assert miss["id"] not in body


async def _sse_events(response: Any, count: int) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    while len(found) < count:
        line = (await asyncio.wait_for(response.content.readline(), 10)).decode()
        if line.startswith("data: "):
            found.append(json.loads(line[6:]))
    return found


async def test_stream_sends_changes_live(
    client: Client,
    sessions: dict[str, str],
    tokens: dict[str, str],
    store: postgres.PostgresEngineStore,
) -> None:
    system = await client.get("/stream", headers=_cookie(sessions["system"]))
    alice = await client.get("/stream", headers=_cookie(sessions["alice"]))
    assert system.headers["Content-Type"] == "text/event-stream"
    assert (await system.content.readline()).startswith(b"retry:")
    hub = client.app[dashboard.views.DASHBOARD_KEY].data.hub
    assert hub is not None
    assert hub.receiver is not None
    await asyncio.wait_for(hub.receiver.ready.wait(), 10)  # the follower starts from "now"
    bobs = await _create(store, _task(), Caller.user("bob"))
    alices = await _create(store, _task(), Caller.user("alice"))
    first, second = await _sse_events(system, 2)
    assert (first["type"], first["task_id"]) == ("task-sent", bobs["id"])
    assert (second["type"], second["task_id"]) == ("task-sent", alices["id"])
    # A user hears of their own tasks only, and not which one: bob's task sends alice nothing.
    [hers] = await _sse_events(alice, 1)
    assert hers == {"type": "change"}
    await _create(store, _task(), Caller.user("alice"))
    assert await _sse_events(alice, 1) == [{"type": "change"}]
    system.close()
    alice.close()


async def test_stream_ends_when_the_token_is_revoked(
    client: Client, store: postgres.PostgresEngineStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dashboard.views, "KEEPALIVE", 0.5)
    service = TokenService(store)
    created = await service.create("carol", ["system"])
    session = await _session(client, created["token"])
    stream = await client.get("/stream", headers=_cookie(session))
    assert (await stream.content.readline()).startswith(b"retry:")
    await service.revoke(created["id"])
    rest = await asyncio.wait_for(stream.content.read(), 10)  # the server ends the stream
    assert b"data:" not in rest


async def test_stream_ends_when_the_server_stops(
    app: web.Application, aiohttp_client: Any, tokens: dict[str, str]
) -> None:
    client: Client = await aiohttp_client(app)
    stream = await client.get("/stream", headers=_cookie(await _session(client, tokens["system"])))
    assert (await stream.content.readline()).startswith(b"retry:")
    await asyncio.wait_for(client.close(), 30)  # the open stream does not hold the server


async def test_partial_returns_only_the_live_part(
    client: Client, sessions: dict[str, str], tokens: dict[str, str]
) -> None:
    body = await (await client.get("/tasks?partial=1", headers=_cookie(sessions["system"]))).text()
    assert "<html" not in body
    assert 'data-testid="tasks"' in body


async def test_throughput_counts_per_minute(store: postgres.PostgresEngineStore, dsn: str) -> None:
    now = datetime(2026, 5, 1, 12, 30, 20, tzinfo=UTC)
    rows = [
        ("task-succeeded", now - timedelta(minutes=1, seconds=5)),  # 12:29
        ("task-succeeded", now - timedelta(minutes=1, seconds=10)),  # 12:29
        ("task-failed", now - timedelta(seconds=10)),  # 12:30
        ("task-revoked", now - timedelta(seconds=15)),  # 12:30
        ("task-succeeded", now - timedelta(minutes=61)),  # outside the hour
        ("task-started", now - timedelta(seconds=5)),  # not an end
        ("task-succeeded", now + timedelta(seconds=5)),  # after now
    ]
    async with store.pool.acquire() as connection:
        await connection.executemany(
            "INSERT INTO events (type, task_id, created) VALUES ($1, 't', $2)", rows
        )
    series = await dashboard.DashboardData(store.pool).throughput(now)
    assert len(series) == 60
    assert series[-1]["minute"] == datetime(2026, 5, 1, 12, 30, tzinfo=UTC)
    assert series[0]["minute"] == datetime(2026, 5, 1, 11, 31, tzinfo=UTC)
    assert (series[-2]["finished"], series[-2]["failed"]) == (2, 0)
    assert (series[-1]["finished"], series[-1]["failed"]) == (0, 2)
    assert sum(s["finished"] for s in series) == 2


async def test_queues_and_status_counts(store: postgres.PostgresEngineStore) -> None:
    for _ in range(3):
        await _create(store, _task())
    await _create(store, Task(app="other", commands=[TaskCommand(method="m")]))
    data = dashboard.DashboardData(store.pool)
    clock = FrozenClock()
    queues = {q["app_name"]: q for q in await data.queues(clock.now() + timedelta(seconds=30))}
    assert queues["shop"]["queued"] == 3
    assert queues["other"]["queued"] == 1
    assert queues["shop"]["lag"] > 0
    assert (await data.status_counts()) == {"QUEUED": 4}


def test_chart_scale_is_a_round_number() -> None:
    assert [_nice(v) for v in (1, 2, 3, 7, 10, 11, 99, 101, 4500)] == [
        1,
        2,
        5,
        10,
        10,
        20,
        100,
        200,
        5000,
    ]


async def test_huge_results_are_cut_on_the_page(
    client: Client,
    sessions: dict[str, str],
    tokens: dict[str, str],
    store: postgres.PostgresEngineStore,
) -> None:
    task = await _create(store, _task(kws={"blob": "x" * 300_000}))
    response = await client.get(f"/tasks/{task['id']}", headers=_cookie(sessions["system"]))
    body = await response.text()
    assert response.status == 200
    assert "characters in all; tasks.get has the rest" in body
    assert len(body) < 200_000


async def test_timeline_shows_the_newest_events(
    client: Client,
    sessions: dict[str, str],
    tokens: dict[str, str],
    store: postgres.PostgresEngineStore,
) -> None:
    task = await _create(store, _task())
    async with store.pool.acquire() as connection:
        await connection.executemany(
            "INSERT INTO events (type, task_id, created, data) VALUES ('task-note', $1, now(), $2)",
            [(task["id"], {"n": n}) for n in range(600)],
        )
    body = await (
        await client.get(f"/tasks/{task['id']}", headers=_cookie(sessions["system"]))
    ).text()
    assert "The newest 500 events" in body

    def shown(n: int) -> str:
        return str(escape(json.dumps({"n": n})))

    assert shown(599) in body
    assert shown(99) not in body
    assert body.index(shown(100)) < body.index(shown(599))


async def test_a_login_form_posted_from_another_site_is_refused(
    client: Client, tokens: dict[str, str]
) -> None:
    response = await client.post(
        "/login",
        data={"token": tokens["alice"]},
        headers={"Origin": "https://evil.example"},
        allow_redirects=False,
    )
    assert response.status == 403
    assert "Set-Cookie" not in response.headers


async def test_logout_needs_the_form_token(
    client: Client, sessions: dict[str, str], tokens: dict[str, str]
) -> None:
    refused = await client.post(
        "/logout", data={"csrf": "x"}, headers=_cookie(sessions["alice"]), allow_redirects=False
    )
    assert refused.status == 403
    done = await client.post(
        "/logout",
        data={"csrf": _csrf(sessions["alice"])},
        headers=_cookie(sessions["alice"]),
        allow_redirects=False,
    )
    assert done.status == 303
    assert f'{COOKIE}=""' in done.headers["Set-Cookie"]


async def test_workers_need_view_others(
    client: Client,
    sessions: dict[str, str],
    tokens: dict[str, str],
    store: postgres.PostgresEngineStore,
) -> None:
    await store.register_executor(
        "exec-1", apps=["shop"], host="db-host-7", pid=42, concurrency=3, now=FrozenClock().now()
    )
    mine = await (await client.get("/workers", headers=_cookie(sessions["alice"]))).text()
    assert "view_others" in mine
    assert "db-host-7" not in mine
    theirs = await (await client.get("/workers", headers=_cookie(sessions["system"]))).text()
    assert "db-host-7" in theirs
    assert "s-debug" not in theirs
    await store.register_executor(
        "exec-2",
        apps=["shop@debug-0a1b2c3d"],
        host="laptop",
        pid=7,
        concurrency=1,
        now=FrozenClock().now(),
        debug=True,
    )
    theirs = await (await client.get("/workers", headers=_cookie(sessions["system"]))).text()
    assert 'class="status s-debug"' in theirs  # the debug executor is marked as such


async def test_viewing_others_is_not_modifying_them(
    client: Client, store: postgres.PostgresEngineStore
) -> None:
    token = (await TokenService(store).create("viewer", ["view_others"]))["token"]
    session = await _session(client, token)
    task = await _create(store, _task(), Caller.user("bob"))
    page = await (await client.get(f"/tasks/{task['id']}", headers=_cookie(session))).text()
    assert task["id"] in page
    assert "Cancel</button>" not in page  # no buttons for what the caller may not do
    refused = await client.post(
        "/actions/cancel",
        data={"csrf": _csrf(session), "id": task["id"]},
        headers=_cookie(session),
    )
    assert refused.status == 403  # may see it, may not change it
    assert (await TaskService(store).get(task["id"], ["status"]))["status"] == "QUEUED"


async def test_odd_input_is_a_clear_error_not_a_crash(
    client: Client, sessions: dict[str, str], tokens: dict[str, str]
) -> None:
    headers = _cookie(sessions["system"])
    for query in ("q=%00", "app=a%00b", "page=999999999999999999999"):
        response = await client.get(f"/tasks?{query}", headers=headers)
        assert response.status in (200, 400), query
    assert (await client.get("/tasks?q=%00", headers=headers)).status == 400
    assert (await client.get("/tasks/a%00b", headers=headers)).status == 404
    odd = await client.post(
        "/actions/cancel",
        data={"csrf": "\u00e9\u00e9", "id": "x"},
        headers=headers,
        allow_redirects=False,
    )
    assert odd.status == 403
    nameless = await client.post(
        "/actions/cancel", data={"csrf": _csrf(sessions["system"])}, headers=headers
    )
    assert nameless.status == 400


async def test_the_to_filter_takes_in_the_whole_second(
    client: Client,
    sessions: dict[str, str],
    tokens: dict[str, str],
    store: postgres.PostgresEngineStore,
) -> None:
    clock = FrozenClock()
    moment = datetime(2026, 5, 1, 10, 0, 0, 400_000, tzinfo=UTC)
    clock.set(moment)
    task = await TaskService(store, clock).create(_task())
    assert isinstance(task, dict)
    headers = _cookie(sessions["system"])
    inside = await (await client.get("/tasks?until=2026-05-01T10:00:00", headers=headers)).text()
    assert task["id"] in inside
    before = await (await client.get("/tasks?until=2026-05-01T09:59:59", headers=headers)).text()
    assert task["id"] not in before
    since = await (await client.get("/tasks?since=2026-05-01T10:00:01", headers=headers)).text()
    assert task["id"] not in since


async def test_deep_trees_and_skipped_stages_render(
    client: Client,
    sessions: dict[str, str],
    tokens: dict[str, str],
    store: postgres.PostgresEngineStore,
) -> None:
    root = await _create(store, _task())
    parent = root["id"]
    async with store.pool.acquire() as connection:
        for depth in range(400):  # deeper than any template recursion would allow
            child = f"deep-{depth}"
            await connection.execute(
                "INSERT INTO tasks (id, app_name, commands, kws, enabled, max_exec_timeout,"
                " max_retries, retries, restart_policy, retry_delay, notify, system, meta,"
                " priority, status, stage, stages, result, created, status_change, parent_id,"
                " root_id, requeues)"
                " SELECT $1, app_name, commands, kws, enabled, max_exec_timeout, max_retries,"
                " retries, restart_policy, retry_delay, notify, system, meta, priority, status,"
                " stage, stages, result, created, status_change, $2, $3, requeues"
                " FROM tasks WHERE id = $3",
                child,
                parent,
                root["id"],
            )
            parent = child
        await connection.execute(
            "UPDATE tasks SET status = 'FINISHED', stage = 2, stages = 2, result = $2,"
            " commands = $3 WHERE id = $1",
            root["id"],
            [{"data": []}, None],
            [
                {"method": "shop.list", "params": {}},
                {
                    "method": "shop.delete",
                    "params": {"ids": "[0.data]"},
                    "condition": {"0.data": {"ne": []}},
                },
            ],
        )
    response = await client.get("/tasks/deep-399", headers=_cookie(sessions["system"]))
    assert response.status == 200
    assert (await response.text()).count('data-depth="') == 401
    page = await (
        await client.get(f"/tasks/{root['id']}", headers=_cookie(sessions["system"]))
    ).text()
    assert "skipped: the condition was false" in page


async def test_live_streams_per_token_are_capped(
    client: Client,
    sessions: dict[str, str],
    tokens: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(dashboard.views, "MAX_STREAMS", 2)
    headers = _cookie(sessions["alice"])
    first = await client.get("/stream", headers=headers)
    second = await client.get("/stream", headers=headers)
    assert (first.status, second.status) == (200, 200)
    refused = await client.get("/stream", headers=headers)
    assert refused.status == 429
    other = await client.get("/stream", headers=_cookie(sessions["bob"]))
    assert other.status == 200  # the cap is per token
    first.close()
    deadline = asyncio.get_running_loop().time() + 10
    while True:  # the server notices the closed stream within about a second
        again = await client.get("/stream", headers=headers)
        if again.status == 200:
            break
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.2)
    for response in (second, other, again):
        response.close()


async def test_overview_cache_keeps_only_fresh_entries(
    store: postgres.PostgresEngineStore,
) -> None:
    data = dashboard.DashboardData(store.pool, cache_for=0.05)
    clock = FrozenClock()
    for minute in range(5):  # a new throughput key every minute
        await data.throughput(clock.now() + timedelta(minutes=minute))
        await asyncio.sleep(0.06)
    assert len(data.insights._cache) == 1


async def test_the_login_hint_names_a_command_that_parses(client: Client) -> None:
    body = await (await client.get("/login")).text()
    hint = re.search(r"<code>kaiju-tasks (token create[^<]*)</code>", body)
    assert hint is not None
    assert hint.group(1) == "token create --user USER"
    parsed = cli._parser().parse_args(hint.group(1).replace("USER", "alice").split())
    assert parsed.user == "alice"


async def test_the_favicon_is_served_where_pages_link_it_and_where_browsers_look(
    client: Client,
) -> None:
    body = await (await client.get("/login")).text()
    link = re.search(r'<link rel="icon" href="([^"]+)" type="image/svg\+xml">', body)
    assert link is not None
    for path in (link.group(1), "/favicon.ico"):
        response = await client.get(path)
        assert response.status == 200, path
        assert response.headers["Content-Type"] == "image/svg+xml", path
        assert (await response.text()).startswith("<svg"), path


async def test_the_overview_names_apps_with_queued_tasks_and_no_live_executor(
    client: Client, sessions: dict[str, str], store: postgres.PostgresEngineStore
) -> None:
    from kaiju_tasks.clock import SystemClock

    await _create(store, Task(app="billing", commands=[TaskCommand(method="b")]))
    await _create(store, _task())
    now = SystemClock().now()
    await store.register_executor("shop-ex", apps=["shop"], host="h", pid=1, concurrency=1, now=now)
    page = await (await client.get("/", headers=_cookie(sessions["system"]))).text()
    (box,) = re.findall(r'<section class="unserved".*?</section>', page, re.S)
    assert "billing</a>: 1 queued" in box
    assert "shop" not in box
    # an executor for billing comes online: the warning goes
    await store.register_executor(
        "billing-ex", apps=["billing"], host="h", pid=2, concurrency=1, now=now
    )
    page = await (await client.get("/", headers=_cookie(sessions["system"]))).text()
    assert 'data-testid="unserved"' not in page
    # a stopped executor serves nothing
    await store.executor_stopped("billing-ex", now=SystemClock().now())
    page = await (await client.get("/", headers=_cookie(sessions["system"]))).text()
    assert 'data-testid="unserved"' in page
