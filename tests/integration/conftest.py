"""Fixtures shared by the integration tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.proxy import FreezableProxy, proxied


@pytest.fixture
async def proxy_dsn(dsn: str) -> AsyncIterator[tuple[str, FreezableProxy]]:
    """The test database's DSN through a proxy that ``freeze()`` silences, and the proxy."""
    async with proxied(dsn) as pair:
        yield pair
