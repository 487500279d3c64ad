"""Opening the PostgreSQL store for the public read APIs that are handed a pool or a DSN.

``DashboardData(pool)``, ``EventReceiver(dsn)`` and
``State.rebuild(dsn)`` take a pool or a DSN rather than a store; they open one here, so that
nothing outside ``store/`` and the composition root names the PostgreSQL store.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from kaiju_tasks.store import postgres


def store_on(pool: Any) -> postgres.PostgresTaskStore:
    """The PostgreSQL store on an asyncpg pool."""
    return postgres.PostgresTaskStore(pool)


@contextlib.asynccontextmanager
async def connect(
    dsn: str, *, application_name: str, min_size: int = 1, max_size: int = 2
) -> AsyncIterator[postgres.PostgresTaskStore]:
    """A store on a pool of its own, closed on exit."""
    pool = await postgres.create_pool(
        dsn, min_size=min_size, max_size=max_size, application_name=application_name
    )
    try:
        yield postgres.PostgresTaskStore(pool)
    finally:
        await pool.close()
