"""Issue 10, row 9 (dashboard part) and row 1 (dashboard part).

Row 9: no page of the dashboard ever answers 500 because of what a task holds: a stage whose
template or condition cannot be evaluated says so on the page, and a task whose content cannot
be formatted at all is shown as the JSON text stored in the database.

Row 1: a task page evaluates each stage's condition and templates at most once per view (a
costly condition costs one evaluation per view, never one per stage and part of the page).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from yarl import URL

from kaiju_tasks import conditions, templates
from kaiju_tasks.dashboard.views import _csrf, task_url
from kaiju_tasks.store import postgres
from tests.integration import test_dashboard_http as http

Client = http.Client

ODD_TEXT = "\u202eevil\u202c \u200b\u200d \U0001f600 e\u0301 \uffff \u2028 <b>&amp;</b> \\ \" ' %00"
HUGE_EXPRESSION = "[!e:" + "*".join(["2"] * 1100) + "]"  # the row's payload


def _nested(depth: int) -> str:
    return '{"a": ' * depth + "1" + "}" * depth


async def _insert(
    store: postgres.PostgresEngineStore, make_task: Any, task_id: str, **json_text: str
) -> None:
    """A finished two-stage task, then each JSON column overwritten with text as given."""
    await make_task(
        id=task_id,
        app_name="odd",
        status="FINISHED",
        stage=1,
        stages=2,
        description=ODD_TEXT,
        commands=[{"method": "odd.first"}, {"method": "odd.second"}],
        result=[{"ok": True}, {"ok": True}],
    )
    async with store.pool.acquire() as connection:
        for column, text in json_text.items():
            assert column in ("commands", "kws", "result", "error")
            await connection.execute(
                f"UPDATE tasks SET {column} = $2::text::jsonb WHERE id = $1", task_id, text
            )


CASES: dict[str, dict[str, str]] = {
    # The stage's method and params templates fail when rendered for the page.
    "failing-template": {
        "commands": json.dumps(
            [
                {"kind": "call", "method": "odd.first", "params": {}},
                {"kind": "call", "method": HUGE_EXPRESSION, "params": {"x": HUGE_EXPRESSION}},
            ]
        ),
    },
    # The second stage was skipped; its condition raises when evaluated for the page.
    "failing-condition": {
        "commands": json.dumps(
            [
                {"kind": "call", "method": "odd.first", "params": {}},
                {
                    "kind": "call",
                    "method": "odd.second",
                    "params": {},
                    "condition": {"0.ok": {"eq": HUGE_EXPRESSION}},
                },
            ]
        ),
        "result": '[{"ok": true}, null]',
    },
    # Content no formatter expects: nesting deeper than any decoder allows, numbers beyond
    # 64 bits, a stage that is not an object, odd Unicode everywhere.
    "deep-result": {"result": f"[{_nested(5000)}, {_nested(900)}]"},
    "huge-numbers": {"kws": '{"n": 1e400, "m": 123456789012345678901234567890}'},
    "odd-stage": {"commands": json.dumps(["not a stage", {"method": ODD_TEXT}, 7])},
    "odd-unicode": {
        "kws": json.dumps({ODD_TEXT: ODD_TEXT}),
        "error": json.dumps({"message": ODD_TEXT}),
        "result": json.dumps([ODD_TEXT, {"k": ODD_TEXT}]),
    },
}


@pytest.mark.parametrize("case", sorted(CASES))
async def test_no_page_answers_500_because_of_a_task_s_content(
    client: Client,
    sessions: dict[str, str],
    store: postgres.PostgresEngineStore,
    make_task: Any,
    case: str,
) -> None:
    task_id = f"odd-{case}"
    await _insert(store, make_task, task_id, **CASES[case])
    for who in ("system", "alice"):  # alice may not see it: 404, never 500
        headers = http._cookie(sessions[who])
        for path in (task_url(task_id), task_url(task_id, partial="1"), "/", "/tasks", "/workers"):
            response = await client.get(URL(path, encoded=True), headers=headers)
            assert response.status in ((200, 404) if who == "alice" else (200,)), (who, path)
            await response.read()
    headers = http._cookie(sessions["system"])
    body = await (await client.get(URL(task_url(task_id), encoded=True), headers=headers)).text()
    listing = await (await client.get("/tasks?app=odd", headers=headers)).text()
    assert task_id in listing
    if case == "failing-template":
        assert "Cannot evaluate here" in body
    elif case == "failing-condition":
        assert "cannot evaluate here" in body
    elif case in ("deep-result", "huge-numbers", "odd-stage"):
        # Shown as stored: the JSON text itself, cut to what a page shows.
        assert "its JSON as stored" in body
        column = {"deep-result": "result", "huge-numbers": "kws", "odd-stage": "commands"}[case]
        assert f'data-testid="raw-{column}"' in body
    if case in ("huge-numbers",):
        assert "123456789012345678901234567890" in body
    if case == "odd-unicode":
        assert "\u202eevil" in body
    # Its actions still work from the page: a reset of the odd task is done, not a crash.
    reset = await client.post(
        "/actions/reset",
        data={"csrf": _csrf(sessions["system"]), "id": task_id},
        headers=headers,
        allow_redirects=False,
    )
    assert reset.status in (303, 409, 422), await reset.text()


async def test_odd_ids_in_addresses_are_a_clear_not_found(
    client: Client, sessions: dict[str, str]
) -> None:
    headers = http._cookie(sessions["system"])
    for path in (
        "/tasks/%ED%A0%80",
        "/tasks/%FF%FE",
        "/tasks/%00",
        "/task",
        "/task?id=",
        "/task?id=%00",
        "/task?id=" + "x" * 5000,
        "/tasks/" + "%F0%9F%98%80" * 200,
    ):
        response = await client.get(URL(path, encoded=True), headers=headers)
        assert response.status == 404, path


async def test_the_task_page_evaluates_each_stage_once_per_view(
    client: Client,
    sessions: dict[str, str],
    store: postgres.PostgresEngineStore,
    make_task: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stages = 6
    commands = [
        {
            "kind": "call",
            "method": "odd.step",
            "params": {"text": "[kws.s]"},
            "condition": {"kws.s": {"match": "(a+)+$"}},  # row 1's pattern
        }
        for _ in range(stages)
    ]
    await make_task(
        id="regex-task",
        status="FINISHED",
        stage=stages,
        stages=stages,
        commands=commands,
        kws={"s": "a" * 26 + "!"},
        result=[None] * stages,  # every stage skipped: each condition is shown
    )
    calls = {"conditions": 0, "templates": 0}
    evaluate, render = conditions.evaluate, templates.render

    def counted_evaluate(*args: Any, **kwargs: Any) -> Any:
        calls["conditions"] += 1
        return evaluate(*args, **kwargs)

    def counted_render(*args: Any, **kwargs: Any) -> Any:
        calls["templates"] += 1
        return render(*args, **kwargs)

    monkeypatch.setattr(conditions, "evaluate", counted_evaluate)
    monkeypatch.setattr(templates, "render", counted_render)
    headers = http._cookie(sessions["system"])
    for path in (task_url("regex-task"), task_url("regex-task", partial="1")):
        calls.update(conditions=0, templates=0)
        response = await client.get(path, headers=headers)
        assert response.status == 200
        assert (await response.text()).count("skipped: the condition was false") == stages
        assert calls["conditions"] == stages  # once per stage per view
        assert calls["templates"] <= 2 * stages  # at most its method and params, once each


async def test_a_task_page_has_one_work_allowance_for_all_its_stages(
    client: Client, sessions: dict[str, str], make_task: Any
) -> None:
    # Each stage alone fits the executor's allowance; all of them together would take the
    # page past it, so the later stages say why they are not evaluated instead of stalling.
    stages = 40
    heavy = "[!e:" + " and ".join(["kws.a == kws.b"] * 40) + "]"
    await make_task(
        id="heavy-page",
        status="FINISHED",
        stage=stages,
        stages=stages,
        commands=[{"kind": "call", "method": "m", "params": {"x": heavy}}] * stages,
        kws={"a": list(range(2_000)), "b": list(range(2_000))},
        result=[True] * stages,
    )
    response = await client.get(task_url("heavy-page"), headers=http._cookie(sessions["system"]))
    assert response.status == 200
    assert "too much work" in await response.text()


async def test_a_filter_at_the_last_second_there_is_is_no_error(
    client: Client, sessions: dict[str, str]
) -> None:
    headers = http._cookie(sessions["system"])
    for until in ("9999-12-31T23:59:59", "9999-12-31T23:59:59%2B00:00"):
        response = await client.get(URL(f"/tasks?until={until}", encoded=True), headers=headers)
        assert response.status == 200, until
