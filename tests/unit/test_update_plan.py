"""The rules of tasks.update, planned without a database: statuses, cron, deadline, errors."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from kaiju_tasks import errors, models, update_plan

NOW = datetime(2030, 1, 1, tzinfo=UTC)
QUEUED_AT = NOW - timedelta(minutes=1)
ALICE = models.Caller.user("alice")
STATUSES = [s.value for s in models.TaskStatus]


def row(**overrides: Any) -> dict[str, Any]:
    """A task row as the store returns it: one call stage, due, owned by alice."""
    values: dict[str, Any] = {
        "id": "t",
        "commands": [{"kind": "call", "method": "a", "params": None}],
        "stages": 1,
        "max_exec_timeout": 300,
        "next_task": None,
        "cron": None,
        "enabled": True,
        "status": "IDLE",
        "next_run": None,
        "queued_at": None,
        "user_id": "alice",
        "stage": 0,
        "result": [],
    }
    values.update(overrides)
    return values


def plan(
    data: dict[str, Any], caller: models.Caller = models.SYSTEM, **current: Any
) -> update_plan.UpdatePlan:
    update = update_plan.parse(data, caller)
    return update_plan.plan(row(**current), update, caller=caller, now=NOW)


def refused(data: dict[str, Any], caller: models.Caller = models.SYSTEM, **current: Any):
    with pytest.raises(errors.ValidationError) as info:
        plan(data, caller, **current)
    return info.value


# -- statuses ---------------------------------------------------------------------------------


@pytest.mark.parametrize("status", STATUSES)
def test_an_update_may_apply_in_any_status_but_executed(status):
    planned = plan({"description": "x"}, status=status)
    assert planned.allowed_statuses == update_plan.ALL_BUT_RUNNING
    assert "EXECUTED" not in planned.allowed_statuses
    assert set(planned.allowed_statuses) == set(STATUSES) - {"EXECUTED"}
    assert planned.changes == {"description": "x"}
    assert planned.commands_statuses is None


def test_a_refused_update_says_the_task_cannot_be_changed_now():
    refusal = plan({"description": "x"}, status="EXECUTED").refusal
    assert refusal.format(id="t", status="EXECUTED") == (
        "task 't' is EXECUTED: it cannot be changed now"
    )


def test_new_commands_are_guarded_by_the_statuses_in_which_commands_may_change():
    planned = plan({"commands": [{"method": "b"}, {"method": "c"}]}, status="WAITING")
    assert planned.commands_statuses == ("IDLE", "FINISHED", "FAILED", "QUEUED")
    assert planned.allowed_statuses == update_plan.ALL_BUT_RUNNING
    assert planned.refusal.format(id="t", status="WAITING").endswith(
        "(commands change only before the first stage runs or after the end)"
    )


@pytest.mark.parametrize("status", ["IDLE", "FINISHED", "FAILED"])
def test_new_commands_of_an_idle_or_ended_task_start_again_from_the_first_stage(status):
    planned = plan({"commands": [{"method": "b"}, {"method": "c"}]}, status=status, stage=1)
    assert planned.changes["stages"] == 2
    assert [c["method"] for c in planned.changes["commands"]] == ["b", "c"]
    assert (planned.changes["stage"], planned.changes["result"]) == (0, [])


@pytest.mark.parametrize("status", ["QUEUED", "WAITING", "SUSPENDED"])
def test_new_commands_of_a_task_under_way_keep_its_stage_and_results(status):
    planned = plan({"commands": [{"method": "b"}]}, status=status)
    assert "stage" not in planned.changes
    assert "result" not in planned.changes


def test_disabling_a_queued_task_takes_it_off_the_queue_if_it_is_still_queued():
    planned = plan({"enabled": False}, status="QUEUED", queued_at=QUEUED_AT)
    assert planned.changes == {"enabled": False, "status": "IDLE", "next_run": NOW, "job_id": None}
    assert planned.allowed_statuses == ("QUEUED",)


@pytest.mark.parametrize("status", ["IDLE", "WAITING", "SUSPENDED", "FINISHED", "FAILED"])
def test_disabling_a_task_that_is_not_queued_changes_only_enabled(status):
    planned = plan({"enabled": False}, status=status)
    assert planned.changes == {"enabled": False}
    assert planned.allowed_statuses == update_plan.ALL_BUT_RUNNING


def test_enabling_an_idle_task_without_a_schedule_runs_it_now():
    planned = plan({"enabled": True}, status="IDLE", enabled=False)
    assert planned.changes == {"enabled": True, "next_run": NOW}


def test_enabling_an_idle_task_keeps_a_due_time_it_already_has():
    due = NOW + timedelta(hours=1)
    assert plan({"enabled": True}, enabled=False, next_run=due).changes == {"enabled": True}


def test_enabling_an_idle_cron_task_leaves_it_to_its_schedule():
    planned = plan({"enabled": True}, enabled=False, cron="0 * * * *")
    assert planned.changes == {"enabled": True}


def test_enabling_with_an_unchanged_null_cron_still_runs_an_idle_task_now():
    planned = plan({"enabled": True, "cron": None}, enabled=False)
    assert planned.changes == {"enabled": True, "cron": None, "next_run": NOW}


@pytest.mark.parametrize("status", ["QUEUED", "WAITING", "SUSPENDED", "FINISHED", "FAILED"])
def test_enabling_a_task_that_is_not_idle_changes_only_enabled(status):
    assert plan({"enabled": True}, status=status).changes == {"enabled": True}


# -- cron -------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", ["IDLE", "FINISHED", "FAILED"])
def test_a_new_cron_of_an_idle_or_ended_task_fires_next_at_its_own_time(status):
    planned = plan({"cron": "30 * * * *"}, status=status, cron="0 0 * * *")
    assert planned.changes == {"cron": "30 * * * *", "next_run": NOW + timedelta(minutes=30)}


def test_a_cron_added_to_an_idle_task_replaces_its_due_time():
    planned = plan({"cron": "0 12 * * *"}, next_run=NOW)
    assert planned.changes["next_run"] == NOW + timedelta(hours=12)


def test_removing_the_cron_of_an_idle_task_stops_its_schedule():
    planned = plan({"cron": None}, cron="0 * * * *", next_run=NOW + timedelta(hours=1))
    assert planned.changes == {"cron": None, "next_run": None}


def test_an_unchanged_cron_keeps_the_due_time():
    planned = plan({"cron": "0 * * * *"}, cron="0 * * * *", next_run=NOW + timedelta(hours=1))
    assert planned.changes == {"cron": "0 * * * *"}


@pytest.mark.parametrize("status", ["QUEUED", "WAITING", "SUSPENDED"])
def test_a_new_cron_of_a_task_under_way_waits_for_the_run_to_end(status):
    planned = plan({"cron": "30 * * * *"}, status=status, queued_at=QUEUED_AT)
    assert planned.changes == {"cron": "30 * * * *"}


def test_a_cron_is_stored_as_validated():
    assert plan({"cron": "@hourly"}).changes["cron"] == "@hourly"


# -- deadline ---------------------------------------------------------------------------------


@pytest.mark.parametrize("status", ["QUEUED", "WAITING", "SUSPENDED"])
def test_a_new_max_exec_timeout_moves_the_deadline_of_the_run_under_way(status):
    planned = plan({"max_exec_timeout": 60}, status=status, queued_at=QUEUED_AT)
    assert planned.changes == {
        "max_exec_timeout": 60,
        "exec_deadline": QUEUED_AT + timedelta(seconds=60),
    }


@pytest.mark.parametrize("status", ["IDLE", "FINISHED", "FAILED"])
def test_a_new_max_exec_timeout_of_an_idle_or_ended_task_sets_no_deadline(status):
    planned = plan({"max_exec_timeout": 60}, status=status, queued_at=QUEUED_AT)
    assert planned.changes == {"max_exec_timeout": 60}


def test_a_task_never_queued_gets_no_deadline():
    planned = plan({"max_exec_timeout": 60}, status="SUSPENDED", queued_at=None)
    assert "exec_deadline" not in planned.changes


def test_disabling_a_queued_task_with_a_new_max_exec_timeout_still_moves_its_deadline():
    planned = plan({"enabled": False, "max_exec_timeout": 20}, status="QUEUED", queued_at=QUEUED_AT)
    assert planned.changes["status"] == "IDLE"
    assert planned.changes["exec_deadline"] == QUEUED_AT + timedelta(seconds=20)


# -- fields and errors ------------------------------------------------------------------------


def test_fields_are_stored_as_json_except_expires_at():
    expires = datetime(2031, 5, 1, 12, tzinfo=UTC)
    planned = plan({"priority": "HIGH", "restart_policy": "FIRST", "expires_at": expires})
    assert planned.changes == {"priority": 10, "restart_policy": "FIRST", "expires_at": expires}


def test_next_task_names_the_task_to_check():
    assert plan({"next_task": "other"}).next_task == "other"
    assert plan({"next_task": None}, next_task="other").next_task is None
    assert plan({"description": "x"}, next_task="other").next_task is None


def test_an_empty_update_is_refused():
    error = refused({})
    assert (error.field, error.message) == ("data", "no fields to change")


@pytest.mark.parametrize(
    ("data", "field", "message"),
    [
        ({"status": "FINISHED"}, "data.status", "cannot be changed"),
        ({"bogus": 1}, "data.bogus", "unknown field"),
        ({"max_retries": 50}, "data.max_retries", "10"),
        ({"cron": "nope"}, "data.cron", "invalid cron"),
        ({"enabled": None}, "data.enabled", "cannot be null"),
    ],
)
def test_invalid_changes_are_refused_naming_the_field(data, field, message):
    error = refused(data)
    assert error.field == field
    assert message in error.message


def test_only_a_system_caller_may_set_system():
    error = refused({"system": True}, ALICE)
    assert (error.field, error.message) == ("data.system", "only a system caller may set it")
    assert plan({"system": True}).changes == {"system": True}


def test_a_user_may_name_itself_but_no_one_else_as_the_owner():
    assert plan({"user_id": "alice"}, ALICE).changes == {"user_id": "alice"}
    error = refused({"user_id": "bob"}, ALICE)
    assert error.field == "data.user_id"
    assert "only a system caller may change it" in error.message
    assert plan({"user_id": "bob"}).changes == {"user_id": "bob"}


def test_a_task_that_would_no_longer_hold_together_is_refused_naming_the_field():
    timers = [{"kind": "call", "method": "a"}, {"kind": "timer", "seconds": 200}]
    error = refused({"max_exec_timeout": 100}, commands=timers, stages=2)
    assert error.field == "data.max_exec_timeout"
    assert "timers total 200" in error.message


def test_new_commands_are_checked_against_the_current_timeout():
    error = refused({"commands": [{"kind": "timer", "seconds": 400}]}, max_exec_timeout=300)
    assert error.field == "data.max_exec_timeout"


def test_a_task_cannot_chain_to_itself():
    error = refused({"next_task": "t"})
    assert error.field == "data.next_task"
    assert "cannot chain to itself" in error.message


def test_a_template_reading_a_later_stage_is_refused_naming_the_command():
    error = refused({"commands": [{"method": "a", "params": {"x": "[1.y]"}}, {"method": "b"}]})
    assert error.field == "data.commands.0.params"


def test_planning_leaves_the_current_row_unchanged():
    current = row(status="QUEUED", queued_at=QUEUED_AT)
    before = dict(current)
    update = update_plan.parse({"enabled": False, "max_exec_timeout": 20}, models.SYSTEM)
    update_plan.plan(current, update, caller=models.SYSTEM, now=NOW)
    assert current == before
