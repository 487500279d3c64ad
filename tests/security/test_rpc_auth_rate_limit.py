"""Failed authentications are rate-limited per client address, counted on /metrics."""

from __future__ import annotations

import json
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from kaiju_tasks import cli, config
from kaiju_tasks.rpc import server as rpc_server

FAILURES = 5
LIST = {"jsonrpc": "2.0", "id": 1, "method": "tasks.list", "params": {"columns": ["id"]}}


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
async def api(make_api: Any, registry: CollectorRegistry) -> rpc_server.Api:
    return make_api(
        auth_failures=FAILURES,
        auth_window=3600.0,  # no try is earned back during a test
        trusted_proxies=config.networks("127.0.0.1"),
        on_auth_refused=cli.auth_counter(registry),
    )


@pytest.fixture
async def client(aiohttp_client: Any, api: rpc_server.Api) -> Any:
    return await aiohttp_client(rpc_server.create_app(api))


async def _post(client: Any, token: str, forwarded: str | None = None) -> tuple[int, Any, Any]:
    headers = {"Authorization": f"Bearer {token}"}
    if forwarded:
        headers["X-Forwarded-For"] = forwarded
    response = await client.post("/public/rpc", data=json.dumps(LIST), headers=headers)
    return response.status, await response.json(), response.headers


def _metric(registry: CollectorRegistry, reason: str) -> float:
    for line in generate_latest(registry).decode().splitlines():
        if line.startswith(f'kaiju_tasks_auth_refused_total{{reason="{reason}"}}'):
            return float(line.split()[-1])
    raise AssertionError(f"no series for {reason}")


async def test_an_address_over_its_failures_gets_429_with_retry_after(client, api, registry):
    good = (await api.tokens.create("alice"))["token"]
    for _ in range(FAILURES):
        status, reply, _ = await _post(client, "kt_wrong", forwarded="203.0.113.7")
        assert (status, reply["error"]["code"]) == (200, -32001)
    status, reply, headers = await _post(client, "kt_wrong", forwarded="203.0.113.7")
    assert status == 429
    assert reply["error"]["code"] == -32008
    assert "too many failed authentications" in reply["error"]["message"]
    assert int(headers["Retry-After"]) >= 1
    assert reply["error"]["data"]["retry_after"] == int(headers["Retry-After"])
    # while limited, the address is refused before its token is looked at, a valid one included
    status, _, _ = await _post(client, good, forwarded="203.0.113.7")
    assert status == 429
    # another address is not affected
    status, reply, _ = await _post(client, good, forwarded="198.51.100.1")
    assert (status, "result" in reply) == (200, True)
    assert _metric(registry, "invalid") == FAILURES
    assert _metric(registry, "rate_limited") == 2
    assert (await client.get("/health")).status == 200  # health is never limited


async def test_a_forwarded_for_header_from_an_untrusted_peer_is_ignored(aiohttp_client, make_api):
    api = make_api(
        auth_failures=FAILURES,
        auth_window=3600.0,
    )  # no trusted proxies: the peer (127.0.0.1) is the client whatever the header says
    client = await aiohttp_client(rpc_server.create_app(api))
    for i in range(FAILURES):
        await _post(client, "kt_wrong", forwarded=f"10.0.0.{i}")
    status, _, _ = await _post(client, "kt_wrong", forwarded="10.0.0.99")
    assert status == 429


async def test_a_flood_of_wrong_tokens_is_mostly_refused_before_any_lookup(client, api, registry):
    sent = 2000
    statuses = []
    for _ in range(sent):
        status, _, _ = await _post(client, "kt_" + "x" * 43, forwarded="203.0.113.9")
        statuses.append(status)
    assert statuses.count(200) == FAILURES
    assert statuses.count(429) == sent - FAILURES
    assert _metric(registry, "invalid") == FAILURES


def test_the_table_of_addresses_is_bounded_and_tries_are_earned_back():
    now = [0.0]
    limiter = rpc_server.AuthLimiter(failures=2, window=10.0, clients=100, now=lambda: now[0])
    for i in range(1000):
        limiter.failed(f"10.0.{i // 256}.{i % 256}")
    assert len(limiter) == 100
    limiter.failed("a")
    limiter.failed("a")
    assert limiter.retry_after("a") == pytest.approx(5.0)  # one try per 10 s / 2
    now[0] = 5.0
    assert limiter.retry_after("a") == 0
    assert limiter.retry_after("never-failed") == 0


async def test_forwarded_for_is_walked_from_the_right_skipping_trusted_proxies(client):
    # the peer 127.0.0.1 is trusted; so is the hop it appended: the client is 198.51.100.20
    for _ in range(FAILURES):
        await _post(client, "kt_wrong", forwarded="192.0.2.1, 198.51.100.20, 127.0.0.1")
    status, _, _ = await _post(client, "kt_wrong", forwarded="198.51.100.20")
    assert status == 429
    status, _, _ = await _post(client, "kt_wrong", forwarded="192.0.2.1")
    assert status == 200  # the left-most hop, which a client can write, was not the key
