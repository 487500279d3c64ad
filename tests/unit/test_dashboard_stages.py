"""A task page shows each stage as its kind in the registry says, and an unknown kind as unknown."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from kaiju_tasks.dashboard import pages, render
from kaiju_tasks.testing import FrozenClock

NOW = datetime(2030, 1, 1, tzinfo=UTC)


def a_task(commands: list[Any], **fields: Any) -> dict[str, Any]:
    task: dict[str, Any] = {
        "id": "t1",
        "app_name": "orders",
        "status": "WAITING",
        "stage": 1,
        "stages": len(commands),
        "exit_code": None,
        "job_id": "j1",
        "retries": 0,
        "max_retries": 0,
        "restart_policy": "CURRENT",
        "retry_delay": 0,
        "priority": 0,
        "executor_id": None,
        "created": NOW,
        "status_change": NOW,
        "exec_deadline": None,
        "wait_deadline": None,
        "expires_at": None,
        "cron": None,
        "next_task": None,
        "parent_id": None,
        "user_id": None,
        "description": None,
        "error": None,
        "kws": {"n": 2},
        "result": [{"id": "A-1"}],
        "commands": commands,
    }
    return {**task, **fields}


def shown_page(task: dict[str, Any]) -> str:
    dashboard = render.Dashboard(None, None, None, clock=FrozenClock(NOW))  # type: ignore[arg-type]
    stages = pages._stages(task, NOW)
    context = {
        "task": task,
        "stages": stages,
        "canonical": "/tasks/t1",
        "timeline": [],
        "timeline_cut": False,
        "tree": [],
        "tree_ids": [],
        "can_modify": True,
        "can_reset": True,
        "can_cancel": True,
        "can_message": False,
        "notice": None,
        "error": None,
        "message": "",
        "user": None,
        "system": True,
        "csrf": "",
        "path": "/tasks/t1",
        "partial": True,
        "now": NOW,
        "static": lambda name: name,
    }
    return dashboard.env.get_template("task.html").render(context)


CALL = {"kind": "call", "method": "orders.get", "params": {"n": "[kws.n]"}, "condition": None}
TIMER = {"kind": "timer", "seconds": 100, "condition": None}
MESSAGE = {"kind": "message", "max_timeout": 60, "condition": None}


def test_each_stage_carries_its_kinds_label_and_fields():
    stages = pages._stages(a_task([CALL, TIMER, MESSAGE], stage=2), NOW)
    assert [(s["kind"], s["label"], s["label_is_code"], s["shown"]) for s in stages] == [
        ("call", "orders.get", True, ("params",)),
        ("timer", "timer, 100 s", False, ()),
        ("message", "message, waits up to 60 s", False, ()),
    ]
    assert stages[0]["evaluated"] == {"method": "orders.get", "params": {"n": 2}}
    assert [s["takes_message"] for s in stages] == [False, False, True]


def test_only_a_task_waiting_at_a_message_stage_offers_the_message_action():
    waiting = pages._stages(a_task([CALL, MESSAGE]), NOW)
    assert waiting[1]["takes_message"]
    assert not pages._stages(a_task([CALL, TIMER]), NOW)[1]["takes_message"]


def test_the_page_shows_each_kinds_label_and_a_calls_params():
    page = shown_page(a_task([CALL, TIMER, MESSAGE]))
    assert '<span class="mono">orders.get</span>' in page
    assert "timer, 100 s" in page
    assert "message, waits up to 60 s" in page
    assert page.count("Params as written") == 1
    assert "&#34;[kws.n]&#34;" in page  # the call's params as written
    assert "&#34;n&#34;: 2" in page  # and as evaluated


@pytest.mark.parametrize(
    ("stored", "label"),
    [
        ({"kind": "teleport", "max_timeout": 5}, "unknown stage kind &#39;teleport&#39;"),
        (["not", "a", "stage"], "not a stage (list)"),
    ],
)
def test_a_stage_of_an_unknown_kind_is_shown_as_unknown_never_as_another_kind(stored, label):
    page = shown_page(a_task([CALL, stored]))
    assert label in page
    assert "message" not in page.split("Stage 1:", 1)[1].split("</h3>", 1)[0]
    (item,) = pages._stages(a_task([stored]), NOW)
    assert (item["label_is_code"], item["shown"], item["takes_message"]) == (False, (), False)
    assert item["evaluated"] is None
