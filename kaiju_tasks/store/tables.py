"""SQLAlchemy Core table definitions and the compiler for user-driven filters.

The tables are the column whitelist: a user's ``conditions``, ``sort`` and ``columns`` may name
only these columns, every value is bound as a parameter, and anything else is a
:class:`~kaiju_tasks.errors.ValidationError` naming the offending part. No SQL is built from
strings.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.dialects.postgresql import asyncpg as pg_asyncpg

from kaiju_tasks import errors, limits

metadata = sa.MetaData()

_TS = sa.DateTime(timezone=True)
_KEY = sa.Text(collation="C")
"""Identifiers (ids, app names, statuses): compared byte by byte, see migration 0009."""

tasks = sa.Table(
    "tasks",
    metadata,
    sa.Column("id", _KEY, primary_key=True),
    sa.Column("app_name", _KEY, nullable=False),
    sa.Column("commands", pg.JSONB, nullable=False),
    sa.Column("kws", pg.JSONB, nullable=False),
    sa.Column("enabled", sa.Boolean, nullable=False),
    sa.Column("cron", sa.Text),
    sa.Column("max_exec_timeout", sa.Integer, nullable=False),
    sa.Column("max_retries", sa.Integer, nullable=False),
    sa.Column("retries", sa.Integer, nullable=False),
    sa.Column("restart_policy", _KEY, nullable=False),
    sa.Column("retry_delay", sa.Integer, nullable=False),
    sa.Column("next_task", _KEY),
    sa.Column("notify", sa.Boolean, nullable=False),
    sa.Column("system", sa.Boolean, nullable=False),
    sa.Column("description", sa.Text),
    sa.Column("meta", pg.JSONB, nullable=False),
    sa.Column("priority", sa.SmallInteger, nullable=False),
    sa.Column("status", _KEY, nullable=False),
    sa.Column("stage", sa.Integer, nullable=False),
    sa.Column("stages", sa.Integer, nullable=False),
    sa.Column("result", pg.JSONB, nullable=False),
    sa.Column("error", pg.JSONB),
    sa.Column("exit_code", sa.Integer),
    sa.Column("job_id", _KEY),
    sa.Column("user_id", _KEY),
    sa.Column("executor_id", _KEY),
    sa.Column("created", _TS, nullable=False),
    sa.Column("queued_at", _TS),
    sa.Column("exec_deadline", _TS),
    sa.Column("wait_deadline", _TS),
    sa.Column("next_run", _TS),
    sa.Column("status_change", _TS, nullable=False),
    sa.Column("expires_at", _TS),
    sa.Column("parent_id", _KEY),
    sa.Column("root_id", _KEY),
    sa.Column("requeues", sa.Integer, nullable=False),
    sa.Column("claim_id", _KEY),
    sa.Column("trace", pg.JSONB),
)

notifications = sa.Table(
    "notifications",
    metadata,
    sa.Column("id", sa.BigInteger, primary_key=True),
    sa.Column("task_id", _KEY, nullable=False),
    sa.Column("job_id", _KEY),
    sa.Column("status", _KEY, nullable=False),
    sa.Column("result", pg.JSONB, nullable=False),
    sa.Column("exit_code", sa.Integer),
    sa.Column("error", pg.JSONB),
    sa.Column("user_id", _KEY),
    sa.Column("read", sa.Boolean, nullable=False),
    sa.Column("created", _TS, nullable=False),
)

DIALECT = pg_asyncpg.dialect()  # type: ignore[no-untyped-call]

_COMPARISONS = {"eq", "ne", "gt", "lt", "ge", "le"}
OPERATORS = frozenset({*_COMPARISONS, "like", "in", "not"})
"""Filter operators: ``{"column": {"op": value}}``."""

MAX_IN_VALUES = 10000


def _column(table: sa.Table, name: Any, field: str) -> sa.Column[Any]:
    if not isinstance(name, str) or name not in table.c:
        raise errors.ValidationError(
            f"unknown column {name!r}; known: {', '.join(table.c.keys())}", field=field
        )
    column: sa.Column[Any] = table.c[name]
    return column


def _is_json(column: sa.Column[Any]) -> bool:
    return isinstance(column.type, pg.JSONB)


def _scalar(column: sa.Column[Any], value: Any, field: str) -> Any:
    """Check that ``value`` fits ``column``; the driver binds it as a typed parameter."""
    if value is None:
        return None
    kind: type[Any] = column.type.python_type
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is str:
        ok = isinstance(value, str)
    elif isinstance(value, datetime):  # timestamps: aware datetimes or ISO 8601 strings
        ok = value.tzinfo is not None
    elif isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            ok = False
        else:
            ok = value.tzinfo is not None
    else:
        ok = False
    if not ok:
        raise errors.ValidationError(
            f"value {value!r} does not fit column {column.name!r} ({kind.__name__})", field=field
        )
    return value


def _compare(column: sa.Column[Any], op: str, value: Any, field: str) -> sa.ColumnElement[bool]:
    if op == "not":
        return sa.not_(_value_clause(column, value, field))
    if op == "in":
        return _in(column, value, field)
    if op == "like":
        if not isinstance(value, str) or column.type.python_type is not str:
            raise errors.ValidationError("'like' takes a string on a text column", field=field)
        return column.like(value)
    value = _scalar(column, value, field)
    if value is None:
        if op == "eq":
            return column.is_(None)
        if op == "ne":
            return column.is_not(None)
        raise errors.ValidationError(f"{op!r} cannot compare with null", field=field)
    return {
        "eq": column.__eq__,
        "ne": column.__ne__,
        "gt": column.__gt__,
        "lt": column.__lt__,
        "ge": column.__ge__,
        "le": column.__le__,
    }[op](value)


def _in(column: sa.Column[Any], value: Any, field: str) -> sa.ColumnElement[bool]:
    if not isinstance(value, list):
        raise errors.ValidationError("'in' takes a list", field=field)
    if len(value) > MAX_IN_VALUES:
        raise errors.ValidationError(f"at most {MAX_IN_VALUES} values", field=field)
    values = [_scalar(column, v, f"{field}.{i}") for i, v in enumerate(value)]
    not_null = [v for v in values if v is not None]
    clause: sa.ColumnElement[bool] = column.in_(not_null) if not_null else sa.false()
    if len(not_null) < len(values):
        clause = sa.or_(clause, column.is_(None))
    return clause


def _value_clause(column: sa.Column[Any], value: Any, field: str) -> sa.ColumnElement[bool]:
    if isinstance(value, list):
        return _in(column, value, field)
    if isinstance(value, Mapping):
        if not value:
            raise errors.ValidationError("empty operator object", field=field)
        clauses = []
        for op, operand in value.items():
            if op not in OPERATORS:
                raise errors.ValidationError(
                    f"unknown operator {op!r}; known: {', '.join(sorted(OPERATORS))}",
                    field=f"{field}.{op}",
                )
            clauses.append(_compare(column, op, operand, f"{field}.{op}"))
        return sa.and_(*clauses)
    return _compare(column, "eq", value, field)


def compile_conditions(table: sa.Table, conditions: Any, field: str = "conditions") -> Any:
    """Compile user conditions into a WHERE clause (None when there are none).

    A dict is AND over columns; a list of dicts is OR; a column's value is a scalar (equality),
    a list (IN) or ``{op: value}`` with ops ``eq ne gt lt ge le like in not``.
    """
    if conditions is None:
        return None
    check_bounds(conditions, field)
    return _compile(table, conditions, field)


def check_bounds(conditions: Any, field: str = "conditions") -> None:
    """Refuse a filter too deep or too large, naming the field, before any of it is compiled.

    The bounds are ``[limits] condition_depth`` and ``condition_values``. Values are counted
    over the whole filter (every list item, operand and object key), so a filter stays far
    below PostgreSQL's 32,767 parameters of one statement.
    """
    bounds = limits.active()
    # Each item keeps a link to its parent; a field name is spelled out only for an error, so
    # long keys over long lists cost no copy per item.
    stack: list[tuple[Any, _Link, int]] = [(conditions, None, 0)]
    count = 1  # each value is counted when its container is reached, before it is pushed
    while stack:
        value, link, depth = stack.pop()
        if depth > bounds.condition_depth:
            raise errors.ValidationError(
                f"nested deeper than condition_depth ({bounds.condition_depth} levels)",
                field=_spelled(field, link),
            )
        count += len(value) if isinstance(value, Mapping | list | tuple) else 0
        if count > bounds.condition_values:
            raise errors.ValidationError(
                f"more than condition_values ({bounds.condition_values:,}) values in the filter",
                field=field,
            )
        if isinstance(value, Mapping):
            stack.extend((item, (link, key), depth + 1) for key, item in value.items())
        elif isinstance(value, list | tuple):
            stack.extend((item, (link, i), depth + 1) for i, item in enumerate(value))


_Link = tuple[Any, Any] | None
"""Where a filter value sits: ``(parent's link, key or index)``, None at the top."""


def _spelled(field: str, link: _Link) -> str:
    parts: list[str] = []
    while link is not None:
        link, key = link
        parts.append(str(key)[:100])
    return ".".join([field, *reversed(parts)])


def _compile(table: sa.Table, conditions: Any, field: str) -> Any:
    if isinstance(conditions, Mapping):
        if not conditions:
            return None
        return sa.and_(
            *(
                _condition(table, name, value, f"{field}.{name}")
                for name, value in conditions.items()
            )
        )
    if isinstance(conditions, list):
        if not conditions:
            return None
        parts = []
        for i, item in enumerate(conditions):
            if not isinstance(item, Mapping):
                raise errors.ValidationError("an OR list holds objects", field=f"{field}.{i}")
            clause = _compile(table, item, f"{field}.{i}")
            parts.append(sa.true() if clause is None else clause)
        return sa.or_(*parts)
    raise errors.ValidationError("conditions are an object or a list of objects", field=field)


def _condition(table: sa.Table, name: Any, value: Any, field: str) -> sa.ColumnElement[bool]:
    column = _filter_column(table, name, field)
    clause = _value_clause(column, value, field)
    if (
        column is tasks.c.root_id
        and value is not None
        and not isinstance(value, Mapping)
        and not (isinstance(value, list) and None in value)
    ):
        # The tree index holds only tasks whose root is another task (migration 0011): a
        # task that is its own root is found by its id instead.
        by_id = _value_clause(tasks.c.id, value, field)
        return sa.or_(
            sa.and_(clause, column != tasks.c.id),
            sa.and_(by_id, clause),
        )
    return clause


def _filter_column(table: sa.Table, name: Any, field: str) -> sa.Column[Any]:
    column = _column(table, name, field)
    if _is_json(column):
        raise errors.ValidationError(
            f"column {name!r} holds JSON and cannot be filtered", field=field
        )
    return column


def _sort_column(table: sa.Table, name: Any, field: str) -> sa.Column[Any]:
    column = _column(table, name, field)
    if _is_json(column):
        raise errors.ValidationError(
            f"column {name!r} holds JSON and cannot be sorted by", field=field
        )
    return column


def compile_sort(table: sa.Table, sort: Any, field: str = "sort") -> list[sa.UnaryExpression[Any]]:
    """Compile ``sort``: a column name, or a list of names, ``{"desc": col}``, ``{"asc": col}``."""
    if sort is None:
        return []
    if isinstance(sort, str | Mapping):
        sort = [sort]
    if not isinstance(sort, list):
        raise errors.ValidationError(
            "sort is a list of column names or {'desc': name}", field=field
        )
    order = []
    for i, item in enumerate(sort):
        where = f"{field}.{i}"
        if isinstance(item, str):
            order.append(_sort_column(table, item, where).asc())
        elif isinstance(item, Mapping) and len(item) == 1:
            ((direction, name),) = item.items()
            if direction not in ("asc", "desc"):
                raise errors.ValidationError("direction is 'asc' or 'desc'", field=where)
            column = _sort_column(table, name, where)
            order.append(column.desc() if direction == "desc" else column.asc())
        else:
            raise errors.ValidationError(
                "a sort key is a column name or {'asc'|'desc': name}", field=where
            )
    return order


def compile_columns(table: sa.Table, columns: Any, field: str = "columns") -> list[sa.Column[Any]]:
    """Compile a column selection: None or ``"*"`` means all, else a list of names."""
    if columns is None or columns == "*":
        return list(table.c)
    if isinstance(columns, str):
        columns = [columns]
    if isinstance(columns, tuple):
        columns = list(columns)
    if not isinstance(columns, list) or not columns:
        raise errors.ValidationError("columns is a non-empty list of column names", field=field)
    return [_column(table, name, f"{field}.{i}") for i, name in enumerate(columns)]


def to_sql(statement: sa.ClauseElement) -> tuple[str, list[Any]]:
    """Compile a statement for asyncpg: ``$n`` placeholders and their values in order."""
    compiled = statement.compile(dialect=DIALECT, compile_kwargs={"render_postcompile": True})
    params = compiled.params
    order = getattr(compiled, "positiontup", None) or ()
    return str(compiled), [params[name] for name in order]


def select_page(
    table: sa.Table,
    *,
    where: Sequence[Any],
    columns: Sequence[sa.Column[Any]],
    order: Sequence[sa.UnaryExpression[Any]],
    offset: int,
    limit: int,
) -> sa.Select[Any]:
    """Build one page of a listing; the primary key breaks ties so pages are stable."""
    statement = sa.select(*columns).where(*where).order_by(*order, table.c.id).offset(offset)
    return statement.limit(limit)


def page_size(page: sa.Select[Any], columns: Sequence[sa.Column[Any]]) -> sa.Select[Any] | None:
    """The bytes of JSON the wide ``columns`` of a page add up to, or None when it has none.

    A wide column is JSON or free text: the ones a stage, a message or a caller can fill with up
    to megabytes. The sum is computed by the server, so a page too large to return is found
    without reading it.
    """
    wide = [c for c in columns if _is_json(c) or c.name in _FREE_TEXT]
    if not wide:
        return None
    size = sa.func.coalesce(
        sum(
            (sa.func.coalesce(sa.func.octet_length(sa.cast(c, sa.Text)), 0) for c in wide),
            sa.literal(0),
        ),
        0,
    )
    rows = page.with_only_columns(size.label("size")).subquery()
    return sa.select(sa.func.coalesce(sa.func.sum(rows.c.size), 0))


_FREE_TEXT = frozenset({"description"})


def count_rows(table: sa.Table, where: Sequence[Any]) -> sa.Select[Any]:
    """Count the rows a listing would page through."""
    return sa.select(sa.func.count()).select_from(table).where(*where)
