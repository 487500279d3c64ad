"""How many tasks an executor claims ahead of its free slots (executor.claim_ahead)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from kaiju_tasks.executor import Executor, claim_ahead
from kaiju_tasks.testing import eventually


def test_until_both_times_are_measured_it_claims_up_to_one_round_of_slots() -> None:
    assert claim_ahead(40, 10, None, None) == 10
    assert claim_ahead(40, 10, 0.005, None) == 10
    assert claim_ahead(40, 10, None, 0.001) == 10
    assert claim_ahead(4, 10, None, None) == 4


def test_short_stages_get_the_whole_allowance() -> None:
    # 10 slots freeing every 20 µs while a 5 ms claim is out: far more than 40 would do.
    assert claim_ahead(40, 10, 0.005, 0.00002) == 40


def test_long_stages_get_one_or_two() -> None:
    assert claim_ahead(40, 10, 0.005, 1.0) == 2  # 10 x 5 ms / 1 s = 0.05 -> 1, plus one
    assert claim_ahead(40, 2, 0.005, 30.0) == 2


def test_in_between_it_follows_the_ratio_of_claim_to_call_time() -> None:
    # 10 slots, calls of 10 ms, claims of 5 ms: 5 slots free per claim, plus one.
    assert claim_ahead(40, 10, 0.005, 0.010) == 6


@pytest.mark.parametrize("call_s", [0.0, 1e-9])
def test_a_zero_call_time_is_the_whole_allowance_not_an_error(call_s: float) -> None:
    assert claim_ahead(40, 10, 0.005, call_s) == 40


def test_prefetch_zero_claims_nothing_ahead() -> None:
    assert claim_ahead(0, 10, None, None) == 0
    assert claim_ahead(0, 10, 0.005, 0.00001) == 0


def test_an_executor_of_batched_apps_only_claims_enough_to_fill_its_batches():
    urls = {"shop": "http://shop/rpc", "mail": "http://mail/rpc"}
    store: Any = None  # built, never started

    def capacity(apps: list[str], batch: dict[str, int]) -> int:
        return Executor(store, apps=apps, app_urls=urls, app_batch=batch, concurrency=4).capacity

    assert capacity(["shop"], {}) == 4  # unbatched: a slot per call
    assert capacity(["shop"], {"shop": 50}) == 200  # 4 requests of up to 50 calls
    # The smallest batch: mail's 4 requests carry no more than 80 calls.
    assert capacity(["shop", "mail"], {"shop": 50, "mail": 20}) == 80
    # One unbatched app among them: its tasks would wait for slots, so no more than 4.
    assert capacity(["shop", "mail"], {"shop": 50}) == 4
    assert capacity(["shop"], {"shop": 1}) == 4  # batch=1 is no batching
    debug = Executor(store, apps=["shop"], app_urls=urls, app_batch={"shop": 50}, debug=True)
    assert debug.capacity == 10 * 50  # its private queue is batched as the app


def test_runs_claimed_ahead_go_back_only_when_the_slots_slowed_down_and_past_what_they_need():
    # Pipeline._behind: a run that waited a second for a slot goes back to the queue when the
    # slots started calls at less than half the measured pace meanwhile, and more runs wait
    # before it than the executor would claim ahead at that pace.
    store: Any = None  # built, never started
    executor = Executor(store, concurrency=2)
    executor._claim_s = 0.005

    def released(started: int, call_s: float, waiting: int) -> list[int]:
        executor._call_s, executor._stalled_s = call_s, None
        executor._waiting = {f"claim-{seq}": seq for seq in range(1, waiting + 1)}
        return [seq for seq in executor._waiting.values() if executor._behind(seq, started)]

    # Calls were measured at 20 µs, but no slot freed during the second of waiting: the
    # calls now last a second or more, so two are kept ahead and the other 298 go back, and
    # claims are sized by that pace (two ahead) until a call ends.
    assert released(started=0, call_s=0.00002, waiting=300) == list(range(3, 301))
    assert executor._ahead() == 2
    # Steady slow stages (10 s, measured): the runs claimed ahead for them wait their turn.
    assert released(started=0, call_s=10.0, waiting=2) == []
    assert released(started=0, call_s=1.5, waiting=5) == []
    # Slots going at the measured pace (2 slots, 20 µs calls: 100,000 a second): none go back.
    assert released(started=100_000, call_s=0.00002, waiting=300) == []


async def test_a_run_claimed_ahead_keeps_its_turn_and_its_slot_across_the_checks(monkeypatch):
    # Pipeline._first_slot checks every HOLD_S whether to hand the run back; between checks the
    # run stays in line: one waiting since before is served first, and no slot is lost.
    from kaiju_tasks.executor import pipeline

    monkeypatch.setattr(pipeline, "HOLD_S", 0.02)
    store: Any = None  # built, never started
    executor = Executor(store, concurrency=1)
    executor._call_s = 60.0  # long calls, measured: the slots' pace is no stall
    await executor._slots.acquire()  # the one slot is busy
    order: list[str] = []

    async def wait(name: str) -> None:
        row: Any = {"id": name, "claim_id": f"claim-{name}"}
        assert await executor._first_slot(row)
        order.append(name)
        executor._slots.release()

    first = asyncio.create_task(wait("a"))
    await eventually(lambda: "claim-a" in executor._waiting)
    second = asyncio.create_task(wait("b"))
    # Both go through several checks before the slot frees.
    await eventually(lambda: executor._queued_runs == 2 and len(executor._waiting) == 2)
    await asyncio.sleep(0.1)  # five checks of each: a lower bound, not a race
    executor._slots.release()
    await asyncio.gather(first, second)
    assert order == ["a", "b"]
    assert executor._waiting == {}
    assert not executor._slots.locked()  # the one slot is free again, not lost nor doubled
    assert executor._slots._value == 1
