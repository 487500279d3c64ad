"""New task rows in PostgreSQL's binary COPY format, encoded here instead of value by value.

A bulk create sends 28 columns per task. Through asyncpg's record COPY, every value costs an
encoder call, and a ``timestamptz`` several Python-level datetime operations: for 10,000 tasks
that is most of the client's time. Here runs of adjacent columns keep a dict of the encodings
they have seen (``_Run``): most columns of a batch repeat a handful of values (the app, the
status, the creation time, the deadline, NULL...), so a combination is encoded once and then
found by one dict lookup. Only the ids and the JSON columns are encoded per row.

The format (https://www.postgresql.org/docs/current/sql-copy.html#id-1.9.3.55.9.4): a
signature and two zero int32s, then per row an int16 field count and per field an int32 length
(-1 for NULL) and the value in the type's binary form; an int16 -1 ends the data.
"""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from kaiju_tasks import errors
from kaiju_tasks.store import base

HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, 0)
TRAILER = struct.pack("!h", -1)
NULL = struct.pack("!i", -1)
_FIELDS = struct.pack("!h", len(base.NEW_TASK_COLUMNS))

_PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_INT4 = struct.Struct("!ii")
_INT2 = struct.Struct("!ih")
_INT8 = struct.Struct("!iq")
_TRUE = struct.pack("!i?", 1, True)
_FALSE = struct.pack("!i?", 1, False)
_JSONB_VERSION = b"\x01"
_EMPTY_OBJECT = struct.pack("!i", 3) + _JSONB_VERSION + b"{}"


EVENT_COLUMNS = ("type", "task_id", "job_id", "status", "stage", "created")
"""The columns of a ``task-sent`` event row, as :meth:`NewTasks.events` writes it."""
_QUEUED = "QUEUED"


def jsonb_value(value: Any) -> bytes:
    """A value in jsonb's binary form: a version byte and the JSON text.

    Also the pool's jsonb codec (``postgres.init_connection``).
    """
    return _JSONB_VERSION + orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS)


def jsonb_from(data: bytes) -> Any:
    """The value of jsonb's binary form (the pool's jsonb decoder)."""
    if data[:1] != _JSONB_VERSION:
        raise ValueError(f"unsupported jsonb format version {data[:1]!r}")
    return orjson.loads(memoryview(data)[1:])


def text(value: str) -> bytes:
    """A ``text`` field: its UTF-8 bytes, length first."""
    data = value.encode()
    return len(data).to_bytes(4, "big") + data


def jsonb(value: Any) -> bytes:
    """A ``jsonb`` field, length first."""
    data = jsonb_value(value)
    return len(data).to_bytes(4, "big") + data


def _boolean(value: bool) -> bytes:
    return _TRUE if value else _FALSE


def _int4(value: int) -> bytes:
    return _INT4.pack(4, value)


def _int2(value: int) -> bytes:
    return _INT2.pack(2, value)


