"""New task rows in PostgreSQL's binary COPY format, read back by a decoder written from the spec.

https://www.postgresql.org/docs/current/sql-copy.html (binary format): a signature and two zero
int32s; per row an int16 field count, then per field an int32 length (-1 for NULL) and the value;
an int16 -1 ends the data.
"""

from __future__ import annotations

import json
import struct
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from kaiju_tasks import errors
from kaiju_tasks.store import base, copy

NOW = datetime(2030, 1, 1, 12, 0, 0, 123456, tzinfo=UTC)
PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)

TYPES = {
    **dict.fromkeys(
        [
            "id",
            "app_name",
            "cron",
            "restart_policy",
            "next_task",
            "description",
            "status",
            "job_id",
            "user_id",
            "parent_id",
            "root_id",
        ],
        "text",
    ),
    **dict.fromkeys(["commands", "kws", "meta"], "jsonb"),
    **dict.fromkeys(["enabled", "notify", "system"], "bool"),
    **dict.fromkeys(["max_exec_timeout", "max_retries", "retry_delay", "stages"], "int4"),
    "priority": "int2",
    **dict.fromkeys(
        ["created", "queued_at", "exec_deadline", "next_run", "status_change", "expires_at"],
        "timestamptz",
    ),
}


def decode_value(kind: str, data: bytes) -> Any:
    if kind == "text":
        return data.decode()
    if kind == "jsonb":
        assert data[:1] == b"\x01"  # jsonb's binary format version
        return json.loads(data[1:])
    if kind == "bool":
        return {b"\x01": True, b"\x00": False}[data]
    if kind == "int4":
        return struct.unpack("!i", data)[0]
    if kind == "int2":
        return struct.unpack("!h", data)[0]
    assert kind == "timestamptz"
    return PG_EPOCH + timedelta(microseconds=struct.unpack("!q", data)[0])


def decode(data: bytes, columns: tuple[str, ...], types: dict[str, str]) -> list[dict[str, Any]]:
    assert data[:11] == b"PGCOPY\n\xff\r\n\x00"
    assert struct.unpack("!ii", data[11:19]) == (0, 0)
    at = 19
    rows: list[dict[str, Any]] = []
    while True:
        (fields,) = struct.unpack("!h", data[at : at + 2])
        at += 2
        if fields == -1:
            assert at == len(data), "bytes after the trailer"
            return rows
        assert fields == len(columns)
        row: dict[str, Any] = {}
        for column in columns:
            (length,) = struct.unpack("!i", data[at : at + 4])
            at += 4
            if length == -1:
                row[column] = None
                continue
            row[column] = decode_value(types[column], data[at : at + length])
            at += length
        rows.append(row)


def new_row(**values: Any) -> tuple[Any, ...]:
    row: dict[str, Any] = {
        "id": "t1",
        "app_name": "default",
        "commands": [{"kind": "call", "method": "m", "params": None}],
        "kws": {},
        "enabled": True,
        "cron": None,
        "max_exec_timeout": 300,
        "max_retries": 0,
        "restart_policy": "CURRENT",
        "retry_delay": 0,
        "next_task": None,
        "notify": False,
        "system": False,
        "description": None,
        "meta": {},
        "priority": 0,
        "status": "QUEUED",
        "stages": 1,
        "job_id": "j1",
        "user_id": None,
        "created": NOW,
        "queued_at": NOW,
        "exec_deadline": NOW + timedelta(seconds=300),
        "next_run": None,
        "status_change": NOW,
        "expires_at": None,
        "parent_id": None,
        "root_id": "t1",
    }
    unknown = set(values) - set(row)
    assert not unknown, unknown
    row.update(values)
    return tuple(row[c] for c in base.NEW_TASK_COLUMNS)


def tasks_of(rows: list[tuple[Any, ...]], **options: Any) -> tuple[copy.NewTasks, bytes]:
    new = copy.NewTasks(rows, **options)
    return new, b"".join(new.tasks())


def test_rows_read_back_as_they_were_given():
    given = [
        new_row(),
        new_row(
            id="t2",
            app_name="ünïcode-app",
            commands=[{"kind": "timer", "seconds": 5}, {"method": "[kws.m]", "params": [1, 2.5]}],
            kws={"m": "x", "n": None},
            enabled=False,
            cron="*/5 * * * *",
            max_retries=3,
            restart_policy="FIRST",
            retry_delay=60,
            next_task="t1",
            notify=True,
            system=True,
            description="déjà vu",
            meta={"team": "ops"},
            priority=-10,
            status="IDLE",
            stages=2,
            job_id=None,
            user_id="alice",
            queued_at=None,
            exec_deadline=None,
            next_run=NOW + timedelta(minutes=5),
            expires_at=NOW + timedelta(days=1),
            parent_id="t1",
            root_id="t1",
        ),
    ]
    _, data = tasks_of(given)
    read = decode(data, base.NEW_TASK_COLUMNS, TYPES)
    assert read == [dict(zip(base.NEW_TASK_COLUMNS, row, strict=True)) for row in given]


