"""Fuzzing /public/rpc: whatever arrives, no 5xx, no traceback, and the server stays healthy."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kaiju_tasks.methods import Methods
from kaiju_tasks.rpc import server as rpc_server

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False)
    | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)
names = st.sampled_from([*rpc_server.SERVICE_METHODS, "app.echo", "nope", ""])
param_names = st.sampled_from(
    ["id", "data", "columns", "conditions", "sort", "offset", "limit", "count", "caller", "x"]
)
params = st.dictionaries(param_names, json_values, max_size=4) | st.lists(json_values, max_size=3)
calls = st.fixed_dictionaries(
    {"jsonrpc": st.sampled_from(["2.0", "1.0"]), "method": names},
    optional={"id": st.integers(0, 100) | st.text(max_size=5), "params": params},
)
bodies = (
    calls.map(json.dumps)
    | st.lists(calls, min_size=1, max_size=5).map(json.dumps)
    | json_values.map(json.dumps)
    | st.binary(max_size=200)
)


@pytest.fixture
async def client(aiohttp_client, make_api):
    methods = Methods()

    @methods.register("app.echo")
    def echo(*args, **kwargs):
        return [args, kwargs]

    api = make_api(methods=methods)
    token = (await api.tokens.create("root", ["system"]))["token"]
    client = await aiohttp_client(rpc_server.create_app(api))
    client.token = token
    return client


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=bodies)
async def test_any_body_gets_a_json_rpc_answer_and_never_a_5xx(client, body):
    response = await client.post(
        "/public/rpc", data=body, headers={"Authorization": f"Bearer {client.token}"}
    )
    text = await response.text()
    assert response.status in (200, 204), (response.status, text)
    assert "Traceback" not in text
    assert 'File "' not in text
    if response.status == 200:
        reply = json.loads(text)
        for item in reply if isinstance(reply, list) else [reply]:
            assert item["jsonrpc"] == "2.0"
            assert ("result" in item) != ("error" in item)
            if "error" in item:
                assert item["error"]["code"] != -32603, item  # nothing unexpected happened


async def test_server_is_healthy_after_the_fuzzing(client):
    response = await client.get("/health")
    assert response.status == 200


# -- hostile payload families ------------------------------------------------------------------
# Each family builds raw bodies a token holder could send. Whatever arrives: no 5xx, no -32603,
# no traceback in a reply or in the log, and the server's event loop never stalls: /health keeps
# answering, and a ticker task in the same loop never waits long past its wake-up time.

# Seconds a tick may come late. A loaded 2-core machine delays a tick by tens, rarely hundreds
# of milliseconds; the stalls this guards against (a backtracking regex, a template growing
# without bound) lasted many seconds: "(a+)+$" over 26 a's and a "!" once blocked the loop 12.9 s.
LOOP_LAG_BOUND = 3.0
TICK_S = 0.01


def _call(method: str, params: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}


def _create(**task: Any) -> dict[str, Any]:
    return _call("tasks.create", {"data": {"commands": [{"method": "x"}], **task}})


regex_patterns = st.sampled_from(
    ["(a+)+$", "(a|aa)+$", "(.*a){20}", "^(\\w+\\s?)*$", "[", "(?P<x>a)(?P=x)", "a{1000000}"]
)
regex_bodies = st.builds(
    lambda op, pattern, where: (
        _call("tasks.list", {"conditions": {"description": {op: pattern}}})
        if where == "list"
        else _create(
            kws={"s": "a" * 26 + "!"},
            commands=[{"method": "x", "condition": {"kws.s": {op: pattern}}}],
        )
    ),
    st.sampled_from(["match", "like"]),
    regex_patterns | st.text(max_size=40),
    st.sampled_from(["list", "create"]),
)
growing_templates = st.builds(
    lambda n, op: _create(
        kws={"s": "x" * 1000},
        commands=[{"method": "x", "params": {"t": "[!e:" + op.join(["kws.s"] * n) + "]"}}],
    ),
    st.integers(1, 2000),
    st.sampled_from(["+", "*"]),
) | st.builds(
    lambda n: _create(
        commands=[{"method": "x", "params": {"t": "[!e:" + "*".join(["2"] * n) + "]"}}]
    ),
    st.integers(500, 3000),
)


def _nested(depth: int, kind: str) -> str:
    """A JSON value nested ``depth`` deep, as text (too deep for json.dumps to build)."""
    return (
        "[" * depth + "1" + "]" * depth if kind == "list" else '{"a":' * depth + "1" + "}" * depth
    )


def _nots(depth: int) -> str:
    return '{"not":' * depth + '{"status": "QUEUED"}' + "}" * depth


def _deep(depth: int, kind: str, where: str) -> str:
    head = '{"jsonrpc": "2.0", "id": 1, "method": '
    if kind == "not":
        return head + '"tasks.list", "params": {"conditions": ' + _nots(depth) + "}}"
    if where == "kws":
        return (
            head + '"tasks.create", "params": {"data": {"commands": [{"method": "x"}], '
            '"kws": {"v": ' + _nested(depth, kind) + "}}}}"
        )
    return (
        head
        + '"tasks.list", "params": {"conditions": {"kws.v": {"eq": '
        + _nested(depth, kind)
        + "}}}}"
    )


deep_bodies = st.builds(
    _deep,
    st.sampled_from([100, 250, 600, 990, 10_000]),
    st.sampled_from(["list", "object", "not"]),
    st.sampled_from(["kws", "list"]),
)
huge_lists = st.builds(
    lambda n, split: _call(
        "tasks.list",
        {"conditions": [{"priority": list(range(n // split))} for _ in range(split)]},
    ),
    st.sampled_from([20_000, 33_000, 40_000]),
    st.sampled_from([1, 2, 4]),
)
odd_text = st.sampled_from(
    ["\\ud800", "\\udfff", "\\u0000", "\\u202e", "\\ud83d\\ude00", "\\u200f\\u05d0", "\\ufeff"]
)
odd_unicode = st.builds(
    lambda text, where: (
        '{"jsonrpc": "2.0", "id": 1, "method": "tasks.list", "params": {"conditions": {"'
        + text
        + '": {}}}}'
        if where == "key"
        else '{"jsonrpc": "2.0", "id": 1, "method": "tasks.create", "params": {"data": '
        '{"commands": [{"method": "x' + text + '"}], "kws": {"' + text + '": "' + text + '"}}}}'
    ),
    odd_text,
    st.sampled_from(["key", "value"]),
)
hostile = (
    regex_bodies.map(json.dumps)
    | growing_templates.map(json.dumps)
    | deep_bodies
    | huge_lists.map(json.dumps)
    | odd_unicode
)


async def _check(client: Any, body: str, caplog: Any) -> None:
    response = await client.post(
        "/public/rpc",
        data=body.encode("utf-8", "surrogatepass"),
        headers={"Authorization": f"Bearer {client.token}"},
    )
    text = await response.text()
    assert response.status < 500, (response.status, text[:300])
    assert "Traceback" not in text
    if response.status == 200:
        reply = json.loads(text)
        for item in reply if isinstance(reply, list) else [reply]:
            assert item.get("error", {}).get("code") != -32603, (body[:300], item)
    assert "Traceback" not in caplog.text, body[:300]


@pytest.fixture
async def big_client(aiohttp_client, make_api):
    api = make_api(
        max_body=8 * 1024 * 1024,  # let the huge payloads reach the methods
    )
    token = (await api.tokens.create("fuzz", ["view_others"]))["token"]
    client = await aiohttp_client(rpc_server.create_app(api))
    client.token = token
    return client


async def _fuzz_with_ticker(client: Any, caplog: Any, family: Any, examples: int) -> float:
    """Run ``family`` with a ticker and a /health prober beside it; return the longest lag.

    The ticker shares the server's event loop (the test client serves in-process): how late it
    wakes is how long the loop was blocked, whatever the machine's speed, and not the time
    a request took to be answered, which load stretches.
    """
    import asyncio

    loop = asyncio.get_running_loop()
    bodies = [family.example() for _ in range(examples)]  # before the ticker: not measured
    longest = 0.0
    done = asyncio.Event()

    async def ticker() -> None:
        nonlocal longest
        while not done.is_set():
            due = loop.time() + TICK_S
            await asyncio.sleep(TICK_S)
            longest = max(longest, loop.time() - due)

    async def probe() -> None:
        while not done.is_set():
            response = await client.get("/health")
            assert response.status == 200
            await asyncio.sleep(0.05)

    beside = [asyncio.create_task(ticker()), asyncio.create_task(probe())]
    try:
        for body in bodies:
            await _check(client, body, caplog)
            await asyncio.sleep(0)
    finally:
        done.set()
        await asyncio.gather(*beside)
    return longest


@pytest.mark.parametrize(
    "family",
    [
        pytest.param(odd_unicode, id="odd-unicode"),
        pytest.param(deep_bodies, id="deep-nesting"),
    ],
)
async def test_hostile_families_handled_by_the_server(big_client, caplog, family):
    """Families the server itself answers cleanly, without stalling its event loop."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # hypothesis: .example() outside @given
        lag = await _fuzz_with_ticker(big_client, caplog, family, 40)
    assert lag < LOOP_LAG_BOUND


@pytest.mark.parametrize(
    "family",
    [
        pytest.param(regex_bodies.map(json.dumps), id="regexes"),
        pytest.param(growing_templates.map(json.dumps), id="growing-templates"),
        pytest.param(huge_lists.map(json.dumps), id="huge-lists"),
    ],
)
async def test_hostile_families_bounded_by_the_services(big_client, caplog, family):
    """Families whose bounds live in templates, conditions and the list filter (limits.py)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lag = await _fuzz_with_ticker(big_client, caplog, family, 30)
    print(f"longest event-loop lag: {lag * 1000:.1f} ms")  # noqa: T201 - shown with -s
    assert lag < LOOP_LAG_BOUND
