"""Applies the top-level ``migrations/`` (shipped inside the wheel as package data).

Migrations are forward-only files ``NNNN_description.sql`` applied in order, each in its own
transaction, under a session advisory lock so that concurrent starts are safe, and recorded in
``kaiju_tasks_migrations``. Re-running is a no-op.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from importlib import resources
from importlib.abc import Traversable
from pathlib import Path

import asyncpg

from kaiju_tasks import errors, redact

logger = logging.getLogger(__name__)

MIGRATION_LOCK_KEY = 0x6B61696A75  # "kaiju": an arbitrary, fixed advisory lock key
_NAME = re.compile(r"^(\d{4})_(\w+)\.sql$")


@dataclasses.dataclass(frozen=True, slots=True)
class Migration:
    """One migration file."""

    version: int
    name: str
    sql: str


def _migrations_dir() -> Traversable:
    try:
        return resources.files("kaiju_tasks.migrations")
    except ModuleNotFoundError:  # running from a source checkout without installing
        return Path(__file__).resolve().parents[2] / "migrations"


def available() -> list[Migration]:
    """Return every shipped migration, in version order."""
    found = []
    for entry in _migrations_dir().iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), match.group(2), entry.read_text("utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise errors.MigrationError("two migrations share a version number")
    return found


async def applied(connection: asyncpg.Connection) -> list[int]:
    """Return the versions already applied (empty before the first migration)."""
    exists = await connection.fetchval("SELECT to_regclass('kaiju_tasks_migrations') IS NOT NULL")
    if not exists:
        return []
    rows = await connection.fetch("SELECT version FROM kaiju_tasks_migrations ORDER BY version")
    return [row["version"] for row in rows]


async def check_current(dsn: str) -> None:
    """Raise MigrationError, saying what to run, unless every shipped migration is applied."""
    try:
        connection = await asyncpg.connect(dsn)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, ValueError, TypeError) as exc:
        raise errors.MigrationError(redact.connect_failure(exc)) from None
    try:
        done = set(await applied(connection))
    finally:
        await connection.close()
    missing = [m for m in available() if m.version not in done]
    if missing:
        raise errors.MigrationError(
            f"the database lacks {len(missing)} migration(s) "
            f"({', '.join(f'{m.version:04d}_{m.name}' for m in missing)}): "
            "run `kaiju-tasks migrate` first"
        )


async def migrate(dsn_or_connection: str | asyncpg.Connection) -> list[int]:
    """Apply every pending migration; return the versions applied by this call."""
    if not isinstance(dsn_or_connection, str):
        return await _migrate(dsn_or_connection)
    try:
        connection = await asyncpg.connect(dsn_or_connection)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, ValueError, TypeError) as exc:
        raise errors.MigrationError(redact.connect_failure(exc)) from None
    try:
        return await _migrate(connection)
    finally:
        await connection.close()


async def _migrate(connection: asyncpg.Connection) -> list[int]:
    done: list[int] = []
    await connection.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
    try:
        await connection.execute(
            "CREATE TABLE IF NOT EXISTS kaiju_tasks_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        already = set(await applied(connection))
        for migration in available():
            if migration.version in already:
                continue
            try:
                async with connection.transaction():
                    await connection.execute(migration.sql)
                    await connection.execute(
                        "INSERT INTO kaiju_tasks_migrations (version, name) VALUES ($1, $2)",
                        migration.version,
                        migration.name,
                    )
            except asyncpg.PostgresError as exc:
                raise errors.MigrationError(
                    f"migration {migration.version:04d}_{migration.name} failed: {exc}"
                ) from exc
            logger.info(
                "Migration applied",
                extra={
                    "event": "migration_applied",
                    "version": migration.version,
                    "migration": migration.name,
                },
            )
            done.append(migration.version)
    finally:
        await connection.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
    return done
