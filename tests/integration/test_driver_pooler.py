"""store/driver.py's PoolerConnection still reaches asyncpg: fails loudly after an upgrade.

PoolerConnection overrides asyncpg's private ``Connection._execute`` (the one path ``fetch``,
``fetchrow``, ``fetchval`` and ``execute`` with arguments share) to run each parameterised
statement outside a transaction in one of its own, which a transaction pooler keeps on one
server connection. If an asyncpg release renames or bypasses that method, the override is
silently never called and statements through PgBouncer break only under load; these tests
fail instead. Whether a statement ran in a transaction block is what the server last reported
(ReadyForQuery's status, asyncpg's ``is_in_transaction``) when asyncpg's own ``_execute`` runs.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from kaiju_tasks.store import driver

QUERY = "SELECT $1::int AS n"
BASE_EXECUTE = asyncpg.Connection._execute


@pytest.fixture
def in_block(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, bool]]:
    """(query, whether in a transaction block) of each call of asyncpg's own ``_execute``."""
    seen: list[tuple[str, bool]] = []

    async def spy(self: Any, query: str, *rest: Any, **options: Any) -> Any:
        seen.append((query, self.is_in_transaction()))
        return await BASE_EXECUTE(self, query, *rest, **options)

    monkeypatch.setattr(asyncpg.Connection, "_execute", spy)
    return seen


def test_asyncpg_still_has_the_method_the_pooler_overrides() -> None:
    base = vars(asyncpg.Connection).get("_execute")
    assert base is not None, f"asyncpg {asyncpg.__version__} has no Connection._execute"
    names = list(inspect.signature(base).parameters)
    assert names[:5] == ["self", "query", "args", "limit", "timeout"], names
    assert vars(driver.PoolerConnection)["_execute"] is not base


@pytest.fixture
async def pooler_pool(dsn: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await driver.create_pool(dsn, min_size=1, max_size=1, pooler=True)
    try:
        yield pool
    finally:
        await pool.close()


async def test_every_parameterised_call_goes_through_the_override(
    pooler_pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch, in_block: list[tuple[str, bool]]
) -> None:
    calls: list[str] = []
    override = driver.PoolerConnection._execute

    async def spy(self: Any, query: str, args: Any, *rest: Any, **options: Any) -> Any:
        calls.append(query)
        return await override(self, query, args, *rest, **options)

    monkeypatch.setattr(driver.PoolerConnection, "_execute", spy)
    async with pooler_pool.acquire() as connection:
        assert (await connection.fetch(QUERY, 1))[0]["n"] == 1
        row = await connection.fetchrow(QUERY, 2)
        assert row is not None
        assert row["n"] == 2
        assert await connection.fetchval(QUERY, 3) == 3
        assert await connection.execute(QUERY, 4) == "SELECT 1"
        assert not connection.is_in_transaction()  # each transaction of its own has ended
    assert calls == [QUERY] * 4, "asyncpg no longer calls PoolerConnection._execute"
    assert in_block == [(QUERY, True)] * 4


async def test_a_statement_in_a_transaction_is_left_to_it(
    pooler_pool: asyncpg.Pool, in_block: list[tuple[str, bool]]
) -> None:
    async with pooler_pool.acquire() as connection, connection.transaction():
        assert await connection.fetchval(QUERY, 1) == 1
        assert await connection.fetchval(QUERY, 2) == 2
    assert in_block == [(QUERY, True)] * 2


async def test_a_plain_connection_runs_it_outside_a_block(
    dsn: str, in_block: list[tuple[str, bool]]
) -> None:
    """Without the pooler option the same call runs outside any block: the spy can tell."""
    pool = await driver.create_pool(dsn, min_size=1, max_size=1)
    try:
        async with pool.acquire() as connection:
            assert await connection.fetchval(QUERY, 1) == 1
    finally:
        await pool.close()
    assert in_block == [(QUERY, False)]
