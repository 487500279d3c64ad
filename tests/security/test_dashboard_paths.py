"""Issue 10, row 4: every dashboard link and form names exactly its task, whatever its id holds.

A user's task with id ``x/../bob_idle`` once had forms posting to ``/tasks/x/../bob_idle/cancel``,
which the browser resolved to bob's task: an administrator's Cancel cancelled bob's task. Now the
actions post the id in the form body and links percent-encode it (``.`` and ``..`` go in a query).
"""

from __future__ import annotations

import html.parser
import urllib.parse
from typing import Any

import pytest
from markupsafe import escape
from playwright.async_api import Browser, Dialog, expect
from yarl import URL

from kaiju_tasks import Caller, Task, TaskCommand
from kaiju_tasks.dashboard.views import task_url
from kaiju_tasks.service import TaskService
from kaiju_tasks.store import postgres
from tests.browser import conftest as browser_fixtures
from tests.integration import test_dashboard_http as http

Client = http.Client

TRAVERSAL = "x/../bob_idle"
HOSTILE_IDS = [
    TRAVERSAL,
    "..",
    ".",
    "../../login",
    "%2e%2E",
    "a?b#c%d",
    "%FF",
    "a b+c&d=e;f",
    "ü/é\\",
    "[!e:1+1]",
    "`%`",
]
IDLE_APP = "nobody-serves-this"  # no executor takes these tasks: they stay as created


def _idle(task_id: str) -> Task:
    return Task(id=task_id, app=IDLE_APP, commands=[TaskCommand(method="idle.wait")])


