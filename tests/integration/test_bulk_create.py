"""Bulk create through binary COPY: rows exact, one event per task, all or nothing, wake-up."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kaiju_tasks import (
    Caller,
    Condition,
    Message,
    Task,
    TaskCommand,
    Timer,
    ValidationError,
    context,
    errors,
)
from kaiju_tasks.executor import Executor
from kaiju_tasks.methods import Methods
from kaiju_tasks.models import SYSTEM
from kaiju_tasks.store.postgres import COPY_MIN_ROWS

N = COPY_MIN_ROWS + 36  # enough to take the COPY path
ALICE = Caller.user("alice")

PARAMS = [
    {"text": 'héllo wörld ✓ 日本語 🎉 \t\n\\ "quoted"', "nested": {"a": [1, {"b": None}]}},
    {"big": 2**63 - 1, "small": -(2**63), "u64": 2**64 - 1, "zero": 0, "t": True, "f": False},
    {"float": 1.5, "exp": 1e20, "tiny": 1e-7, "negzero": -0.0, "third": 1 / 3, "huge": 1e300},
    None,
    ["list", 1, [2, [3, []]], {"k": "v"}, {}],
    {"b": 1, "a": 2, "aa": 3, "é": 4, "z": 5, "ab": 6, "": 7, "ä": {"yy": 1, "x": 2}},
    "a plain string",
    12345678901234567,
]


def _task(i: int, prefix: str) -> Task:
    """A task whose fields vary with ``i``: every column and JSON shape shows up."""
    kind = i % 8
    commands: list[TaskCommand | Timer | Message] = [
        TaskCommand(method=f"do.{kind}", params=PARAMS[kind], max_timeout=100 if kind else None)
    ]
    if kind == 1:
        commands.append(TaskCommand(method="b", condition=Condition({"0.count": {"gt": 0}})))
    if kind == 2:
        commands += [Timer(10), Message(max_timeout=50)]
    return Task(
        id=f"{prefix}{i}" if i % 5 else None,
        app=["app-a", "app-b", "ünïcode-app"][i % 3],
        commands=commands,
        kws={"n": i, "why": "ключ", "deep": {"x": [i, "y"]}} if i % 2 else {},
        meta={"owner": "team ✓", "i": i, "ratio": i / 7} if i % 3 == 0 else {},
        enabled=kind != 3,
        cron="*/5 * * * *" if kind == 4 else None,
        max_exec_timeout=300 + i,
        max_retries=i % 4,
        restart_policy="FIRST" if i % 2 else "CURRENT",
        retry_delay=i,
        notify=bool(i % 2),
        system=kind == 5,
        description=None if kind == 6 else f"task {i}: ünïcode ✓ 🎉",
        priority=(i % 41) - 20,
        expires_at=(
            datetime(2031, 1, 2, 3, 4, 5, 678901, tzinfo=timezone(timedelta(hours=2)))
            if kind == 7
            else None
        ),
        user_id="someone" if kind == 0 else None,
    )


def _dumps(value: object) -> bytes:
    return orjson.dumps(value)  # keeps key order: rows must match to the byte


async def _counts(pool: asyncpg.Pool) -> tuple[int, int]:
    tasks = await pool.fetchval("SELECT count(*) FROM tasks")
    events = await pool.fetchval("SELECT count(*) FROM events WHERE type = 'task-sent'")
    return tasks, events


async def test_bulk_create_returns_every_field_exactly_as_stored(task_service):
    created = await task_service.create([_task(i, "copy-") for i in range(N)])
    assert isinstance(created, list)
    assert len(created) == N
    for row in created:
        stored = await task_service.get(row["id"])
        assert row == stored
        assert _dumps(row) == _dumps(stored), row["id"]  # same keys, same order, same numbers


async def test_bulk_create_stores_what_a_small_create_stores(task_service):
    # The small path (one INSERT ... RETURNING) is the reference for the COPY path.
    small = [_task(i, "ins-") for i in range(COPY_MIN_ROWS - 1)]
    big = [_task(i, "copy-") for i in range(N)]
    by_insert = await task_service.create(small)
    by_copy = await task_service.create(big)
    assert isinstance(by_insert, list)
    assert isinstance(by_copy, list)
    differ = {"id", "root_id", "job_id"}
    for a, b in zip(by_insert, by_copy, strict=False):
        assert _dumps({k: v for k, v in a.items() if k not in differ}) == _dumps(
            {k: v for k, v in b.items() if k not in differ}
        )
        assert (a["job_id"] is None) == (b["job_id"] is None)
        assert a["root_id"] == a["id"]
        assert b["root_id"] == b["id"]


async def test_bulk_create_values_round_trip(task_service):
    tasks = [_task(i, "rt-") for i in range(N)]
    created = await task_service.create(tasks)
    assert isinstance(created, list)
    for task, row in zip(tasks, created, strict=True):
        if task.id is not None:
            assert row["id"] == task.id
        assert row["app_name"] == task.app_name
        assert row["commands"] == [c.to_json() for c in task.commands]
        assert row["kws"] == task.kws
        assert row["meta"] == task.meta
        assert row["description"] == task.description
        assert row["priority"] == task.priority
        assert row["user_id"] == task.user_id
        if task.expires_at is not None:
            assert datetime.fromisoformat(row["expires_at"]) == task.expires_at
            assert row["expires_at"].endswith("+00:00")
        assert row["status"] == ("QUEUED" if task.enabled and not task.cron else "IDLE")
    assert created[1]["commands"][0]["params"]["big"] == 2**63 - 1
    assert created[1]["commands"][0]["params"]["u64"] == 2**64 - 1
    assert created[0]["commands"][0]["params"]["text"] == PARAMS[0]["text"]  # type: ignore[index]


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00[]")),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00[]")),
            children,
            max_size=5,
        )
    ),
    max_leaves=12,
)


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(values=st.lists(json_values, min_size=1, max_size=8))
async def test_any_json_comes_back_from_a_bulk_create_as_get_returns_it(task_service, values):
    tasks = [
        Task(commands=[TaskCommand(method="m", params=v)], kws={"v": v}, meta={"k": {"v": v}})
        for v in (values[i % len(values)] for i in range(N))
    ]
    created = await task_service.create(tasks)
    assert isinstance(created, list)
    for row in created:
        assert _dumps(row) == _dumps(await task_service.get(row["id"]))


async def test_bulk_create_writes_one_task_sent_event_per_queued_task(task_service, pool):
    created = await task_service.create([_task(i, "ev-") for i in range(N)])
    assert isinstance(created, list)
    events = await pool.fetch("SELECT * FROM events ORDER BY id")
    queued = [row for row in created if row["status"] == "QUEUED"]
    assert 0 < len(queued) < N  # idle (disabled, cron) tasks get none
    assert [e["task_id"] for e in events] == [row["id"] for row in queued]
    for event, row in zip(events, queued, strict=True):
        assert event["type"] == "task-sent"
        assert event["job_id"] == row["job_id"]
        assert event["status"] == "QUEUED"
        assert event["stage"] == 0
        assert event["created"].isoformat() == row["created"]
        assert event["data"] == {}
    assert len({e["xid"] for e in events}) == 1  # one transaction


async def test_bulk_create_of_a_non_system_caller_owns_the_tasks(task_service):
    tasks = [Task(commands=[TaskCommand(method="m")]) for _ in range(N)]
    created = await task_service.create(tasks, caller=ALICE, columns=["id", "user_id"])
    assert isinstance(created, list)
    assert {row["user_id"] for row in created} == {"alice"}
    page = await task_service.list(caller=ALICE, limit=1)
    assert page["count"] == N
    with pytest.raises(ValidationError) as exc:
        await task_service.create(
            [*tasks[:10], Task(commands=[TaskCommand(method="m")], system=True)], caller=ALICE
        )
    assert exc.value.field == "10.system"


async def test_bulk_create_in_a_stage_makes_children_of_the_running_task(task_service):
    parent: dict[str, Any] = {"task_id": "parent", "root_id": "root", "priority": 42}
    token = context.current_task.set(parent)
    try:
        created = await task_service.create(
            [Task(commands=[TaskCommand(method="m")], priority=-5) for _ in range(N)]
        )
    finally:
        context.current_task.reset(token)
    assert isinstance(created, list)
    for row in created:
        assert (row["parent_id"], row["root_id"], row["priority"]) == ("parent", "root", 42)
        assert row == await task_service.get(row["id"])


async def test_bulk_create_selected_columns_only(task_service):
    created = await task_service.create([_task(i, "col-") for i in range(N)], columns=["id"])
    assert isinstance(created, list)
    assert all(list(row) == ["id"] for row in created)
    assert [row["id"] for row in created][1:5] == ["col-1", "col-2", "col-3", "col-4"]
    assert len(created[0]["id"]) == 36  # generated


# -- all or nothing -------------------------------------------------------------------------------


async def test_an_invalid_task_creates_nothing(task_service, pool):
    data: list[dict[str, Any]] = [{"commands": [{"method": "x"}]} for _ in range(N)]
    data[N - 3] = {"commands": [{"method": "x"}], "priority": 1000}
    with pytest.raises(ValidationError) as exc:
        await task_service.create(data)
    assert exc.value.field == f"{N - 3}.priority"
    assert await _counts(pool) == (0, 0)


async def test_an_existing_id_late_in_the_batch_creates_nothing(task_service, pool):
    await task_service.create(Task(id="taken", commands=[TaskCommand(method="m")]))
    tasks = [Task(commands=[TaskCommand(method="m")]) for _ in range(N)]
    tasks[-1] = Task(id="taken", commands=[TaskCommand(method="m")])
    with pytest.raises(errors.Conflict, match=r"^task 'taken' already exists$"):
        await task_service.create(tasks)
    assert await _counts(pool) == (1, 1)


async def test_a_nul_character_late_in_the_batch_creates_nothing(task_service, pool):
    tasks = [Task(commands=[TaskCommand(method="m")]) for _ in range(N)]
    tasks[-2] = Task(commands=[TaskCommand(method="m")], description="a\x00b")
    with pytest.raises(ValidationError):
        await task_service.create(tasks)
    tasks[-2] = Task(commands=[TaskCommand(method="m", params={"s": "a\x00b"})])
    with pytest.raises(ValidationError, match="cannot be converted to text"):
        await task_service.create(tasks)
    assert await _counts(pool) == (0, 0)


async def test_a_value_json_cannot_hold_creates_nothing_and_the_pool_stays_usable(
    task_service, pool
):
    tasks = [Task(commands=[TaskCommand(method="m")]) for _ in range(3 * N)]
    tasks[2 * N] = Task(commands=[TaskCommand(method="m", params={"n": 2**70})])
    for _ in range(3):  # the same few connections, reused after each abort
        with pytest.raises(ValidationError, match="64-bit"):
            await task_service.create(tasks)
    assert await _counts(pool) == (0, 0)
    tasks[2 * N] = Task(commands=[TaskCommand(method="m", params={"n": 2**62})])
    created = await task_service.create(tasks, columns=["id"])
    assert len(created) == 3 * N
    assert await _counts(pool) == (3 * N, 3 * N)


async def test_a_bad_item_found_after_earlier_rows_were_sent_creates_nothing(task_service, pool):
    # Rows are validated while COPY sends the ones before: 2,500 items are several chunks, so
    # the server has rows of this batch when item 2,300 turns out bad.
    many = 2500
    good: list[Any] = [{"commands": [{"method": "x"}], "id": f"s{i}"} for i in range(many)]
    for bad, field, caller in [
        ({"commands": [{"method": ""}]}, "2300.commands.0.method", None),
        ({"commands": [{"method": "x"}], "id": "s5"}, "2300.id", None),
        (Task(commands=[TaskCommand(method="x")], system=True), "2300.system", ALICE),
        ("not a task", "2300", None),
    ]:
        data = [*good[:2300], bad, *good[2301:]]
        with pytest.raises(ValidationError) as exc:
            await task_service.create(data, caller=caller or SYSTEM)
        assert exc.value.field == field
        assert await _counts(pool) == (0, 0)
    created = await task_service.create(good, columns=["id"])  # the pool is fine afterwards
    assert [row["id"] for row in created] == [f"s{i}" for i in range(many)]
    assert await _counts(pool) == (many, many)


async def test_bulk_create_chains_to_tasks_of_the_batch_and_existing_ones(task_service, pool):
    await task_service.create(Task(id="before", commands=[TaskCommand(method="m")]))
    data: list[Any] = [{"commands": [{"method": "m"}], "id": f"c{i}"} for i in range(N)]
    data[3] = {**data[3], "next_task": "c7"}
    data[5] = {**data[5], "next_task": "before"}
    created = await task_service.create(data, columns=["id", "next_task"])
    assert created[3] == {"id": "c3", "next_task": "c7"}
    assert created[5] == {"id": "c5", "next_task": "before"}
    data = [{"commands": [{"method": "m"}]} for _ in range(N)]
    data[N - 2] = {**data[N - 2], "next_task": "nowhere"}
    with pytest.raises(ValidationError) as exc:
        await task_service.create(data)
    assert exc.value.field == f"{N - 2}.next_task"
    assert await _counts(pool) == (N + 1, N + 1)
    data[N - 2] = {**data[N - 2], "next_task": "before"}
    with pytest.raises(ValidationError) as exc:  # alice may not start the system's task
        await task_service.create(data, caller=ALICE)
    assert exc.value.field == f"{N - 2}.next_task"


async def test_bulk_create_stores_times_before_2000_and_far_ahead_exactly(task_service):
    # Times travel as microseconds since 2000-01-01 UTC: negative before it.
    times = [
        datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(1970, 1, 1, tzinfo=timezone(timedelta(hours=-11, minutes=-30))),
        datetime(1, 1, 2, 0, 0, 0, 1, tzinfo=UTC),
        datetime(9999, 12, 30, 23, 59, 59, 999999, tzinfo=timezone(timedelta(hours=5))),
    ]
    tasks = [
        Task(commands=[TaskCommand(method="m")], expires_at=times[i % len(times)]) for i in range(N)
    ]
    created = await task_service.create(tasks, columns=["id", "expires_at"])
    for i, row in enumerate(created):
        assert datetime.fromisoformat(row["expires_at"]) == times[i % len(times)]
        assert (await task_service.get(row["id"], ["expires_at"])) == {
            "expires_at": row["expires_at"]
        }


async def test_bulk_create_keeps_apart_two_instants_that_read_the_same_local_time(task_service):
    # 01:30 happens twice in New York on 2025-11-02: fold=0 is EDT, fold=1 an hour later (EST).
    # The two compare equal in Python, yet they are different times to store.
    zone = ZoneInfo("America/New_York")
    first = datetime(2025, 11, 2, 1, 30, tzinfo=zone)
    second = first.replace(fold=1)
    assert first == second
    assert second.astimezone(UTC) - first.astimezone(UTC) == timedelta(hours=1)
    tasks = [
        Task(commands=[TaskCommand(method="m")], expires_at=first if i % 2 else second)
        for i in range(N)
    ]
    created = await task_service.create(tasks, columns=["id"])
    for i, row in enumerate(created):
        stored = (await task_service.get(row["id"], ["expires_at"]))["expires_at"]
        expected = (first if i % 2 else second).astimezone(UTC)
        assert datetime.fromisoformat(stored) == expected


async def test_an_expiry_out_of_range_in_utc_is_refused_by_field(task_service, pool):
    tasks = [Task(commands=[TaskCommand(method="m")]) for _ in range(N)]
    early = datetime(1, 1, 1, 0, 30, tzinfo=timezone(timedelta(hours=5)))  # year 0 in UTC
    tasks[N - 1] = Task(commands=[TaskCommand(method="m")], expires_at=early)
    with pytest.raises(ValidationError) as exc:
        await task_service.create(tasks)
    assert exc.value.field == f"{N - 1}.expires_at"
    assert await _counts(pool) == (0, 0)


async def test_text_utf8_cannot_hold_creates_nothing(task_service, pool):
    tasks: list[Any] = [{"commands": [{"method": "m"}]} for _ in range(N)]
    tasks[N - 1] = {"commands": [{"method": "m"}], "description": "lone \ud800 surrogate"}
    with pytest.raises(ValidationError) as exc:
        await task_service.create(tasks)
    assert exc.value.field == f"{N - 1}.description"
    tasks[N - 1] = {"commands": [{"method": "m"}], "kws": {"k": "lone \ud800 surrogate"}}
    with pytest.raises(ValidationError, match="surrogates not allowed"):
        await task_service.create(tasks)
    assert await _counts(pool) == (0, 0)


class _Indexable(Sequence[Any]):
    """A sequence that can be indexed one item at a time, not sliced."""

    def __init__(self, items: list[Any]) -> None:
        self._items = items

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: Any) -> Any:
        if not isinstance(index, int):
            raise TypeError("no slices here")
        return self._items[index]


async def test_bulk_create_takes_any_sequence_and_a_tuple(task_service, pool):
    one = {"commands": [{"method": "m"}]}
    created = await task_service.create(_Indexable([one] * N), columns=["id"])
    assert len(created) == N
    created = await task_service.create(tuple([one] * N), columns=["id"])
    assert len(created) == N
    assert await _counts(pool) == (2 * N, 2 * N)


# -- wake-up --------------------------------------------------------------------------------------


async def test_bulk_create_notifies_each_app_once_at_commit(task_service, dsn, pool):
    heard: list[str] = []
    marker = asyncio.Event()

    def on_notify(*args: Any) -> None:
        heard.append(args[3])
        if args[3] == "test-marker":
            marker.set()

    listener = await asyncpg.connect(dsn)
    try:
        await listener.add_listener("kaiju_tasks_queued", on_notify)
        await task_service.create([_task(i, "n-") for i in range(N)])
        # Notifications arrive in commit order: every one of the create comes before this.
        await pool.execute("SELECT pg_notify('kaiju_tasks_queued', 'test-marker')")
        await asyncio.wait_for(marker.wait(), 5)
    finally:
        await listener.close()
    assert heard.pop() == "test-marker"
    assert sorted(heard) == ["app-a", "app-b", "ünïcode-app"]


async def test_bulk_created_tasks_wake_an_idle_executor(task_service, store, clock, dsn):
    methods = Methods()
    ran: list[int] = []
    all_ran = asyncio.Event()

    def noop(i: int) -> None:
        ran.append(i)
        if len(ran) == N:
            all_ran.set()

    methods.add("noop", noop)
    executor = Executor(
        store,
        apps=["bulk"],
        methods=methods,
        clock=clock,
        dsn=dsn,
        poll_interval=timedelta(seconds=60),  # only a notification can wake it in time
        heartbeat_interval=timedelta(seconds=30),
    )
    async with executor:
        await asyncio.sleep(0.3)  # idle: its first claim found nothing
        await task_service.create(
            [
                Task(app="bulk", commands=[TaskCommand(method="noop", params={"i": i})])
                for i in range(N)
            ]
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(all_ran.wait(), 15)
    assert sorted(ran) == list(range(N))


async def test_bulk_create_timestamps_come_back_in_utc(task_service, clock):
    clock.set(datetime(2030, 6, 1, 12, 0, tzinfo=timezone(timedelta(hours=-5))))
    created = await task_service.create([_task(i, "tz-") for i in range(N)])
    assert isinstance(created, list)
    for row in created:
        assert row["created"] == datetime(2030, 6, 1, 17, 0, tzinfo=UTC).isoformat()
        assert row == await task_service.get(row["id"])


async def test_single_create_keeps_its_one_statement_path(task_service, pool):
    task = await task_service.create(_task(0, "one-"))
    assert isinstance(task, dict)
    assert task == await task_service.get(task["id"])
    assert await _counts(pool) == (1, 1)