def _timestamptz(value: datetime) -> bytes:
    """Microseconds since 2000-01-01 UTC."""
    if value.tzinfo is None:
        raise errors.ValidationError(f"a time without a time zone: {value.isoformat()}")
    return _INT8.pack(8, (value - _PG_EPOCH) // _MICROSECOND)


def _maybe(encode: Callable[[Any], bytes]) -> Callable[[Any], bytes]:
    return lambda value: NULL if value is None else encode(value)


_text, _time, _bool, _int, _small = (
    _maybe(encode) for encode in (text, _timestamptz, _boolean, _int4, _int2)
)

# Runs of columns that a batch mostly repeats, encoded together (see _Run), in the order of
# base.NEW_TASK_COLUMNS. None is NULL everywhere: a NOT NULL column then refuses it, as it
# would refuse it from any writer. Times are in UTC (TaskService makes them so): equal times
# of one zone can be different instants (fold), and these caches go by equality.
#
# Runs: enabled .. description (4-13), priority .. stages (15-17), and
# user_id .. parent_id (19-26).
_FLAGS = (_bool, _text, _int, _int, _text, _int, _text, _bool, _bool, _text)
_RANKING = (_small, _text, _int)
_TIMES = (_text, _time, _time, _time, _time, _time, _time, _text)


class _Run(dict[tuple[Any, ...], bytes]):
    """The encodings of a run of adjacent columns, by their values (a slice of the row).

    A batch of tasks mostly repeats the same few combinations (the flags and limits, the
    status, the creation time and deadline), so a row costs one lookup per run.
    """

    def __init__(self, encoders: tuple[Callable[[Any], bytes], ...]) -> None:
        super().__init__()
        self._encoders = encoders

    def __missing__(self, values: tuple[Any, ...]) -> bytes:
        encoded = self[values] = b"".join(
            encode(value) for encode, value in zip(self._encoders, values, strict=True)
        )
        return encoded


_EVENT_HEAD = struct.pack("!h", len(EVENT_COLUMNS)) + text("task-sent")
_EVENT_QUEUED = text(_QUEUED) + _int4(0)  # status, then stage 0


class NewTasks:
    """The binary COPY data of new task rows, and what the store needs of them afterwards.

    :meth:`tasks` reads the rows (once) as COPY asks for data; meanwhile it keeps them in
    :attr:`rows`, the apps of the queued ones in :attr:`apps`, and the COPY rows of their
    ``task-sent`` events (made from the encodings of the task) for :meth:`events`.
    """

    def __init__(self, rows: Iterable[base.NewTask], rows_per_chunk: int = 200) -> None:
        self._source = rows
        self._rows_per_chunk = rows_per_chunk
        self.rows: list[base.NewTask] = []
        self.apps: set[str] = set()
        self._sent: list[bytes] = []

    @property
    def queued(self) -> int:
        """How many of the rows read so far are queued (each has a ``task-sent`` event)."""
        return len(self._sent)

    def tasks(self) -> Iterator[bytes]:
        """Yield the COPY data of the rows (``base.NEW_TASK_COLUMNS``), in chunks.

        Raises :class:`errors.ValidationError` for a value the column cannot hold as given
        (text UTF-8 cannot encode, a value JSON cannot hold); PostgreSQL checks the rest.
        """
        try:
            yield from self._tasks()
        except UnicodeEncodeError as exc:
            raise errors.ValidationError(f"text that UTF-8 cannot hold: {exc.reason}") from None
        except orjson.JSONEncodeError as exc:
            raise errors.ValidationError(f"invalid JSON value: {exc}") from None

    def events(self) -> Iterator[bytes]:
        """Yield the COPY data of the ``task-sent`` events (:data:`EVENT_COLUMNS`)."""
        yield b"".join((HEADER, *self._sent, TRAILER))

    def _tasks(self) -> Iterator[bytes]:
        app, flags, ranking, times, created = (
            _Run(run) for run in ((_text,), _FLAGS, _RANKING, _TIMES, (_time,))
        )
        fields, null, empty, version = _FIELDS, NULL, _EMPTY_OBJECT, _JSONB_VERSION
        event_head, event_status = _EVENT_HEAD, _EVENT_QUEUED
        keep, sent, apps = self.rows.append, self._sent.append, self.apps.add
        dumps, option = orjson.dumps, orjson.OPT_NON_STR_KEYS
        out: list[bytes] = [HEADER]
        count, per_chunk = 0, self._rows_per_chunk
        for row in self._source:
            keep(row)
            # ids, job ids and commands differ from row to row: encoded here, without a call.
            task_id, job_id = row[0], row[18]
            data = task_id.encode()
            encoded_id = len(data).to_bytes(4, "big") + data
            if job_id is None:
                encoded_job_id = null
            else:
                data = job_id.encode()
                encoded_job_id = len(data).to_bytes(4, "big") + data
            data = dumps(row[2], option=option)
            kws, meta, root_id = row[3], row[14], row[27]
            out += (
                fields,
                encoded_id,
                app[row[1:2]],
                (len(data) + 1).to_bytes(4, "big") + version + data,
                jsonb(kws) if kws else empty,
                flags[row[4:14]],
                jsonb(meta) if meta else empty,
                ranking[row[15:18]],
                encoded_job_id,
                times[row[19:27]],
                encoded_id if root_id == task_id else _text(root_id),
            )
            if row[16] == _QUEUED:
                apps(row[1])
                sent(
                    b"".join(
                        (event_head, encoded_id, encoded_job_id, event_status, created[row[20:21]])
                    )
                )
            count += 1
            if count == per_chunk:
                yield b"".join(out)
                out.clear()
                count = 0
        out.append(TRAILER)
        yield b"".join(out)


async def chunks(data: Iterable[bytes]) -> AsyncIterator[bytes]:
    """``data`` as the asynchronous iterable COPY reads (each chunk built when asked for)."""
    for chunk in data:
        yield chunk


# -- the rows as stored ---------------------------------------------------------------------------


class Reread(Exception):
    """A JSON value whose stored form is left to PostgreSQL to say."""


def _jsonb_key(key: str) -> tuple[int, bytes]:
    encoded = key.encode()
    return len(encoded), encoded


_SCALARS = frozenset({str, int, bool, type(None)})
_KEY_ORDERS: dict[tuple[str, ...], tuple[str, ...]] = {}
"""jsonb's order of the keys of objects seen, by their order in the Python dict."""
_KEY_ORDERS_MAX = 4096


def _as_jsonb(value: Any) -> Any:
    """Return ``value`` as jsonb gives it back: object keys shortest first, then bytewise.

    Numbers other than integers (floats are rewritten by jsonb's ``numeric``) and any type that
    is not plain JSON raise :class:`Reread`.
    """
    kind = type(value)
    if kind in _SCALARS:
        return value
    if kind is dict:
        if len(value) < 2:
            return {k: v if type(v) in _SCALARS else _as_jsonb(v) for k, v in value.items()}
        keys = tuple(value)
        order = _KEY_ORDERS.get(keys)
        if order is None:
            order = tuple(sorted(keys, key=_jsonb_key))
            if len(_KEY_ORDERS) < _KEY_ORDERS_MAX:
                _KEY_ORDERS[keys] = order
        return {k: v if type(v := value[k]) in _SCALARS else _as_jsonb(v) for k in order}
    if kind is list:
        return [v if type(v) in _SCALARS else _as_jsonb(v) for v in value]
    raise Reread


def _utc(value: datetime | None) -> datetime | None:
    if value is None or value.tzinfo is UTC:
        return value
    return value.astimezone(UTC)


_NEW = {name: i for i, name in enumerate(base.NEW_TASK_COLUMNS)}
JSON_COLUMNS = frozenset({"commands", "kws", "meta"})
_STARTING_VALUES: dict[str, Any] = {
    "retries": 0,
    "stage": 0,
    "result": None,  # a new list per row, see _stored_task
    "error": None,
    "exit_code": None,
    "executor_id": None,
    "wait_deadline": None,
    "requeues": 0,
    "claim_id": None,
    "trace": None,
}
"""The columns a new row does not give, as the table's defaults set them."""


def stored_task(row: base.NewTask, columns: Sequence[str]) -> tuple[dict[str, Any], bool]:
    """Return ``columns`` of the row ``RETURNING *`` would give for a new task.

    With it, whether its JSON is to be read back from the table (see :class:`Reread`).
    """
    stored: dict[str, Any] = {}
    reread = False
    for name in columns:
        index = _NEW.get(name)
        if index is None:
            stored[name] = [] if name == "result" else _STARTING_VALUES[name]
            continue
        value = row[index]
        if name in JSON_COLUMNS:
            try:
                value = _as_jsonb(value)
            except Reread:
                reread = True
        elif name in base.TIME_COLUMNS:
            value = _utc(value)
        stored[name] = value
    return stored, reread
