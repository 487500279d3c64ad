"""TaskService and NotificationService against a real PostgreSQL."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from kaiju_tasks import (
    Caller,
    Condition,
    InvalidTransition,
    Message,
    NotAuthorized,
    Task,
    TaskCommand,
    TaskNotFound,
    TaskStatus,
    Timer,
    ValidationError,
    errors,
    testing,
)
from kaiju_tasks.store import tables

ALICE = Caller.user("alice")
BOB = Caller.user("bob")
AUDITOR = Caller.user("auditor", ["view_others"])
ADMIN = Caller.user("admin", ["view_others", "modify_others"])


def simple(**kw):
    return Task(commands=[TaskCommand(method="do.something")], **kw)


# -- create -------------------------------------------------------------------------------------


async def test_create_due_task_is_queued_with_a_job_id_and_deadline(task_service, clock):
    task = await task_service.create(simple(id="t1"))
    assert task["id"] == "t1"
    assert task["status"] == TaskStatus.QUEUED
    assert task["job_id"]
    assert task["queued_at"] == clock.now().isoformat()
    assert task["exec_deadline"] == (clock.now() + timedelta(seconds=300)).isoformat()
    assert task["result"] == []
    assert task["exit_code"] is None
    assert task["error"] is None
    assert task["stage"] == 0
    assert task["stages"] == 1
    assert task["app_name"] == "default"
    assert task["root_id"] == "t1"


async def test_create_generates_an_id_when_none_is_given(task_service):
    task = await task_service.create(simple())
    assert len(task["id"]) == 36


async def test_create_cron_task_waits_in_idle_for_its_first_fire_time(task_service, clock):
    task = await task_service.create(simple(cron="0 * * * *"))
    assert task["status"] == TaskStatus.IDLE
    assert task["job_id"] is None
    assert task["next_run"] == (clock.now() + timedelta(hours=1)).isoformat()


async def test_create_disabled_task_waits_in_idle(task_service, clock):
    task = await task_service.create(simple(enabled=False))
    assert task["status"] == TaskStatus.IDLE
    assert task["next_run"] == clock.now().isoformat()


async def test_create_accepts_app_and_app_name(task_service):
    a = await task_service.create(simple(app="orders"))
    b = await task_service.create({"app_name": "billing", "commands": [{"method": "x"}]})
    assert (a["app_name"], b["app_name"]) == ("orders", "billing")


async def test_create_keeps_condition_and_max_timeout_on_commands(task_service):
    task = await task_service.create(
        Task(
            commands=[
                TaskCommand(method="a", max_timeout=100),
                TaskCommand(method="b", condition=Condition({"0.count": {"gt": 0}})),
                Timer(10),
                Message(max_timeout=50),
            ]
        )
    )
    commands = task["commands"]
    assert commands[0]["max_timeout"] == 100
    assert commands[1]["condition"] == {"0.count": {"gt": 0}}
    assert commands[2] == {"kind": "timer", "seconds": 10, "condition": None}
    assert commands[3]["kind"] == "message"
    assert commands[3]["max_timeout"] == 50


async def test_create_many_inserts_all_in_one_call(task_service):
    created = await task_service.create([simple(id=f"bulk{i}") for i in range(50)])
    assert [t["id"] for t in created] == [f"bulk{i}" for i in range(50)]
    page = await task_service.list(conditions={"id": {"like": "bulk%"}}, limit=1)
    assert page["count"] == 50


async def test_create_many_can_return_selected_columns_only(task_service):
    created = await task_service.create([simple(), simple()], columns=["id", "status"])
    assert all(set(t) == {"id", "status"} for t in created)


async def test_create_refuses_an_existing_id(task_service):
    await task_service.create(simple(id="dup"))
    with pytest.raises(errors.Conflict, match=r"^task 'dup' already exists$"):
        await task_service.create(simple(id="dup"))


async def test_create_refuses_duplicate_ids_within_one_batch(task_service):
    with pytest.raises(ValidationError, match="duplicate id 'x'") as exc:
        await task_service.create([simple(id="x"), simple(id="x")])
    assert exc.value.field == "1.id"


async def test_create_rejects_a_next_task_that_does_not_exist(task_service):
    with pytest.raises(ValidationError, match="'ghost' does not exist") as exc:
        await task_service.create(simple(next_task="ghost"))
    assert exc.value.field == "next_task"


async def test_create_accepts_a_next_task_created_in_the_same_batch(task_service):
    created = await task_service.create([simple(id="a", next_task="b"), simple(id="b")])
    assert created[0]["next_task"] == "b"


async def test_bulk_create_validation_error_names_the_item(task_service):
    with pytest.raises(ValidationError) as exc:
        await task_service.create([{"commands": [{"method": "x"}]}, {"commands": []}])
    assert exc.value.field == "1.commands"


# -- validation: one test per rule ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "field", "message"),
    [
        ({"commands": []}, "commands", "at least 1"),
        ({"commands": [{"method": "x"}] * 101}, "commands", "at most 100"),
        ({}, "commands", "field required"),
        ({"commands": [{"params": {}}]}, "commands.0.method", "field required"),
        ({"commands": [{"method": ""}]}, "commands.0.method", "at least 1"),
        ({"commands": [{"method": "x", "bogus": 1}]}, "commands.0.bogus", "unknown field"),
        ({"commands": [{"method": "x", "max_timeout": 0}]}, "commands.0.max_timeout", "greater"),
        ({"commands": [{"method": "x", "max_timeout": 14401}]}, "commands.0.max_timeout", "less"),
        ({"commands": [{"kind": "timer", "seconds": -1}]}, "commands.0.seconds", "greater"),
        ({"commands": [{"kind": "nope"}]}, "commands.0", "TaskCommand, Timer, Message"),
        ({"commands": ["x"]}, "commands.0", "TaskCommand, Timer, Message"),
        ({"commands": [{"method": "x"}], "max_exec_timeout": 9}, "max_exec_timeout", "10"),
        ({"commands": [{"method": "x"}], "max_exec_timeout": 14401}, "max_exec_timeout", "14400"),
        ({"commands": [{"method": "x"}], "max_retries": 11}, "max_retries", "10"),
        ({"commands": [{"method": "x"}], "max_retries": -1}, "max_retries", "0"),
        ({"commands": [{"method": "x"}], "restart_policy": "LAST"}, "restart_policy", "CURRENT"),
        ({"commands": [{"method": "x"}], "cron": "every day"}, "cron", "invalid cron"),
        ({"commands": [{"method": "x"}], "cron": "61 * * * *"}, "cron", "invalid cron"),
        ({"commands": [{"method": "x"}], "priority": 101}, "priority", "100"),
        ({"commands": [{"method": "x"}], "priority": "URGENT"}, "priority", "integer"),
        ({"commands": [{"method": "x"}], "id": ""}, "id", "at least 1"),
        ({"commands": [{"method": "x"}], "id": "x" * 257}, "id", "at most 256"),
        ({"commands": [{"method": "x"}], "kws": []}, "kws", "dictionary"),
        ({"commands": [{"method": "x"}], "max_retires": 3}, "max_retires", "unknown field"),
        ({"commands": [{"method": "x"}], "retry_delay": -5}, "retry_delay", "0"),
        ({"commands": [{"method": "x"}], "id": "a", "next_task": "a"}, "next_task", "itself"),
        (
            {"commands": [{"method": "x"}, {"kind": "timer", "seconds": 400}]},
            "max_exec_timeout",
            "timers total 400",
        ),
        ({"commands": [{"method": "[]"}]}, "commands.0.method", "empty path"),
        (
            {"commands": [{"method": "x", "params": {"a": ["[]"]}}]},
            "commands.0.params",
            "at params.a.0",
        ),
        (
            {"commands": [{"method": "x", "condition": {"a": {"bogus_op": 1}}}]},
            "commands.0.condition",
            "bogus_op",
        ),
        (
            {"commands": [{"method": "x"}], "expires_at": "2030-01-01T00:00:00"},
            "expires_at",
            "timezone",
        ),
    ],
)
async def test_create_rejects_invalid_field_naming_field_and_rule(
    task_service, data, field, message
):
    with pytest.raises(ValidationError) as exc:
        await task_service.create(data)
    assert exc.value.field == field, exc.value.errors
    assert message.lower() in str(exc.value).lower()


def test_building_a_task_with_bad_data_raises_our_validation_error():
    with pytest.raises(ValidationError) as exc:
        Task(commands=[TaskCommand(method="x")], max_retries=99)
    assert exc.value.field == "max_retries"
    with pytest.raises(ValidationError) as exc:
        TaskCommand(method="x", max_timeout=-1)
    assert exc.value.field == "max_timeout"


def test_priority_accepts_names():
    assert Task(commands=[{"method": "x"}], priority="HIGH").priority == 10
    assert Task(commands=[{"method": "x"}], priority="low").priority == -10


# -- get / exists ---------------------------------------------------------------------------------


async def test_get_returns_selected_columns(task_service):
    await task_service.create(simple(id="g"))
    data = await task_service.get(id="g", columns=["result", "exit_code", "error"])
    assert data == {"result": [], "exit_code": None, "error": None}


async def test_get_unknown_task_raises_not_found(task_service):
    with pytest.raises(TaskNotFound, match="'nope'"):
        await task_service.get("nope")


async def test_get_rejects_unknown_columns(task_service):
    await task_service.create(simple(id="g"))
    with pytest.raises(ValidationError, match="unknown column 'password'") as exc:
        await task_service.get("g", columns=["id", "password"])
    assert exc.value.field == "columns.1"


async def test_exists(task_service):
    await task_service.create(simple(id="e"))
    assert await task_service.exists("e")
    assert not await task_service.exists("f")


# -- list and filters -----------------------------------------------------------------------------


@pytest.fixture
async def five(make_task, clock):
    rows = []
    for i, (status, app, prio) in enumerate(
        [
            ("QUEUED", "orders", 0),
            ("FINISHED", "orders", 10),
            ("FAILED", "billing", -10),
            ("IDLE", "billing", 0),
            ("WAITING", "mail", 5),
        ]
    ):
        rows.append(
            await make_task(
                id=f"task{i}",
                status=status,
                app_name=app,
                priority=prio,
                created=clock.now() + timedelta(minutes=i),
                description=None if i == 4 else f"number {i}",
            )
        )
    return rows


async def _ids(task_service, **kw):
    page = await task_service.list(sort=["id"], **kw)
    return [t["id"] for t in page["data"]]


async def test_list_returns_page_metadata(task_service, five):
    page = await task_service.list(sort=["id"], offset=2, limit=2)
    assert page["count"] == 5
    assert page["offset"] == 2
    assert page["page"] == 2
    assert page["pages"] == 3
    assert page["on_page"] == 2
    assert [t["id"] for t in page["data"]] == ["task2", "task3"]


async def test_list_without_count(task_service, five):
    page = await task_service.list(count=False, limit=1)
    assert page["count"] is None
    assert page["pages"] is None
    assert page["on_page"] == 1


async def test_list_caps_limit_at_1000(task_service):
    await task_service.create([simple() for _ in range(1005)], columns=["id"])
    page = await task_service.list(limit=5000, columns=["id"])
    assert (page["on_page"], page["count"], page["pages"]) == (1000, 1005, 2)


async def test_list_rejects_negative_offset_and_zero_limit(task_service):
    with pytest.raises(ValidationError) as exc:
        await task_service.list(offset=-1)
    assert exc.value.field == "offset"
    with pytest.raises(ValidationError) as exc:
        await task_service.list(limit=0)
    assert exc.value.field == "limit"


@pytest.mark.parametrize(
    ("conditions", "expected"),
    [
        ({"status": "QUEUED"}, ["task0"]),
        ({"app_name": ["orders", "mail"]}, ["task0", "task1", "task4"]),
        ({"app_name": "orders", "priority": 10}, ["task1"]),
        ([{"app_name": "mail"}, {"status": "FAILED"}], ["task2", "task4"]),
        ({"priority": {"eq": 0}}, ["task0", "task3"]),
        ({"priority": {"ne": 0}}, ["task1", "task2", "task4"]),
        ({"priority": {"gt": 0}}, ["task1", "task4"]),
        ({"priority": {"lt": 0}}, ["task2"]),
        ({"priority": {"ge": 5}}, ["task1", "task4"]),
        ({"priority": {"le": -10}}, ["task2"]),
        ({"priority": {"ge": 0, "le": 5}}, ["task0", "task3", "task4"]),
        ({"id": {"like": "task_"}}, ["task0", "task1", "task2", "task3", "task4"]),
        ({"description": {"like": "%ber 3"}}, ["task3"]),
        ({"status": {"in": ["IDLE", "WAITING"]}}, ["task3", "task4"]),
        ({"status": {"not": "QUEUED"}}, ["task1", "task2", "task3", "task4"]),
        ({"status": {"not": ["QUEUED", "FAILED"]}}, ["task1", "task3", "task4"]),
        ({"priority": {"not": {"gt": 0}}}, ["task0", "task2", "task3"]),
        ({"description": None}, ["task4"]),
        ({"description": {"ne": None}}, ["task0", "task1", "task2", "task3"]),
        ({"created": {"ge": "2030-01-01T00:03:00+00:00"}}, ["task3", "task4"]),
        ({}, ["task0", "task1", "task2", "task3", "task4"]),
    ],
)
async def test_list_filters(task_service, five, conditions, expected):
    assert await _ids(task_service, conditions=conditions) == expected


async def test_list_sorts_descending_and_by_several_keys(task_service, five):
    assert await _ids_sorted(task_service, [{"desc": "created"}]) == [
        "task4",
        "task3",
        "task2",
        "task1",
        "task0",
    ]
    assert await _ids_sorted(task_service, [{"asc": "app_name"}, {"desc": "priority"}]) == [
        "task3",
        "task2",
        "task4",
        "task1",
        "task0",
    ]


async def _ids_sorted(task_service, sort):
    return [t["id"] for t in (await task_service.list(sort=sort))["data"]]


async def test_list_selects_columns(task_service, five):
    page = await task_service.list(columns=["id", "status"], limit=1)
    assert set(page["data"][0]) == {"id", "status"}


@pytest.mark.parametrize(
    ("kw", "field", "message"),
    [
        ({"conditions": {"password": 1}}, "conditions.password", "unknown column"),
        ({"conditions": {"status": {"regex": "x"}}}, "conditions.status.regex", "unknown operator"),
        ({"conditions": {"priority": "high"}}, "conditions.priority", "does not fit"),
        ({"conditions": {"priority": {"in": 5}}}, "conditions.priority.in", "takes a list"),
        ({"conditions": {"priority": {"like": "1%"}}}, "conditions.priority.like", "text column"),
        ({"conditions": {"kws": {"a": 1}}}, "conditions.kws", "cannot be filtered"),
        ({"conditions": "status = 'QUEUED'"}, "conditions", "object or a list"),
        ({"conditions": [1]}, "conditions.0", "objects"),
        ({"sort": [{"sideways": "id"}]}, "sort.0", "'asc' or 'desc'"),
        ({"sort": ["nope"]}, "sort.0", "unknown column"),
        ({"columns": ["id", "nope"]}, "columns.1", "unknown column"),
        ({"columns": []}, "columns", "non-empty"),
        ({"conditions": {"created": {"gt": "yesterday"}}}, "conditions.created.gt", "does not fit"),
    ],
)
async def test_list_rejects_bad_filters_naming_the_field(task_service, kw, field, message):
    with pytest.raises(ValidationError, match=message) as exc:
        await task_service.list(**kw)
    assert exc.value.field == field


@pytest.mark.parametrize(
    "kw",
    [
        {"conditions": {"id; DROP TABLE tasks; --": 1}},
        {"conditions": {"id": {"eq); DROP TABLE tasks; --": 1}}},
        {"sort": ["id; DROP TABLE tasks"]},
        {"sort": [{"desc": "created DESC, (SELECT pg_sleep(5))"}]},
        {"columns": ["id, (SELECT current_user)"]},
        {"columns": ["*"]},
    ],
)
async def test_sql_injection_through_names_is_a_validation_error(task_service, five, kw):
    with pytest.raises(ValidationError):
        await task_service.list(**kw)
    assert (await task_service.list())["count"] == 5


async def test_sql_injection_through_values_is_just_a_value(task_service, five):
    page = await task_service.list(conditions={"id": "task0' OR '1'='1"})
    assert page["count"] == 0
    page = await task_service.list(conditions={"description": {"like": "%' OR 1=1 --"}})
    assert page["count"] == 0
    assert (await task_service.list())["count"] == 5


# -- update ---------------------------------------------------------------------------------------


async def test_update_changes_allowed_fields(task_service):
    await task_service.create(simple(id="u", cron="0 0 * * *"))
    task = await task_service.update(
        "u",
        {
            "kws": {"a": 1},
            "max_retries": 3,
            "description": "nightly",
            "priority": "HIGH",
            "commands": [{"method": "a"}, {"method": "b"}],
        },
    )
    assert task["kws"] == {"a": 1}
    assert task["max_retries"] == 3
    assert task["priority"] == 10
    assert task["stages"] == 2
    assert task["commands"][1]["method"] == "b"


async def test_update_of_cron_moves_next_run_of_idle_task(task_service, clock):
    await task_service.create(simple(id="u", cron="0 0 * * *"))
    task = await task_service.update("u", {"cron": "30 * * * *"})
    assert task["next_run"] == (clock.now() + timedelta(minutes=30)).isoformat()


@pytest.mark.parametrize(
    ("data", "field", "message"),
    [
        ({"status": "FINISHED"}, "data.status", "cannot be changed"),
        ({"result": []}, "data.result", "cannot be changed"),
        ({"bogus": 1}, "data.bogus", "unknown field"),
        ({"max_retries": 50}, "data.max_retries", "10"),
        ({"cron": "nope"}, "data.cron", "invalid cron"),
        ({}, "data", "no fields"),
        (
            {"max_exec_timeout": 10, "commands": [{"kind": "timer", "seconds": 20}]},
            "data.max_exec_timeout",
            "timers total",
        ),
    ],
)
async def test_update_rejects_bad_changes(task_service, data, field, message):
    await task_service.create(simple(id="u"))
    with pytest.raises(ValidationError, match=message) as exc:
        await task_service.update("u", data)
    assert exc.value.field == field


async def test_update_checks_merged_task_consistency(task_service):
    await task_service.create(
        Task(id="u", commands=[TaskCommand(method="a"), Timer(200)], max_exec_timeout=300)
    )
    with pytest.raises(ValidationError, match="timers total 200") as exc:
        await task_service.update("u", {"max_exec_timeout": 100})
    assert exc.value.field == "data.max_exec_timeout"


async def test_update_refuses_a_running_task(task_service, make_task):
    await make_task(id="run", status="EXECUTED", executor_id="ex1")
    with pytest.raises(InvalidTransition, match="EXECUTED"):
        await task_service.update("run", {"description": "x"})


async def test_update_refuses_new_commands_mid_pipeline(task_service, make_task):
    await make_task(
        id="w",
        status="WAITING",
        stage=1,
        commands=[{"method": "a"}, Timer(10), {"method": "b"}],
        result=[1],
    )
    with pytest.raises(InvalidTransition, match="commands change only"):
        await task_service.update("w", {"commands": [{"method": "c"}]})
    task = await task_service.update("w", {"description": "fine"})
    assert task["description"] == "fine"


async def test_update_unknown_task_raises_not_found(task_service):
    with pytest.raises(TaskNotFound):
        await task_service.update("ghost", {"description": "x"})


async def test_update_validates_new_next_task(task_service):
    await task_service.create(simple(id="u"))
    with pytest.raises(ValidationError, match="'ghost' does not exist"):
        await task_service.update("u", {"next_task": "ghost"})


# -- delete / reset / cancel / write_message -----------------------------------------------------


async def test_delete_removes_the_task_and_unchains_others(task_service):
    await task_service.create([simple(id="a", next_task="b"), simple(id="b")])
    await task_service.delete("b")
    assert not await task_service.exists("b")
    assert (await task_service.get("a"))["next_task"] is None
    with pytest.raises(TaskNotFound):
        await task_service.delete("b")


async def test_reset_returns_task_to_initial_state_and_queues_it(task_service, make_task, clock):
    await make_task(
        id="r",
        status="FAILED",
        stage=1,
        retries=2,
        max_retries=3,
        commands=[{"method": "a"}, {"method": "b"}],
        result=[{"ok": 1}],
        error={"code": 1, "message": "boom"},
        exit_code=1,
        job_id="old",
        next_run=None,
    )
    clock.advance(60)
    task = await task_service.reset(id="r")
    assert task["status"] == TaskStatus.QUEUED
    assert task["stage"] == 0
    assert task["result"] == []
    assert task["retries"] == 0
    assert task["error"] is None
    assert task["exit_code"] is None
    assert task["job_id"] not in (None, "old")
    assert task["queued_at"] == clock.now().isoformat()
    assert task["exec_deadline"] == (clock.now() + timedelta(seconds=300)).isoformat()


async def test_reset_of_disabled_task_leaves_it_idle_and_due(task_service, make_task, clock):
    await make_task(id="r", status="FINISHED", enabled=False, next_run=None)
    task = await task_service.reset("r")
    assert task["status"] == TaskStatus.IDLE
    assert task["next_run"] == clock.now().isoformat()


async def test_reset_refuses_a_running_task(task_service, make_task):
    await make_task(id="r", status="EXECUTED")
    with pytest.raises(InvalidTransition, match="cancel it"):
        await task_service.reset("r")


async def test_cancel_fails_a_task_with_exit_code_130(task_service):
    await task_service.create(simple(id="c"))
    task = await task_service.cancel("c")
    assert task["status"] == TaskStatus.FAILED
    assert task["exit_code"] == 130
    assert task["error"]["reason"] == "cancelled"


async def test_cancel_of_ended_task_is_refused(task_service, make_task):
    await make_task(id="c", status="FINISHED", exit_code=0)
    with pytest.raises(InvalidTransition, match="already ended"):
        await task_service.cancel("c")


async def test_write_message_resumes_waiting_task_with_data_as_stage_result(
    task_service, make_task
):
    await make_task(
        id="m",
        status="WAITING",
        stage=1,
        commands=[{"method": "statistics.request_report"}, Message(), {"method": "files.download"}],
        result=[{"requested": True}],
    )
    task = await task_service.write_message(
        id="m", data={"url": "http://statistics.example/reports/324934"}
    )
    assert task["status"] == TaskStatus.QUEUED
    assert task["stage"] == 2
    assert task["result"] == [
        {"requested": True},
        {"url": "http://statistics.example/reports/324934"},
    ]


async def test_write_message_to_task_not_waiting_is_refused(task_service, make_task):
    await make_task(id="m", status="QUEUED", commands=[Message()])
    with pytest.raises(InvalidTransition, match="not waiting for a message"):
        await task_service.write_message("m", {"x": 1})


async def test_write_message_to_task_waiting_on_timer_is_refused(task_service, make_task):
    await make_task(id="m", status="WAITING", commands=[Timer(10), {"method": "a"}])
    with pytest.raises(InvalidTransition, match="not waiting for a message"):
        await task_service.write_message("m", {"x": 1})
    assert (await task_service.get("m"))["result"] == []


async def test_write_message_twice_is_refused_the_second_time(task_service, make_task):
    await make_task(id="m", status="WAITING", commands=[Message(), {"method": "a"}])
    await task_service.write_message("m", 1)
    with pytest.raises(InvalidTransition):
        await task_service.write_message("m", 2)
    assert (await task_service.get("m"))["result"] == [1]


# -- permissions ----------------------------------------------------------------------------------


async def test_created_rows_take_the_callers_user_id(task_service):
    task = await task_service.create(simple(), caller=ALICE)
    assert task["user_id"] == "alice"


async def test_users_see_only_their_own_tasks(task_service):
    await task_service.create(simple(id="a1"), caller=ALICE)
    await task_service.create(simple(id="b1"), caller=BOB)
    assert [t["id"] for t in (await task_service.list(caller=ALICE))["data"]] == ["a1"]
    assert (await task_service.list(caller=BOB))["count"] == 1
    with pytest.raises(TaskNotFound):
        await task_service.get("b1", caller=ALICE)
    assert not await task_service.exists("b1", caller=ALICE)


@pytest.mark.parametrize(
    ("method", "args"),
    [
        ("update", ({"description": "x"},)),
        ("delete", ()),
        ("reset", ()),
        ("cancel", ()),
        ("write_message", ({"a": 1},)),
    ],
)
async def test_users_cannot_change_each_others_tasks(task_service, method, args):
    await task_service.create(simple(id="b1"), caller=BOB)
    with pytest.raises(TaskNotFound):
        await getattr(task_service, method)("b1", *args, caller=ALICE)
    with pytest.raises(NotAuthorized):
        await getattr(task_service, method)("b1", *args, caller=AUDITOR)
    assert (await task_service.get("b1"))["status"] == TaskStatus.QUEUED


async def test_view_others_sees_everything_but_changes_only_its_own(task_service):
    await task_service.create(simple(id="a1"), caller=ALICE)
    await task_service.create(simple(id="b1"), caller=BOB)
    assert (await task_service.list(caller=AUDITOR))["count"] == 2
    assert (await task_service.get("a1", caller=AUDITOR))["user_id"] == "alice"


async def test_modify_others_changes_other_users_tasks(task_service):
    await task_service.create(simple(id="b1"), caller=BOB)
    task = await task_service.update("b1", {"description": "by admin"}, caller=ADMIN)
    assert task["description"] == "by admin"
    await task_service.cancel("b1", caller=ADMIN)


async def test_system_caller_sees_and_changes_everything(task_service):
    await task_service.create(simple(id="a1"), caller=ALICE)
    await task_service.create(simple(id="b1"), caller=BOB)
    assert (await task_service.list())["count"] == 2
    await task_service.delete("a1")
    task = await task_service.create(simple(id="s", user_id="carol", system=True))
    assert task["user_id"] == "carol"
    assert task["system"] is True


async def test_users_cannot_set_system_fields(task_service):
    with pytest.raises(ValidationError) as exc:
        await task_service.create(simple(system=True), caller=ALICE)
    assert exc.value.field == "system"
    with pytest.raises(ValidationError) as exc:
        await task_service.create(simple(user_id="bob"), caller=ALICE)
    assert exc.value.field == "user_id"
    await task_service.create(simple(id="a"), caller=ALICE)
    with pytest.raises(ValidationError) as exc:
        await task_service.update("a", {"user_id": "bob"}, caller=ALICE)
    assert exc.value.field == "data.user_id"


async def test_users_cannot_chain_to_tasks_of_others(task_service):
    await task_service.create(simple(id="b1"), caller=BOB)
    with pytest.raises(ValidationError, match="'b1' does not exist"):
        await task_service.create(simple(next_task="b1"), caller=ALICE)


async def test_caller_without_user_id_sees_nothing(task_service):
    await task_service.create(simple())
    assert (await task_service.list(caller=Caller()))["count"] == 0


# -- notifications --------------------------------------------------------------------------------


@pytest.fixture
async def noted(store, clock):
    rows = []
    for i, (task_id, user) in enumerate([("t1", "alice"), ("t1", "alice"), ("t2", "bob")]):
        rows.append(
            await store.insert_notification(
                testing.notification_row(
                    clock.now() + timedelta(minutes=i),
                    task_id=task_id,
                    user_id=user,
                    result=[i],
                    job_id=f"job{i}",
                )
            )
        )
    return rows


async def test_notifications_list_by_task_sorted_by_date(notifications, noted):
    page = await notifications.list(
        conditions={"task_id": "t1"}, sort=[{"desc": "created"}], columns=["result"]
    )
    assert page["data"] == [{"result": [1]}, {"result": [0]}]


async def test_notifications_list_for_a_particular_job(notifications, noted):
    page = await notifications.list(
        conditions={"task_id": "t1", "job_id": "job0"}, columns=["result"]
    )
    assert page["data"] == [{"result": [0]}]


async def test_notification_get_update_delete(notifications, noted):
    nid = noted[0]["id"]
    assert (await notifications.get(nid))["read"] is False
    assert (await notifications.update(nid, {"read": True}))["read"] is True
    await notifications.delete(nid)
    with pytest.raises(errors.NotificationNotFound):
        await notifications.get(nid)


async def test_notification_update_accepts_only_read(notifications, noted):
    with pytest.raises(ValidationError) as exc:
        await notifications.update(noted[0]["id"], {"result": []})
    assert exc.value.field == "data.result"
    with pytest.raises(ValidationError) as exc:
        await notifications.update(noted[0]["id"], {"read": "yes"})
    assert exc.value.field == "data.read"


async def test_notifications_are_private_to_their_user(notifications, noted):
    page = await notifications.list(caller=ALICE)
    assert {n["user_id"] for n in page["data"]} == {"alice"}
    bobs = noted[2]["id"]
    with pytest.raises(errors.NotificationNotFound):
        await notifications.get(bobs, caller=ALICE)
    with pytest.raises(errors.NotificationNotFound):
        await notifications.update(bobs, {"read": True}, caller=ALICE)
    with pytest.raises(NotAuthorized):
        await notifications.delete(bobs, caller=AUDITOR)
    assert (await notifications.list(caller=AUDITOR))["count"] == 3


# -- regressions ----------------------------------------------------------------------------------


def test_unknown_permission_is_a_validation_error():
    with pytest.raises(ValidationError, match="unknown permission 'admin'") as exc:
        Caller.user("u", ["admin"])
    assert exc.value.field == "permissions"


async def test_whole_second_timeouts_stay_integers(task_service):
    task = await task_service.create(
        Task(commands=[Timer(30), TaskCommand(method="a", max_timeout=5)])
    )
    assert isinstance(task["commands"][0]["seconds"], int)
    assert isinstance(task["commands"][1]["max_timeout"], int)
    assert Timer(0.5).seconds == 0.5


async def test_disabling_a_queued_task_takes_it_off_the_queue(task_service, clock):
    await task_service.create(simple(id="q"))
    task = await task_service.update("q", {"enabled": False})
    assert (task["status"], task["job_id"]) == ("IDLE", None)
    task = await task_service.update("q", {"enabled": True})
    assert task["next_run"] == clock.now().isoformat()


async def test_removing_cron_from_an_idle_task_stops_its_schedule(task_service):
    await task_service.create(simple(id="c", cron="0 * * * *"))
    task = await task_service.update("c", {"cron": None})
    assert (task["status"], task["next_run"]) == ("IDLE", None)


async def test_passing_an_unchanged_null_cron_keeps_an_idle_task_due(task_service, clock):
    await task_service.create(simple(id="d", enabled=False))
    task = await task_service.update("d", {"enabled": True, "cron": None})
    assert (task["status"], task["next_run"]) == ("IDLE", clock.now().isoformat())


async def test_changing_max_exec_timeout_of_a_queued_task_moves_its_deadline(task_service, clock):
    await task_service.create(simple(id="d"))
    task = await task_service.update("d", {"max_exec_timeout": 60})
    assert task["exec_deadline"] == (clock.now() + timedelta(seconds=60)).isoformat()


async def test_a_user_may_name_itself_as_user_id_in_an_update(task_service):
    await task_service.create(simple(id="a"), caller=ALICE)
    task = await task_service.update("a", {"user_id": "alice"}, caller=ALICE)
    assert task["user_id"] == "alice"


async def test_delete_refuses_a_running_task(task_service, make_task):
    await make_task(id="run", status="EXECUTED", executor_id="x")
    with pytest.raises(InvalidTransition, match="cancel it before deleting"):
        await task_service.delete("run")
    assert await task_service.exists("run")


async def test_cancel_error_is_a_json_rpc_error_object(task_service, make_task):
    await task_service.create(simple(id="c"))
    error = (await task_service.cancel("c"))["error"]
    assert error == {"code": -32006, "message": "Task cancelled", "reason": "cancelled", "stage": 0}
    # The stage is the one the task stands at when the cancel lands.
    await make_task(id="at2", status="WAITING", stage=2, commands=[{"method": "m"}] * 3)
    assert (await task_service.cancel("at2"))["error"]["stage"] == 2


async def test_sorting_by_a_json_column_says_so(task_service):
    with pytest.raises(ValidationError, match="cannot be sorted by") as exc:
        await task_service.list(sort=["kws"])
    assert exc.value.field == "sort.0"


async def test_list_accepts_a_tuple_of_columns(task_service, five):
    page = await task_service.list(columns=("id",), limit=1)
    assert page["data"] == [{"id": "task0"}]


async def test_ids_sort_byte_by_byte_whatever_the_database_locale(task_service):
    # On a C.UTF-8 database this order is also the locale's; the collation itself is asserted
    # by tests/migrations (test_identifiers_compare_byte_by_byte_whatever_the_database_locale).
    ids = ["b", "a", "B", "A", "é", "_x", "a1", "ä", "Z9"]
    await task_service.create([Task(id=i, commands=[TaskCommand(method="m")]) for i in ids])
    page = await task_service.list(sort=["id"], columns=["id"])
    assert [row["id"] for row in page["data"]] == sorted(ids, key=lambda i: i.encode())


async def test_a_tree_listed_by_root_id_is_exact_and_read_through_indexes(
    task_service, pool, make_task
):
    # The tree index holds only tasks whose root is another task; a task that is its own root
    # is found by id. Every task of the tree, and only those, comes back either way.
    system_made = {"id": "adopted", "root_id": "r1"}  # a system caller's root, no parent
    await task_service.create(
        [
            Task(id="r1", commands=[TaskCommand(method="m")]),
            Task(id="r2", commands=[TaskCommand(method="m")]),
            Task(id="c1", commands=[TaskCommand(method="m")], parent_id="r1", root_id="r1"),
            Task(id="c2", commands=[TaskCommand(method="m")], parent_id="c1", root_id="r1"),
            Task(id="c3", commands=[TaskCommand(method="m")], parent_id="r2", root_id="r2"),
            Task(commands=[TaskCommand(method="m")], **system_made),
        ]
    )
    await task_service.create([Task(commands=[TaskCommand(method="m")]) for _ in range(3000)])

    async def ids(conditions: Any) -> set[str]:
        page = await task_service.list(conditions=conditions, columns=["id"], limit=1000)
        return {row["id"] for row in page["data"]}

    assert await ids({"root_id": "r1"}) == {"r1", "c1", "c2", "adopted"}
    assert await ids({"root_id": ["r2", "nowhere"]}) == {"r2", "c3"}
    assert await ids([{"root_id": "r2"}, {"id": "r1"}]) == {"r2", "c3", "r1"}
    assert await ids({"root_id": {"ne": "r1"}, "id": ["r1", "r2", "c3"]}) == {"r2", "c3"}
    assert await ids({"root_id": None}) == set()
    await make_task(id="rootless")
    await pool.execute("UPDATE tasks SET root_id = NULL WHERE id = 'rootless'")  # a direct write
    assert await ids({"root_id": None}) == {"rootless"}
    assert await ids({"root_id": [None, "r2"]}) == {"rootless", "r2", "c3"}

    await pool.execute("ANALYZE tasks")
    statement = tables.select_page(
        tables.tasks,
        where=[tables.compile_conditions(tables.tasks, {"root_id": "r1"})],
        columns=[tables.tasks.c.id],
        order=[],
        offset=0,
        limit=100,
    )
    sql, params = tables.to_sql(statement)
    plan = "\n".join(r[0] for r in await pool.fetch(f"EXPLAIN {sql}", *params))
    assert "Seq Scan" not in plan, plan
    assert "tasks_root_idx" in plan, plan
    assert "tasks_pkey" in plan, plan
