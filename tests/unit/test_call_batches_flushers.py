"""rpc.client.CallBatches without HTTP: flushers, and what abandon() leaves behind."""

from __future__ import annotations

import asyncio
from typing import Any

from kaiju_tasks.rpc.client import CallBatches


class _Client:
    """Answers each call with its method name; ``hold`` keeps a batch out until released."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.hold: asyncio.Event | None = None
        self.sent = asyncio.Event()  # a batch went out

    async def call_batch(self, url: str, calls: Any, **_: Any) -> list[Any]:
        self.batches.append([method for method, _, _ in calls])
        self.sent.set()
        if self.hold is not None:
            await self.hold.wait()
        return [method for method, _, _ in calls]


def _batches(client: _Client, in_flight: int = 1) -> CallBatches:
    return CallBatches(client, "http://svc/rpc", 10, in_flight=in_flight)  # type: ignore[arg-type]


async def _call(batches: CallBatches, method: str) -> Any:
    return await batches.call(method, None, request_id=method, deadline=None, seconds_left=None)


async def test_a_call_made_as_the_last_flusher_ends_gets_a_flusher_of_its_own():
    # The caller of the first call resumes before the flusher's task is done: its next call
    # must not find the set of flushers full of one that is ending.
    batches = _batches(_Client())

    async def two_in_a_row() -> list[Any]:
        return [await _call(batches, "first"), await _call(batches, "second")]

    assert await asyncio.wait_for(two_in_a_row(), timeout=5) == ["first", "second"]


async def test_abandon_cancels_the_batches_out_and_the_calls_waiting_and_leaves_room():
    client = _Client()
    client.hold = asyncio.Event()
    batches = _batches(client)
    out = asyncio.create_task(_call(batches, "out"))
    await asyncio.wait_for(client.sent.wait(), timeout=5)  # the first batch is on its way
    waiting = asyncio.create_task(_call(batches, "waiting"))  # gathers behind it
    await asyncio.sleep(0)  # it is queued: the one flusher is busy
    batches.abandon()
    await asyncio.wait_for(asyncio.wait([waiting]), timeout=5)
    assert waiting.cancelled()  # its call dropped before it went out
    out.cancel()  # the executor cancels the callers of the batches out
    await asyncio.wait([out])
    # A call made afterwards goes out at once, in a batch of its own.
    client.hold = None
    assert await asyncio.wait_for(_call(batches, "later"), timeout=5) == "later"
    assert client.batches == [["out"], ["later"]]
