"""A real dashboard in a real browser: the HTTP server and an executor on a fresh database,
driven by Playwright in Debian's chromium.

The browser is ``KAIJU_TASKS_CHROMIUM`` or ``/usr/bin/chromium`` (``apt-get install chromium``).
Without one these tests are skipped, unless ``KAIJU_TASKS_REQUIRE_BROWSER=1`` (as in CI), which
turns a missing browser into a failure. Screenshots go to ``test-artifacts/screenshots``.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from playwright.async_api import Browser, BrowserContext, Page, async_playwright, expect

from kaiju_tasks import MethodError, Task, TaskCommand, TaskRuntime, dashboard, methods
from kaiju_tasks.rpc import server as rpc_server
from kaiju_tasks.service import NotificationService, TokenService

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "screenshots"
# Assertions wait for what the page shows with a generous bound (Playwright's default is 5 s):
# on a loaded 2-core machine a navigation beside two test workers took longer.
expect.set_options(timeout=30_000)
APP = "shop"


def _chromium() -> str | None:
    configured = os.environ.get("KAIJU_TASKS_CHROMIUM")
    if configured:
        return configured
    for candidate in ("/usr/bin/chromium", "/usr/bin/chromium-browser"):
        if os.path.exists(candidate):
            return candidate
    return shutil.which("chromium")


@pytest.fixture(scope="session")
async def browser() -> AsyncIterator[Browser]:
    executable = _chromium()
    if executable is None:
        message = "no chromium: apt-get install chromium (or set KAIJU_TASKS_CHROMIUM)"
        if os.environ.get("KAIJU_TASKS_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=executable,
            args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
        )
        yield launched
        await launched.close()


@dataclasses.dataclass
class Site:
    """The server under test: its base URL, services and tokens."""

    url: str
    runtime: TaskRuntime
    tokens: TokenService
    system_token: str

    async def user_token(self, user: str, permissions: list[str] | None = None) -> str:
        created = await self.tokens.create(user, permissions or [], f"{user} in a test")
        token: str = created["token"]
        return token

    async def session(self, token: str) -> str:
        """Log in with ``token`` through the login form; return the session id of the cookie."""
        async with (
            aiohttp.ClientSession() as client,
            client.post(
                f"{self.url}/login", data={"token": token}, allow_redirects=False
            ) as response,
        ):
            assert response.status == 303, await response.text()
            session_id: str = response.cookies[dashboard.views.COOKIE].value
        return session_id

    async def log_in(self, context: BrowserContext, token: str) -> str:
        """Give a browser context a session of ``token`` (as a login would); return its id."""
        session_id = await self.session(token)
        await context.add_cookies(
            [{"name": dashboard.views.COOKIE, "value": session_id, "url": self.url}]
        )
        return session_id


def shop_methods(runtime_ref: dict[str, TaskRuntime]) -> methods.Methods:
    """In-process methods of the ``shop`` app used by the dashboard tests."""
    registry = methods.Methods()

    @registry.register("shop.list")
    async def list_orders(expired: bool = True) -> dict[str, Any]:
        return {"data": [{"id": "A-1", "expired": expired}, {"id": "A-2", "expired": expired}]}

    @registry.register("shop.delete")
    async def delete_orders(ids: list[str]) -> dict[str, Any]:
        return {"deleted": ids, "count": len(ids)}

    @registry.register("shop.fail")
    async def fail(reason: str = "out of stock") -> None:
        raise MethodError(reason, retryable=False)

    @registry.register("shop.spawn")
    async def spawn(count: int = 2) -> list[str]:
        runtime = runtime_ref["runtime"]
        children = await runtime.tasks.create(
            [
                Task(app=APP, commands=[TaskCommand(method="shop.list")], description=f"child {i}")
                for i in range(count)
            ]
        )
        assert isinstance(children, list)
        return [child["id"] for child in children]

    return registry


@pytest.fixture
async def site(dsn: str) -> AsyncIterator[Site]:
    ref: dict[str, TaskRuntime] = {}
    runtime = TaskRuntime(
        dsn,
        apps=[APP],
        methods=shop_methods(ref),
        manager_options={},
    )
    ref["runtime"] = runtime
    await runtime.start()
    assert runtime.store is not None
    tokens = TokenService(runtime.store)

    async def health() -> dict[str, Any]:
        return {"database": True}

    api = rpc_server.Api(
        tasks=runtime.tasks,
        notifications=NotificationService(runtime.store),
        tokens=tokens,
        methods=runtime.methods,
        health=health,
    )
    app = rpc_server.create_app(api)
    data = dashboard.DashboardData(runtime.store.pool, dsn)
    dashboard.setup(app, dashboard.Dashboard(runtime.tasks, tokens, data))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    tcp = web.TCPSite(runner, "127.0.0.1", 0)
    await tcp.start()
    host, port = runner.addresses[0][:2]
    system = await tokens.create("admin", ["system"], "dashboard tests")
    try:
        yield Site(f"http://{host}:{port}", runtime, tokens, system["token"])
    finally:
        await runner.cleanup()
        await runtime.stop()


@pytest.fixture
async def context(browser: Browser, site: Site) -> AsyncIterator[BrowserContext]:
    """A browser context logged in as the system user (a session started over HTTP)."""
    created = await browser.new_context(viewport={"width": 1280, "height": 900})
    await site.log_in(created, site.system_token)
    yield created
    await created.close()


@pytest.fixture
async def page(context: BrowserContext) -> AsyncIterator[Page]:
    opened = await context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda exc: errors.append(str(exc)))
    yield opened
    assert errors == [], f"JavaScript errors on the page: {errors}"


async def screenshot(page: Page, name: str, *, full_page: bool = True) -> Path:
    """Save a screenshot (of the whole page by default) as a test artefact; return its path."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    await page.screenshot(path=str(path), full_page=full_page)
    return path
