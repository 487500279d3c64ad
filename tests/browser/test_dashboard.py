"""Every dashboard page and action, in a real browser, against a real server and executor."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

from playwright.async_api import Browser, Dialog, Page, expect

from kaiju_tasks import Message, Task, TaskCommand
from kaiju_tasks.clock import SystemClock
from kaiju_tasks.testing import eventually
from tests.browser.conftest import APP, Site, screenshot

TIMEOUT = 15_000  # ms a live change may take to show up


async def _answer(dialog: Dialog, questions: list[str], *, accept: bool) -> None:
    """Answer a confirm() dialog (Playwright awaits async handlers)."""
    questions.append(dialog.message)
    await (dialog.accept() if accept else dialog.dismiss())


async def _status(site: Site, task_id: str) -> str:
    row = await site.runtime.tasks.get(task_id, ["status"])
    status: str = row["status"]
    return status


async def _ended(site: Site, task_id: str) -> str:
    await eventually(lambda: _in(site, task_id, ("FINISHED", "FAILED")))
    return await _status(site, task_id)


async def _in(site: Site, task_id: str, statuses: tuple[str, ...]) -> bool:
    return await _status(site, task_id) in statuses


async def _create(site: Site, task: Task, caller: Any = None) -> dict[str, Any]:
    """Create one task (as ``caller``, default the system) and return its row."""
    kwargs = {"caller": caller} if caller is not None else {}
    row = await site.runtime.tasks.create(task, **kwargs)
    assert isinstance(row, dict)
    return row


async def _create_many(site: Site, tasks: list[Task]) -> list[dict[str, Any]]:
    rows = await site.runtime.tasks.create(tasks)
    assert isinstance(rows, list)
    return rows


def _pipeline(description: str = "expired orders") -> Task:
    return Task(
        app=APP,
        description=description,
        commands=[
            TaskCommand(method="shop.list", params={"expired": True}),
            TaskCommand(method="shop.delete", params={"ids": "[0.data.id]"}),
        ],
    )


async def _no_reload_marker(page: Page) -> None:
    await page.evaluate("window.__kaijuNoReload = 'still here'")


async def _assert_not_reloaded(page: Page) -> None:
    assert await page.evaluate("window.__kaijuNoReload") == "still here"


async def test_login_logout_and_a_bad_token(browser: Browser, site: Site) -> None:
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    page = await context.new_page()
    try:
        await page.goto(f"{site.url}/tasks?status=FAILED")
        await expect(page).to_have_url(re.compile(r"/login\?next="))
        await page.fill("#token", "kt_not-a-real-token")
        await page.click("button[type=submit]")
        await expect(page.get_by_role("alert")).to_contain_text("not valid")
        await screenshot(page, "dashboard-login")

        await page.fill("#token", site.system_token)
        await page.click("button[type=submit]")
        await expect(page).to_have_url(f"{site.url}/tasks?status=FAILED")
        await expect(page.get_by_role("heading", name="Tasks")).to_be_visible()
        cookie = next(c for c in await context.cookies() if c["name"] == "kaiju_tasks_session")
        assert cookie["httpOnly"]
        assert cookie["sameSite"] == "Strict"
        assert cookie["value"] != site.system_token  # a session id, never the token

        await page.get_by_role("button", name="Log out").click()
        await expect(page).to_have_url(re.compile(r"/login$"))
        await page.goto(f"{site.url}/workers")
        await expect(page).to_have_url(re.compile(r"/login\?next="))
    finally:
        await context.close()


async def test_overview_chart_queues_and_counts(page: Page, site: Site) -> None:
    finished = await _create_many(site, [_pipeline() for _ in range(3)])
    failed = await _create(
        site, Task(app=APP, commands=[TaskCommand(method="shop.fail")], max_retries=0)
    )
    for row in finished:
        assert await _ended(site, row["id"]) == "FINISHED"
    assert await _ended(site, failed["id"]) == "FAILED"
    # An app no executor serves: its tasks stay QUEUED and show as queue depth.
    await _create_many(
        site, [Task(app="billing", commands=[TaskCommand(method="billing.run")]) for _ in range(4)]
    )

    await page.goto(site.url + "/")
    chart = page.get_by_test_id("throughput-chart")
    await expect(chart).to_be_visible()
    # One bar each, or two when the tasks ended on both sides of a minute.
    assert 1 <= await chart.locator("rect.finished").count() <= 2
    assert 1 <= await chart.locator("rect.failed").count() <= 2
    await expect(chart.locator("desc")).to_contain_text("3 finished and 1 failed")
    queues = page.get_by_test_id("queues")
    await expect(queues.get_by_role("row", name=re.compile("billing"))).to_contain_text("4")
    counts = page.get_by_test_id("counts")
    await expect(counts.get_by_role("row", name="FINISHED")).to_contain_text("3")
    await expect(counts.get_by_role("row", name="FAILED")).to_contain_text("1")
    await expect(counts.get_by_role("row", name="QUEUED")).to_contain_text("4")
    await expect(page.get_by_text("1 executor online")).to_be_visible()
    await screenshot(page, "dashboard-overview")

    # Live: one more failure shows in the chart without a reload.
    await _no_reload_marker(page)
    more = await _create(
        site, Task(app=APP, commands=[TaskCommand(method="shop.fail")], max_retries=0)
    )
    await _ended(site, more["id"])
    await expect(chart.locator("desc")).to_contain_text("3 finished and 2 failed", timeout=TIMEOUT)
    await _assert_not_reloaded(page)


async def test_a_live_refresh_between_press_and_release_does_not_lose_the_click(
    page: Page, site: Site
) -> None:
    # A refresh that replaced the link between the press and the release used to send the
    # click to the table instead: the link was not followed (seen as a flaky paging test).
    billing = [Task(app="billing", commands=[TaskCommand(method="billing.run")]) for _ in range(51)]
    await _create_many(site, billing)
    await page.goto(site.url + "/tasks")
    table = page.get_by_test_id("tasks")
    await expect(table.locator("caption")).to_contain_text("page 1 of 2")
    await expect(page.locator("#live-status")).to_have_text("live")
    await page.set_viewport_size({"width": 1280, "height": 4000})  # the link in view
    # Where the link is, read in one step (a refresh may replace it at any moment, in place).
    x, y = await page.evaluate(
        "(() => { const r = document.querySelector('a[rel=next]').getBoundingClientRect();"
        " return [r.x + r.width / 2, r.y + r.height / 2]; })()"
    )
    await page.mouse.move(x, y)
    await page.mouse.down()
    async with page.expect_response(lambda response: "partial=1" in response.url):
        await _create(site, Task(app="billing", commands=[TaskCommand(method="billing.run")]))
    # The refresh arrived while the button is down: the page holds it (marked on <body>).
    await expect(page.locator("body")).to_have_attribute("data-swap-held", "")
    await page.mouse.up()
    await expect(table.locator("caption")).to_contain_text("page 2 of 2")


async def test_tasks_table_filters_and_pages(page: Page, site: Site) -> None:
    await _create_many(
        site,
        [
            Task(app="billing", commands=[TaskCommand(method="billing.run")], description=f"b{i}")
            for i in range(60)
        ],
    )
    finished = await _create(site, _pipeline("the special one"))
    await _ended(site, finished["id"])

    await page.goto(site.url + "/tasks")
    table = page.get_by_test_id("tasks")
    await expect(table.locator("caption")).to_contain_text("61 tasks, page 1 of 2")
    await expect(table.locator("tbody tr")).to_have_count(50)
    await page.get_by_role("link", name="Older →").click()
    await expect(table.locator("caption")).to_contain_text("page 2 of 2")
    await expect(table.locator("tbody tr")).to_have_count(11)
    await page.get_by_role("link", name="← Newer").click()
    await expect(table.locator("tbody tr")).to_have_count(50)

    await page.get_by_label("Status").select_option("FINISHED")
    await page.get_by_role("button", name="Filter").click()
    await expect(table.locator("caption")).to_contain_text("1 task")
    await expect(table).to_contain_text(finished["id"])

    await page.goto(site.url + "/tasks")
    await page.get_by_label("App").fill("billing")
    await page.get_by_role("button", name="Filter").click()
    await expect(table.locator("caption")).to_contain_text("60 tasks")

    await page.goto(site.url + "/tasks")
    await page.get_by_label("Text").fill("special")
    await page.get_by_role("button", name="Filter").click()
    await expect(table.locator("tbody tr")).to_have_count(1)
    await expect(table).to_contain_text("the special one")
    await page.get_by_label("Text").fill(finished["id"][:13])
    await page.get_by_role("button", name="Filter").click()
    await expect(table.locator("tbody tr")).to_have_count(1)

    later = (SystemClock().now() + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S")
    await page.goto(site.url + "/tasks")
    await page.get_by_label("Created from").fill(later)
    await page.get_by_role("button", name="Filter").click()
    await expect(table.locator("caption")).to_contain_text("0 tasks")
    await expect(table).to_contain_text("No tasks match.")
    await page.goto(site.url + "/tasks?since=yesterday")
    await expect(page.get_by_role("alert")).to_contain_text("not a date and time")

    await page.goto(site.url + "/tasks?app=billing")
    await screenshot(page, "dashboard-tasks", full_page=False)
    # Live: a new task shows at the top of the table without a reload.
    await _no_reload_marker(page)
    await _create(
        site,
        Task(app="billing", commands=[TaskCommand(method="billing.run")], description="brand new"),
    )
    await expect(table.locator("tbody tr").first).to_contain_text("brand new", timeout=TIMEOUT)
    await expect(table.locator("caption")).to_contain_text("61 tasks")
    await _assert_not_reloaded(page)


async def test_task_page_stages_timeline_and_tree(page: Page, site: Site) -> None:
    parent = await _create(
        site,
        Task(
            app=APP,
            description="a parent",
            commands=[
                TaskCommand(method="shop.list", params={"expired": True}),
                TaskCommand(method="shop.delete", params={"ids": "[0.data.id]"}),
                TaskCommand(method="shop.spawn", params={"count": 2}),
            ],
        ),
    )
    assert await _ended(site, parent["id"]) == "FINISHED"
    tree = await site.runtime.tasks.list(conditions={"parent_id": parent["id"]})
    assert tree["count"] == 2
    for child in tree["data"]:
        await _ended(site, child["id"])

    await page.goto(f"{site.url}/tasks/{parent['id']}")
    await expect(page.get_by_test_id("status")).to_have_text("FINISHED")
    facts = page.get_by_test_id("facts")
    await expect(facts).to_contain_text(parent["job_id"])
    await expect(facts).to_contain_text("0 of 0")
    await expect(facts).to_contain_text("3/3")  # finished: past its last stage
    stages = page.get_by_test_id("stages").locator("> li")
    await expect(stages).to_have_count(3)
    # counted from 0, as the templates count them ([0.data.id] reads "Stage 0")
    for index, method in enumerate(("shop.list", "shop.delete", "shop.spawn")):
        await expect(stages.nth(index).get_by_role("heading", level=3)).to_contain_text(
            f"Stage {index}: {method}"
        )
    second = stages.nth(1)
    await expect(second).to_contain_text("[0.data.id]")  # as written
    await expect(second.get_by_test_id("evaluated")).to_contain_text('"A-1"')  # as evaluated
    await expect(second.get_by_test_id("result")).to_contain_text('"count": 2')
    timeline = page.get_by_test_id("timeline")
    for kind in ("task-sent", "task-started", "task-stage-succeeded", "task-succeeded"):
        await expect(timeline.get_by_role("cell", name=kind, exact=True).first).to_be_visible()
    first_done = timeline.locator("tr", has_text="task-stage-succeeded").first
    await expect(first_done.locator("td").nth(3)).to_have_text("0")  # the stage, from 0
    succeeded = timeline.locator("tr", has_text="task-succeeded").first
    await expect(succeeded.locator("td").nth(3)).to_have_text("2")  # its last stage
    tree_view = page.get_by_test_id("tree")
    await expect(tree_view.locator("li")).to_have_count(3)
    for child in tree["data"]:
        await expect(tree_view.get_by_role("link", name=child["id"])).to_be_visible()
    await screenshot(page, "dashboard-task")

    # A child's page shows the same tree, with its parent linked.
    child_id = tree["data"][0]["id"]
    await tree_view.get_by_role("link", name=child_id).click()
    await expect(page.get_by_role("heading", level=1)).to_contain_text(child_id)
    await expect(
        page.get_by_test_id("facts").get_by_role("link", name=parent["id"])
    ).to_be_visible()


async def test_failed_task_shows_error_and_reset_runs_it_again(page: Page, site: Site) -> None:
    task = await _create(
        site,
        Task(app=APP, commands=[TaskCommand(method="shop.fail", params={"reason": "no stock"})]),
    )
    assert await _ended(site, task["id"]) == "FAILED"
    await page.goto(f"{site.url}/tasks/{task['id']}")
    await expect(page.get_by_test_id("task-error")).to_contain_text("no stock")
    await expect(page.get_by_test_id("timeline")).to_contain_text("task-failed")

    await _no_reload_marker(page)
    page.once("dialog", lambda dialog: _answer(dialog, [], accept=True))
    await page.get_by_role("button", name="Reset").click()
    await expect(page.get_by_role("status").filter(has_text="Task reset")).to_be_visible()
    # It runs again and fails again; the timeline shows a second failure.
    await expect(
        page.get_by_test_id("timeline").get_by_role("cell", name="task-failed", exact=True)
    ).to_have_count(2, timeout=TIMEOUT)
    await screenshot(page, "dashboard-task-failed")


async def test_cancel_a_waiting_task(page: Page, site: Site) -> None:
    task = await _create(
        site, Task(app=APP, commands=[TaskCommand(method="shop.list"), Message(max_timeout=600)])
    )
    await eventually(lambda: _in(site, task["id"], ("WAITING",)))
    await page.goto(f"{site.url}/tasks/{task['id']}")
    await expect(page.get_by_test_id("status")).to_have_text("WAITING")
    questions: list[str] = []
    page.once("dialog", lambda dialog: _answer(dialog, questions, accept=False))
    await page.get_by_role("button", name="Cancel").click()  # asked, and declined
    await eventually(lambda: questions, within=15)
    assert "Cancel this task?" in questions[0]
    assert await _status(site, task["id"]) == "WAITING"

    page.once("dialog", lambda dialog: _answer(dialog, questions, accept=True))
    await page.get_by_role("button", name="Cancel").click()
    await expect(page.get_by_role("status").filter(has_text="Task cancelled")).to_be_visible()
    await expect(page.get_by_test_id("status")).to_have_text("FAILED")
    await expect(page.get_by_test_id("timeline")).to_contain_text("task-revoked")
    assert await _status(site, task["id"]) == "FAILED"
    # An ended task offers Reset, not Cancel or a message.
    await expect(page.get_by_role("button", name="Cancel")).to_have_count(0)
    await expect(page.get_by_role("button", name="Send message")).to_have_count(0)
    await expect(page.get_by_role("button", name="Reset")).to_be_visible()


async def test_an_action_on_a_task_changed_meanwhile_is_refused(page: Page, site: Site) -> None:
    task = await _create(
        site, Task(app=APP, commands=[TaskCommand(method="shop.list"), Message(max_timeout=600)])
    )
    await eventually(lambda: _in(site, task["id"], ("WAITING",)))
    # This page does not follow the task live (its stream is refused), so it still shows the
    # task running when someone else cancels it.
    await page.route("**/stream", lambda route: route.abort())
    await page.goto(f"{site.url}/tasks/{task['id']}")
    await expect(page.get_by_role("button", name="Cancel")).to_be_visible()
    await site.runtime.tasks.cancel(task["id"])  # someone else cancels it first
    page.once("dialog", lambda dialog: _answer(dialog, [], accept=True))
    await page.get_by_role("button", name="Cancel").click()
    await expect(page.get_by_role("alert")).to_contain_text("already ended")
    assert await _status(site, task["id"]) == "FAILED"
    # The page went back to the task's own address and keeps following it live.
    await expect(page).to_have_url(f"{site.url}/tasks/{task['id']}")
    await page.unroute("**/stream")
    await page.reload()
    await site.runtime.tasks.reset(task["id"])
    await expect(page.get_by_test_id("status")).not_to_have_text("FAILED", timeout=TIMEOUT)


async def test_send_a_message_to_a_waiting_task(page: Page, site: Site) -> None:
    task = await _create(
        site,
        Task(
            app=APP,
            commands=[
                Message(max_timeout=600),
                TaskCommand(method="shop.delete", params={"ids": "[0.ids]"}),
            ],
        ),
    )
    await eventually(lambda: _in(site, task["id"], ("WAITING",)))
    await page.goto(f"{site.url}/tasks/{task['id']}")

    await page.get_by_label("Message (JSON)").fill("{not json")
    await page.get_by_role("button", name="Send message").click()
    await expect(page.get_by_role("alert")).to_contain_text("not valid JSON")
    await expect(page.get_by_label("Message (JSON)")).to_have_value("{not json")  # kept to fix
    assert await _status(site, task["id"]) == "WAITING"

    await page.get_by_label("Message (JSON)").fill('{"ids": ["B-7", "B-9"]}')
    await page.get_by_role("button", name="Send message").click()
    await expect(page.get_by_role("status").filter(has_text="Message delivered")).to_be_visible()
    await expect(page.get_by_test_id("status")).to_have_text("FINISHED", timeout=TIMEOUT)
    results = page.get_by_test_id("result")
    await expect(results.nth(1)).to_contain_text('"count": 2')
    await expect(results.nth(0)).to_contain_text("B-9")
    # The buttons are those of the status shown: a finished task offers Reset, not Cancel.
    await expect(page.get_by_role("button", name="Cancel")).to_have_count(0)
    await expect(page.get_by_role("button", name="Send message")).to_have_count(0)
    await expect(page.get_by_role("button", name="Reset")).to_be_visible()
    await screenshot(page, "dashboard-task-message")


async def test_actions_follow_the_status_shown_live(page: Page, site: Site) -> None:
    task = await _create(
        site,
        Task(
            app=APP,
            commands=[
                Message(max_timeout=600),
                TaskCommand(method="shop.delete", params={"ids": "[0.ids]"}),
            ],
        ),
    )
    await eventually(lambda: _in(site, task["id"], ("WAITING",)))
    await page.goto(f"{site.url}/tasks/{task['id']}")
    await _no_reload_marker(page)
    await expect(page.get_by_role("button", name="Cancel")).to_be_visible()
    await expect(page.get_by_role("button", name="Reset")).to_be_visible()

    # What the user is typing survives a live refresh of the part that holds the form.
    await page.get_by_label("Message (JSON)").fill('{"ids": ["half-typed"')
    refreshed = page.evaluate(
        "new Promise(done => document.addEventListener('kaiju:refreshed', () => done(true),"
        " {once: true}))"
    )
    await _create(site, Task(app=APP, commands=[TaskCommand(method="shop.list")]))
    assert await refreshed
    await expect(page.get_by_label("Message (JSON)")).to_have_value('{"ids": ["half-typed"')

    # Someone else answers it: the page shows FINISHED and, with it, FINISHED's actions.
    await site.runtime.tasks.write_message(task["id"], {"ids": ["C-1"]})
    await expect(page.get_by_test_id("status")).to_have_text("FINISHED", timeout=TIMEOUT)
    await expect(page.get_by_role("button", name="Cancel")).to_have_count(0)
    await expect(page.get_by_role("button", name="Send message")).to_have_count(0)
    await expect(page.get_by_role("button", name="Reset")).to_be_visible()
    await _assert_not_reloaded(page)

    # The button shown works: Reset runs the task again from its first stage.
    page.once("dialog", lambda dialog: _answer(dialog, [], accept=True))
    await page.get_by_role("button", name="Reset").click()
    await expect(page.get_by_role("status").filter(has_text="Task reset")).to_be_visible()
    await eventually(lambda: _in(site, task["id"], ("WAITING",)))
    await expect(page.get_by_role("button", name="Send message")).to_be_visible(timeout=TIMEOUT)
    await expect(page.get_by_role("button", name="Cancel")).to_be_visible()


async def test_login_page_hint_and_favicon_leave_no_error_in_the_console(
    browser: Browser, site: Site
) -> None:
    context = await browser.new_context()
    page = await context.new_page()
    failed: list[str] = []
    console: list[str] = []
    page.on("response", lambda r: failed.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    page.on("console", lambda m: console.append(m.text) if m.type == "error" else None)
    try:
        await page.goto(f"{site.url}/login")
        await expect(page.locator("code")).to_have_text("kaiju-tasks token create --user USER")
        icon = await page.evaluate(
            "fetch(document.querySelector('link[rel=icon]').href).then(r => r.status)"
        )
        assert icon == 200
        await page.fill("#token", site.system_token)
        await page.click("button[type=submit]")
        task = await _create(site, _pipeline())
        for path in ("/", "/tasks", f"/tasks/{task['id']}", "/workers"):
            await page.goto(site.url + path)
            await expect(page.get_by_role("heading", level=1)).to_be_visible()
        # Where a browser looks on its own, unasked, the icon is too.
        fallback = await page.goto(site.url + "/favicon.ico")
        assert fallback is not None
        assert fallback.status == 200
        assert fallback.headers["content-type"] == "image/svg+xml"
        assert failed == []
        assert console == []
    finally:
        await context.close()


async def test_workers_page_online_then_offline(page: Page, site: Site) -> None:
    executor = site.runtime.executor
    assert executor is not None
    slow = await _create(
        site, Task(app=APP, commands=[TaskCommand(method="shop.list"), Message(max_timeout=600)])
    )
    await eventually(lambda: _in(site, slow["id"], ("WAITING",)))
    await page.goto(site.url + "/workers")
    table = page.get_by_test_id("workers")
    row = table.get_by_role("row", name=re.compile(executor.id))
    await expect(row).to_contain_text("online")
    await expect(row).to_contain_text(APP)
    await expect(row).to_contain_text("s ago")
    await screenshot(page, "dashboard-workers")

    await _no_reload_marker(page)
    await executor.stop()
    site.runtime.executor = None
    await expect(row).to_contain_text("offline", timeout=TIMEOUT)
    await _assert_not_reloaded(page)


async def test_task_page_follows_a_running_task_live(page: Page, site: Site) -> None:
    task = await _create(
        site, Task(app=APP, commands=[Message(max_timeout=600), TaskCommand(method="shop.list")])
    )
    await eventually(lambda: _in(site, task["id"], ("WAITING",)))
    await page.goto(f"{site.url}/tasks/{task['id']}")
    await expect(page.get_by_test_id("status")).to_have_text("WAITING")
    await expect(page.get_by_test_id("facts")).to_contain_text("0/2")  # stage 0, as in the API
    await expect(page.locator("#live-status")).to_contain_text("live")
    await _no_reload_marker(page)
    await site.runtime.tasks.write_message(task["id"], {"from": "elsewhere"})
    await expect(page.get_by_test_id("status")).to_have_text("FINISHED", timeout=TIMEOUT)
    await expect(page.get_by_test_id("facts")).to_contain_text("2/2")
    await expect(page.get_by_test_id("timeline")).to_contain_text("task-succeeded")
    await _assert_not_reloaded(page)


async def test_user_sees_only_their_tasks(browser: Browser, site: Site) -> None:
    token = await site.user_token("alice")
    from kaiju_tasks import Caller

    alice = Caller.user("alice")
    mine = await _create(site, _pipeline("alice's"), alice)
    theirs = await _create(site, _pipeline("system's"))
    context = await browser.new_context()
    await site.log_in(context, token)
    page = await context.new_page()
    try:
        await page.goto(site.url + "/tasks")
        table = page.get_by_test_id("tasks")
        await expect(table.locator("tbody tr")).to_have_count(1)
        await expect(table).to_contain_text(mine["id"])
        await page.goto(f"{site.url}/tasks/{theirs['id']}")
        await expect(page.get_by_role("heading", name="Task not found")).to_be_visible()
        await page.goto(site.url + "/")
        await expect(page.get_by_text("view_others")).to_be_visible()
    finally:
        await context.close()


async def test_every_page_passes_an_accessibility_check(page: Page, site: Site) -> None:
    """axe-core (the engine behind Lighthouse's accessibility audit) finds no violation."""
    from axe_playwright_python.async_playwright import Axe

    task = await _create(site, _pipeline())
    await _ended(site, task["id"])
    axe = Axe()
    found: dict[str, list[str]] = {}
    for path in ("/", "/tasks", f"/tasks/{task['id']}", "/workers", "/login"):
        await page.goto(site.url + path)
        results = await axe.run(page)
        violations = results.response["violations"]
        if violations:
            found[path] = [f"{v['id']}: {v['help']} ({len(v['nodes'])})" for v in violations]
    assert found == {}