def test_repeated_values_are_encoded_the_same_in_every_row():
    # The encoder caches runs of columns by value: a cached run must not leak into other rows.
    rows = [new_row(id=f"t{i}", root_id=f"t{i}", priority=i % 2 * 10) for i in range(50)]
    _, data = tasks_of(rows, rows_per_chunk=7)
    read = decode(data, base.NEW_TASK_COLUMNS, TYPES)
    assert [(r["id"], r["root_id"], r["priority"]) for r in read] == [
        (f"t{i}", f"t{i}", i % 2 * 10) for i in range(50)
    ]


def test_the_data_comes_in_chunks_of_rows_per_chunk_rows():
    new = copy.NewTasks([new_row(id=f"t{i}", root_id=f"t{i}") for i in range(5)], 2)
    chunks = list(new.tasks())
    assert len(chunks) == 3  # 2 + 2 + (1 and the trailer)
    assert chunks[-1].endswith(copy.TRAILER)
    assert len(decode(b"".join(chunks), base.NEW_TASK_COLUMNS, TYPES)) == 5


def test_times_of_any_zone_are_written_as_their_instant():
    paris = NOW.astimezone(timezone(timedelta(hours=1)))
    _, data = tasks_of([new_row(created=paris)])
    (read,) = decode(data, base.NEW_TASK_COLUMNS, TYPES)
    assert read["created"] == NOW


def test_queued_rows_get_a_task_sent_event_and_wake_their_app():
    rows = [
        new_row(id="q1", root_id="q1", app_name="a"),
        new_row(id="idle", root_id="idle", status="IDLE", job_id=None, app_name="b"),
        new_row(id="q2", root_id="q2", app_name="c", job_id="j2", created=NOW + timedelta(1)),
    ]
    new, _ = tasks_of(rows)
    assert new.rows == rows
    assert new.queued == 2
    assert new.apps == {"a", "c"}
    types = {"type": "text", "task_id": "text", "job_id": "text", "status": "text"}
    types |= {"stage": "int4", "created": "timestamptz"}
    events = decode(b"".join(new.events()), copy.EVENT_COLUMNS, types)
    assert events == [
        {"type": "task-sent", "task_id": "q1", "job_id": "j1", "status": "QUEUED", "stage": 0,
         "created": NOW},
        {"type": "task-sent", "task_id": "q2", "job_id": "j2", "status": "QUEUED", "stage": 0,
         "created": NOW + timedelta(1)},
    ]  # fmt: skip


def test_a_time_without_a_zone_is_refused():
    with pytest.raises(errors.ValidationError, match="without a time zone"):
        tasks_of([new_row(created=datetime(2030, 1, 1))])  # noqa: DTZ001 - the point of it


def test_text_that_utf8_cannot_hold_is_refused():
    with pytest.raises(errors.ValidationError, match="UTF-8"):
        tasks_of([new_row(description="bad \ud800 surrogate")])


def test_a_value_json_cannot_hold_is_refused():
    with pytest.raises(errors.ValidationError, match="invalid JSON value"):
        tasks_of([new_row(kws={"x": {1, 2}})])


@pytest.mark.parametrize(
    "value", [None, True, 0, -1.5, "text", [1, [2]], {"a": {"b": None}}, {"ü": "∑"}]
)
def test_jsonb_values_read_back(value):
    assert copy.jsonb_from(copy.jsonb_value(value)) == value
    field = copy.jsonb(value)
    assert int.from_bytes(field[:4], "big") == len(field) - 4


def test_json_objects_with_non_string_keys_are_written_with_string_keys():
    assert copy.jsonb_from(copy.jsonb_value({1: "a"})) == {"1": "a"}


def test_a_jsonb_of_an_unknown_format_version_is_refused():
    with pytest.raises(ValueError, match="unsupported jsonb format version"):
        copy.jsonb_from(b"\x02{}")


def test_text_fields_are_their_utf8_bytes_length_first():
    assert copy.text("é") == b"\x00\x00\x00\x02\xc3\xa9"