class _Page(html.parser.HTMLParser):
    """The links, forms and the hidden fields of each form on a page."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.forms: list[dict[str, Any]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "a" and found.get("href"):
            self.links.append(str(found["href"]))
        elif tag == "form":
            self.forms.append({"action": found.get("action"), "fields": {}})
        elif tag in ("input", "textarea") and self.forms and found.get("name"):
            self.forms[-1]["fields"][found["name"]] = found.get("value") or ""


def _parse(body: str) -> _Page:
    parsed = _Page()
    parsed.feed(body)
    return parsed


async def _status(store: postgres.PostgresEngineStore, task_id: str) -> str:
    status: str = (await TaskService(store).get(task_id, ["status"]))["status"]
    return status


async def test_task_urls_keep_every_character_inside_one_segment() -> None:
    assert task_url(TRAVERSAL) == "/tasks/x%2F..%2Fbob_idle"
    assert task_url("a?b#c%d") == "/tasks/a%3Fb%23c%25d"
    assert task_url("..") == "/task?id=.."
    assert task_url(".", done="cancel") == "/task?id=.&done=cancel"
    assert task_url("%2e%2E") == "/tasks/%252e%252E"
    for task_id in HOSTILE_IDS:
        # What a browser does with the link (RFC 3986 resolution removes dot segments) leaves
        # it pointing at the page of this one task.
        resolved = urllib.parse.urlsplit(
            urllib.parse.urljoin("http://h/tasks/y", task_url(task_id))
        )
        if resolved.path == "/task":
            assert urllib.parse.parse_qs(resolved.query) == {"id": [task_id]}
        else:
            prefix, _, segment = resolved.path.rpartition("/")
            assert prefix == "/tasks"
            assert urllib.parse.unquote(segment) == task_id
            assert urllib.parse.unquote(segment) not in (".", "..")


async def test_the_traversal_task_page_names_only_its_task_and_cancel_spares_bob(
    client: Client, sessions: dict[str, str], store: postgres.PostgresEngineStore
) -> None:
    service = TaskService(store)
    await service.create(_idle("bob_idle"), caller=Caller.user("bob"))
    for task_id in HOSTILE_IDS:
        await service.create(_idle(task_id), caller=Caller.user("alice"))
    admin = http._cookie(sessions["system"])

    for task_id in HOSTILE_IDS:
        response = await client.get(URL(task_url(task_id), encoded=True), headers=admin)
        assert response.status == 200, task_id
        page = _parse(await response.text())
        actions = {form["action"]: form["fields"] for form in page.forms}
        # The exact form actions of the page: fixed addresses, the id in the body.
        assert set(actions) == {"/logout", "/actions/reset", "/actions/cancel"}, task_id
        assert actions["/actions/cancel"]["id"] == task_id
        assert actions["/actions/reset"]["id"] == task_id
        for link in page.links:
            assert link in ("#main", "/", "/tasks", "/workers"), (task_id, link)

    # The tasks list links each task by an address that leads back to exactly that task.
    listing = _parse(await (await client.get("/tasks", headers=admin)).text())
    linked = [link for link in listing.links if link.startswith(("/tasks/", "/task?"))]
    assert sorted(linked) == sorted(task_url(t) for t in [*HOSTILE_IDS, "bob_idle"])
    for link in linked:
        resolved = urllib.parse.urljoin("http://h/tasks", link)  # as a browser resolves it
        shown = await client.get(
            URL(resolved.removeprefix("http://h"), encoded=True), headers=admin
        )
        assert shown.status == 200, link
        heading = (await shown.text()).split("<h1>", 1)[1].split("</h1>", 1)[0]
        expected = next(t for t in [*HOSTILE_IDS, "bob_idle"] if task_url(t) == link)
        assert heading == f'Task <span class="mono">{escape(expected)}</span>', link

    # The administrator's Cancel, posted exactly as the traversal task's page has it.
    page = _parse(
        await (await client.get(URL(task_url(TRAVERSAL), encoded=True), headers=admin)).text()
    )
    form = next(f for f in page.forms if f["action"] == "/actions/cancel")
    posted = await client.post(
        form["action"], data=form["fields"], headers=admin, allow_redirects=False
    )
    assert posted.status == 303
    assert posted.headers["Location"] == "/tasks/x%2F..%2Fbob_idle?done=cancel"
    assert await _status(store, TRAVERSAL) == "FAILED"
    assert await _status(store, "bob_idle") == "QUEUED"  # bob's task untouched

    # The same for the ids a browser would resolve as path steps.
    page = _parse(await (await client.get("/task?id=..", headers=admin)).text())
    form = next(f for f in page.forms if f["action"] == "/actions/cancel")
    posted = await client.post(
        form["action"], data=form["fields"], headers=admin, allow_redirects=False
    )
    assert posted.headers["Location"] == "/task?id=..&done=cancel"
    assert await _status(store, "..") == "FAILED"
    assert await _status(store, ".") == "QUEUED"
    assert await _status(store, "bob_idle") == "QUEUED"


async def test_login_returns_to_the_exact_task_asked_for(
    client: Client, tokens: dict[str, str], store: postgres.PostgresEngineStore
) -> None:
    await TaskService(store).create(_idle(TRAVERSAL))
    asked = await client.get(URL("/tasks/x%2F..%2Fbob_idle", encoded=True), allow_redirects=False)
    assert asked.status == 303
    target = urllib.parse.parse_qs(urllib.parse.urlsplit(asked.headers["Location"]).query)
    assert target == {"next": ["/tasks/x%2F..%2Fbob_idle"]}
    login = await client.post(
        "/login",
        data={"token": tokens["system"], "next": target["next"][0]},
        allow_redirects=False,
    )
    assert login.headers["Location"] == "/tasks/x%2F..%2Fbob_idle"


@pytest.mark.timeout(120)
async def test_in_a_browser_the_admin_cancel_on_the_traversal_page_spares_bob(
    browser: Browser, site: browser_fixtures.Site
) -> None:
    tasks = site.runtime.tasks
    await tasks.create(_idle("bob_idle"), caller=Caller.user("bob"))
    for task_id in HOSTILE_IDS:
        await tasks.create(_idle(task_id), caller=Caller.user("alice"))
    context = await browser.new_context()
    await site.log_in(context, site.system_token)
    page = await context.new_page()
    posted: list[str] = []
    page.on("request", lambda r: posted.append(r.url) if r.method == "POST" else None)

    async def accept(dialog: Dialog) -> None:
        await dialog.accept()

    page.on("dialog", accept)
    try:
        # Every link of the tasks list opens the page of exactly its task.
        for task_id in HOSTILE_IDS:
            await page.goto(f"{site.url}/tasks?app={IDLE_APP}")
            await page.get_by_role("link", name=task_id, exact=True).click()
            await expect(page.get_by_role("heading", level=1)).to_have_text(f"Task {task_id}")
        await page.goto(f"{site.url}{task_url(TRAVERSAL)}")
        await expect(page.get_by_role("heading", level=1)).to_have_text(f"Task {TRAVERSAL}")
        await page.get_by_role("button", name="Cancel").click()
        await expect(page.get_by_role("status").filter(has_text="Task cancelled")).to_be_visible()
        await expect(page.get_by_role("heading", level=1)).to_have_text(f"Task {TRAVERSAL}")
        assert posted == [f"{site.url}/actions/cancel"]
        assert (await tasks.get(TRAVERSAL, ["status"]))["status"] == "FAILED"
        assert (await tasks.get("bob_idle", ["status"]))["status"] == "QUEUED"
    finally:
        await context.close()
