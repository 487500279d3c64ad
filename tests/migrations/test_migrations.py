"""Zero to head; head again is a no-op; concurrent runs; tables match the migrated schema."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
import sqlalchemy as sa

from kaiju_tasks import errors
from kaiju_tasks.store import base, migrate, tables


async def test_migrate_takes_an_empty_database_to_head(empty_dsn):
    applied = await migrate.migrate(empty_dsn)
    assert applied == [m.version for m in migrate.available()]
    connection = await asyncpg.connect(empty_dsn)
    try:
        names = {
            r["tablename"]
            for r in await connection.fetch(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
            )
        }
        recorded = await migrate.applied(connection)
    finally:
        await connection.close()
    assert {"tasks", "notifications", "kaiju_tasks_migrations"} <= names
    assert recorded == applied


async def test_migrating_again_at_head_is_a_no_op(empty_dsn):
    await migrate.migrate(empty_dsn)
    assert await migrate.migrate(empty_dsn) == []


async def test_two_concurrent_migrations_both_succeed_and_apply_each_file_once(empty_dsn):
    first, second = await asyncio.gather(migrate.migrate(empty_dsn), migrate.migrate(empty_dsn))
    heads = [m.version for m in migrate.available()]
    assert sorted(first + second) == heads
    connection = await asyncpg.connect(empty_dsn)
    try:
        assert await migrate.applied(connection) == heads
    finally:
        await connection.close()


async def test_migrations_ship_as_ordered_numbered_files():
    found = migrate.available()
    assert found, "no migrations found"
    assert [m.version for m in found] == list(range(1, len(found) + 1))


async def test_sqlalchemy_tables_match_the_migrated_schema(dsn):
    connection = await asyncpg.connect(dsn)
    try:
        for table in tables.metadata.sorted_tables:
            rows = await connection.fetch(
                "SELECT column_name, data_type, is_nullable, collation_name"
                " FROM information_schema.columns"
                " WHERE table_schema = 'public' AND table_name = $1 ORDER BY ordinal_position",
                table.name,
            )
            in_db = {
                r["column_name"]: (r["data_type"], r["is_nullable"] == "YES", r["collation_name"])
                for r in rows
            }
            declared = {
                c.name: (
                    _pg_type(c.type),
                    c.nullable and not c.primary_key,
                    getattr(c.type, "collation", None),
                )
                for c in table.columns
            }
            assert in_db == declared, table.name
    finally:
        await connection.close()


def _pg_type(column_type: sa.types.TypeEngine[object]) -> str:
    from sqlalchemy.dialects import postgresql as pg

    return {
        sa.Text: "text",
        sa.Integer: "integer",
        sa.SmallInteger: "smallint",
        sa.BigInteger: "bigint",
        sa.Boolean: "boolean",
        pg.JSONB: "jsonb",
        sa.DateTime: "timestamp with time zone",
    }[type(column_type)]


async def test_migration_failure_is_reported_and_rolled_back(empty_dsn, monkeypatch):
    bad = migrate.Migration(999, "broken", "CREATE TABLE half_done (x int); SELECT no_such_fn();")
    monkeypatch.setattr(migrate, "available", lambda: [bad])
    with pytest.raises(errors.MigrationError, match="0999_broken"):
        await migrate.migrate(empty_dsn)
    connection = await asyncpg.connect(empty_dsn)
    try:
        assert await connection.fetchval("SELECT to_regclass('half_done')") is None
        assert await migrate.applied(connection) == []
    finally:
        await connection.close()


async def test_identifiers_compare_byte_by_byte_whatever_the_database_locale(dsn):
    connection = await asyncpg.connect(dsn)
    try:
        rows = await connection.fetch(
            "SELECT table_name, column_name, collation_name FROM information_schema.columns"
            " WHERE table_schema = 'public' AND data_type IN ('text', 'ARRAY')"
        )
    finally:
        await connection.close()
    collations = {(r["table_name"], r["column_name"]): r["collation_name"] for r in rows}
    free_text = {("tasks", "description"), ("tasks", "cron"), ("executors", "host")}
    for (table, column), collation in collations.items():
        if table == "kaiju_tasks_migrations" or (table, column) in free_text or column == "name":
            assert collation is None, (table, column)
        elif (table, column) != ("tokens", "permissions"):
            assert collation == "C", (table, column)


def test_the_store_knows_which_task_columns_hold_times():
    # The service writes these as ISO 8601 text and the bulk path stores them in UTC.
    timestamps = {c.name for c in tables.tasks.columns if isinstance(c.type, sa.DateTime)}
    assert timestamps == base.TIME_COLUMNS
    assert set(base.NEW_TASK_COLUMNS) <= {c.name for c in tables.tasks.columns}
