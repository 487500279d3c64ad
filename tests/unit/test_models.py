"""Task, TaskCommand, Timer and Message validation: limits, defaults, errors naming the field."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from kaiju_tasks import errors, models
from kaiju_tasks.models import Limit, Message, Task, TaskCommand, Timer

CALL = {"method": "m"}


def refused(build: Any, *args: Any, **kwargs: Any) -> errors.ValidationError:
    with pytest.raises(errors.ValidationError) as info:
        build(*args, **kwargs)
    return info.value


def fields(error: errors.ValidationError) -> list[str]:
    return [str(e["field"]) for e in error.errors]


def test_a_task_needs_only_commands_and_gets_the_documented_defaults():
    task = Task(commands=[CALL])
    assert task.id is None
    assert task.app_name == "default"
    assert (task.max_exec_timeout, task.max_retries, task.retry_delay) == (300, 0, 0)
    assert task.restart_policy == models.RestartPolicy.CURRENT
    assert (task.enabled, task.notify, task.system) == (True, False, False)
    assert task.priority == models.Priority.NORMAL
    assert task.commands == [TaskCommand(method="m")]


def test_app_and_app_name_are_the_same_field():
    assert Task(app="orders", commands=[CALL]).app_name == "orders"
    assert Task(app_name="orders", commands=[CALL]).app_name == "orders"


def test_priority_takes_a_name_or_a_number_within_bounds():
    assert Task(commands=[CALL], priority="high").priority == 10
    assert Task(commands=[CALL], priority="LOW").priority == -10
    assert Task(commands=[CALL], priority=models.MAX_PRIORITY).priority == 100
    assert refused(Task, commands=[CALL], priority=101).field == "priority"
    assert refused(Task, commands=[CALL], priority="urgent").field == "priority"


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"commands": []}, "commands"),
        ({"commands": [CALL] * (Limit.MAX_STAGES + 1)}, "commands"),
        ({"max_exec_timeout": Limit.MIN_T - 1}, "max_exec_timeout"),
        ({"max_exec_timeout": Limit.MAX_T + 1}, "max_exec_timeout"),
        ({"max_retries": Limit.MAX_RETRIES + 1}, "max_retries"),
        ({"max_retries": -1}, "max_retries"),
        ({"retry_delay": models.MAX_RETRY_DELAY + 1}, "retry_delay"),
        ({"id": ""}, "id"),
        ({"id": "x" * (models.MAX_ID_LENGTH + 1)}, "id"),
        ({"app_name": "a" * 257}, "app_name"),
        ({"app": "a" * 257}, "app"),  # named as given
        ({"description": "d" * 10001}, "description"),
        ({"restart_policy": "SOMETIMES"}, "restart_policy"),
        ({"cron": "every day"}, "cron"),
        ({"status": "FINISHED"}, "status"),
    ],
)
def test_a_value_past_a_limit_is_refused_naming_the_field(changes, field):
    data = {"commands": [CALL], **changes}
    assert fields(refused(Task, **data)) == [field]


def test_the_limits_themselves_are_accepted():
    task = Task(
        commands=[CALL] * Limit.MAX_STAGES,
        max_exec_timeout=Limit.MAX_T,
        max_retries=Limit.MAX_RETRIES,
        retry_delay=models.MAX_RETRY_DELAY,
        id="x" * models.MAX_ID_LENGTH,
    )
    assert len(task.commands) == Limit.MAX_STAGES


def test_every_problem_of_a_task_is_reported_at_once():
    error = refused(Task, commands=[CALL], max_retries=99, retry_delay=-1, bogus=1)
    assert sorted(fields(error)) == ["bogus", "max_retries", "retry_delay"]
    assert {e["field"]: e["message"] for e in error.errors}["bogus"] == "unknown field"
    assert "max_retries" in str(error)


def test_a_missing_field_is_named():
    error = refused(Task)
    assert error.errors == [{"field": "commands", "message": "field required"}]


def test_errors_inside_a_command_name_its_position():
    error = refused(Task, commands=[CALL, {"method": ""}, {"method": "m", "oops": 1}])
    assert sorted(fields(error)) == ["commands.1.method", "commands.2.oops"]


def test_a_command_that_is_none_of_the_kinds_is_refused_saying_what_a_command_is():
    error = refused(Task, commands=[CALL, 5])
    assert fields(error) == ["commands.1"]
    assert "TaskCommand, Timer, Message" in error.message


def test_commands_may_be_models_or_dicts_of_any_kind():
    task = Task(
        commands=[
            TaskCommand(method="a", params={"x": 1}),
            {"kind": "timer", "seconds": 5},
            {"kind": "message", "max_timeout": 60},
            {"method": "b"},
        ]
    )
    assert [c.kind for c in task.commands] == ["call", "timer", "message", "call"]
    assert task.commands[1] == Timer(5)
    assert task.commands[2] == Message(max_timeout=60)


def test_a_command_is_stored_as_its_fields():
    assert TaskCommand(method="m", params=[1]).to_json() == {
        "condition": None,
        "kind": "call",
        "method": "m",
        "params": [1],
        "max_timeout": None,
    }
    assert Timer(2.5).to_json() == {"condition": None, "kind": "timer", "seconds": 2.5}


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: TaskCommand(method=""), "method"),
        (lambda: TaskCommand(method="x" * 513), "method"),
        (lambda: TaskCommand(method="m", max_timeout=0), "max_timeout"),
        (lambda: TaskCommand(method="m", max_timeout=Limit.MAX_T + 1), "max_timeout"),
        (lambda: TaskCommand(**{"method": "m", "extra": 1}), "extra"),
        (lambda: Timer(0), "seconds"),
        (lambda: Timer(-1), "seconds"),
        (lambda: Timer(), "seconds"),
        (lambda: Message(max_timeout=-5), "max_timeout"),
    ],
)
def test_a_stage_out_of_its_limits_is_refused_naming_the_field(build, field):
    assert fields(refused(build)) == [field]


def test_a_stage_timeout_keeps_its_number_type():
    assert TaskCommand(method="m", max_timeout=10).max_timeout == 10
    assert isinstance(TaskCommand(method="m", max_timeout=10).max_timeout, int)
    assert Timer(0.5).seconds == 0.5


def test_timers_longer_than_the_task_deadline_are_refused_naming_max_exec_timeout():
    error = refused(Task, commands=[Timer(200), Timer(150), CALL], max_exec_timeout=300)
    assert fields(error) == ["max_exec_timeout"]
    assert "timers total 350 s" in error.message
    assert len(Task(commands=[Timer(200), Timer(100)], max_exec_timeout=300).commands) == 2


def test_a_task_cannot_chain_to_itself():
    error = refused(Task, id="t", commands=[CALL], next_task="t")
    assert error.errors == [{"field": "next_task", "message": "a task cannot chain to itself"}]


def test_expires_at_must_include_a_time_zone():
    naive = datetime(2030, 1, 1)  # noqa: DTZ001 - the point of it
    assert fields(refused(Task, commands=[CALL], expires_at=naive)) == ["expires_at"]
    aware = datetime(2030, 1, 1, tzinfo=UTC)
    assert Task(commands=[CALL], expires_at=aware).expires_at == aware


def test_a_template_reading_a_stage_not_run_yet_is_refused_naming_the_command_field():
    error = refused(Task, commands=[CALL, {"method": "m", "params": {"x": "[1.data]"}}])
    assert fields(error) == ["commands.1.params"]
    assert "reads the result of stage 1" in error.message
    assert len(Task(commands=[CALL, {"method": "m", "params": {"x": "[0.data]"}}]).commands) == 2


def test_parse_task_refuses_what_is_not_an_object_and_locates_errors_under_a_prefix():
    assert refused(models.parse_task, ["not", "a", "task"]).field == "data"
    error = refused(models.parse_task, {"commands": [], "max_retries": 11}, prefix="data")
    assert sorted(fields(error)) == ["data.commands", "data.max_retries"]


def test_parse_tasks_names_the_bad_item_by_its_place_in_the_callers_list():
    items = [{"commands": [CALL]}, {"commands": [CALL]}, {"commands": [CALL], "max_retries": 11}]
    assert fields(refused(models.parse_tasks, items, first=0)) == ["2.max_retries"]
    assert fields(refused(models.parse_tasks, items, first=10)) == ["12.max_retries"]
    assert [t.app_name for t in models.parse_tasks(items[:2], first=0)] == ["default"] * 2


def test_parse_update_refuses_nulls_engine_fields_and_unknown_fields_by_name():
    assert refused(models.parse_update, {"enabled": None, "max_retries": None}).errors == [
        {"field": "data.enabled", "message": "cannot be null"},
        {"field": "data.max_retries", "message": "cannot be null"},
    ]
    assert refused(models.parse_update, {"status": "FINISHED"}).errors == [
        {"field": "data.status", "message": "cannot be changed"}
    ]
    assert refused(models.parse_update, {"bogus": 1}).errors == [
        {"field": "data.bogus", "message": "unknown field"}
    ]
    assert refused(models.parse_update, [1]).field == "data"


def test_parse_update_accepts_nulls_where_a_field_may_be_cleared():
    update = models.parse_update({"cron": None, "next_task": None, "max_retries": 2})
    assert update.model_fields_set == {"cron", "next_task", "max_retries"}
    assert (update.cron, update.max_retries) == (None, 2)


def test_an_update_checks_the_same_limits_as_a_create():
    assert fields(refused(models.parse_update, {"max_exec_timeout": 5})) == [
        "data.max_exec_timeout"
    ]
    assert fields(refused(models.parse_update, {"commands": []})) == ["data.commands"]


def test_a_user_caller_holds_only_known_permissions():
    caller = models.Caller.user("alice", ["view_others"])
    assert (caller.views_all, caller.modifies_all, caller.is_system) == (True, False, False)
    error = refused(models.Caller.user, "alice", ["root"])
    assert error.field == "permissions"
    assert "unknown permission 'root'" in error.message
    assert (models.SYSTEM.views_all, models.SYSTEM.modifies_all) == (True, True)
