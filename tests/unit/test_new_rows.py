"""Rows of new tasks, built from what create is given: statuses, ids, owners, errors."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from kaiju_tasks import context, errors, models, new_rows
from kaiju_tasks.store import base

NOW = datetime(2030, 1, 1, tzinfo=UTC)
ALICE = models.Caller.user("alice")
UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def build(items: Any, caller: models.Caller = models.SYSTEM, now: datetime = NOW):
    many = isinstance(items, list)
    rows = new_rows.build(items if many else [items], many, caller, now)
    return [dict(zip(base.NEW_TASK_COLUMNS, r, strict=True)) for r in rows]


def one(caller: models.Caller = models.SYSTEM, **task: Any) -> dict[str, Any]:
    task.setdefault("commands", [{"method": "a"}])
    return build(task, caller)[0]


def refused(items: Any, caller: models.Caller = models.SYSTEM) -> errors.ValidationError:
    with pytest.raises(errors.ValidationError) as info:
        build(items, caller)
    return info.value


def test_an_enabled_task_without_cron_is_queued_with_a_job_id_and_deadline():
    row = one(max_exec_timeout=60)
    assert row["status"] == "QUEUED"
    assert UUID4.match(row["job_id"])
    assert (row["queued_at"], row["next_run"]) == (NOW, None)
    assert row["exec_deadline"] == NOW + timedelta(seconds=60)
    assert row["created"] == row["status_change"] == NOW


def test_a_cron_task_waits_in_idle_for_its_first_fire_time():
    row = one(cron="30 * * * *")
    assert (row["status"], row["job_id"], row["queued_at"], row["exec_deadline"]) == (
        "IDLE",
        None,
        None,
        None,
    )
    assert row["next_run"] == NOW + timedelta(minutes=30)


def test_a_disabled_task_waits_in_idle_due_now():
    row = one(enabled=False)
    assert (row["status"], row["job_id"], row["next_run"]) == ("IDLE", None, NOW)


def test_times_are_written_in_utc():
    local = NOW.astimezone(timezone(timedelta(hours=3)))
    expires = datetime(2031, 1, 1, 3, tzinfo=timezone(timedelta(hours=3)))
    row = build({"commands": [{"method": "a"}], "expires_at": expires}, now=local)[0]
    assert row["created"].utcoffset() == timedelta(0)
    assert row["created"] == NOW
    assert row["expires_at"].utcoffset() == timedelta(0)
    assert row["expires_at"] == expires


def test_a_task_without_an_id_gets_a_fresh_uuid4_and_is_its_own_root():
    rows = build([{"commands": [{"method": "a"}]}] * 3)
    ids = [row["id"] for row in rows]
    assert all(UUID4.match(i) for i in ids)
    assert len({*ids, *(row["job_id"] for row in rows)}) == 6
    assert [row["root_id"] for row in rows] == ids


def test_fields_are_written_as_the_store_takes_them():
    row = one(id="t", priority="HIGH", restart_policy="FIRST", commands=[{"method": "a"}] * 2)
    assert (row["id"], row["priority"], row["restart_policy"], row["stages"]) == (
        "t",
        10,
        "FIRST",
        2,
    )
    assert row["commands"][0]["method"] == "a"
    assert len(build({"commands": [{"method": "a"}]})[0]) == len(base.NEW_TASK_COLUMNS)


def test_a_task_is_owned_by_its_caller_unless_it_names_an_owner():
    assert one(ALICE)["user_id"] == "alice"
    assert one(user_id="bob")["user_id"] == "bob"
    assert one()["user_id"] is None


def test_a_task_created_inside_a_running_stage_is_a_child_with_the_root_priority():
    token = context.current_task.set({"task_id": "p", "root_id": "r", "priority": 7})
    try:
        row = one(priority=-5)
    finally:
        context.current_task.reset(token)
    assert (row["parent_id"], row["root_id"], row["priority"]) == ("p", "r", 7)


def test_duplicate_ids_are_refused_naming_the_item():
    error = refused([{"id": "x", "commands": [{"method": "a"}]}] * 2)
    assert (error.field, error.message) == ("1.id", "duplicate id 'x'")


def test_invalid_items_are_refused_naming_the_item_only_when_many():
    assert refused([{"commands": [{"method": "a"}]}, {"commands": []}]).field == "1.commands"
    assert refused({"commands": []}).field == "commands"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("system", True, "only a system caller may set it"),
        ("user_id", "bob", "only a system caller may create tasks for another user"),
        ("parent_id", "p", "only a system caller may set it"),
        ("root_id", "r", "only a system caller may set it"),
    ],
)
def test_a_user_may_not_set_system_only_fields(field, value, message):
    error = refused(
        [{"commands": [{"method": "a"}]}, {"commands": [{"method": "a"}], field: value}], ALICE
    )
    assert (error.field, error.message) == (f"1.{field}", message)
    assert one(**{field: value})[field] == value


def test_a_user_may_name_itself_as_owner():
    assert one(ALICE, user_id="alice")["user_id"] == "alice"


def test_new_rows_know_their_number_and_are_read_once():
    rows = new_rows.build([{"commands": [{"method": "a"}]}] * 2, True, models.SYSTEM, NOW)
    assert len(rows) == 2
    with pytest.raises(TypeError):
        ("x",) in rows  # noqa: B015
    assert len(list(rows)) == 2
    assert list(rows) == []


def test_rows_are_validated_only_as_they_are_read():
    rows = new_rows.build([{"commands": []}], True, models.SYSTEM, NOW)
    with pytest.raises(errors.ValidationError):
        next(iter(rows))


def test_next_task_of_reads_an_item_before_validation():
    assert new_rows.next_task_of({"next_task": "n"}) == "n"
    assert new_rows.next_task_of({"commands": []}) is None
    assert new_rows.next_task_of(models.Task(commands=[{"method": "a"}], next_task="n")) == "n"
    assert new_rows.next_task_of(42) is None
