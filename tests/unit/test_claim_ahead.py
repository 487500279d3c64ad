"""How many tasks an executor claims ahead of its free slots (executor.claim_ahead)."""

from __future__ import annotations

from typing import Any

import pytest

from kaiju_tasks.executor import Executor, claim_ahead


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


def test_runs_claimed_ahead_go_back_only_past_what_the_slots_pace_calls_for():
    # Pipeline._behind: a run that waited a second for a slot goes back to the queue when more
    # runs wait before it than the executor would claim ahead at the pace its slots go now.
    store: Any = None  # built, never started
    executor = Executor(store, concurrency=2)
    executor._claim_s = 0.005
    executor._waiting = {f"claim-{seq}": seq for seq in range(1, 301)}  # 300 runs waiting

    def released(started: int, call_s: float) -> list[int]:
        executor._call_s = call_s
        return [seq for seq in executor._waiting.values() if executor._behind(seq, started)]

    # Calls were measured at 20 µs, but no slot freed during the second of waiting: the
    # calls now last a second or more, so two are kept ahead and the other 298 go back.
    assert released(started=0, call_s=0.00002) == list(range(3, 301))
    # Steady slow stages: the runs it claimed ahead for them stay.
    executor._waiting = {"claim-1": 1, "claim-2": 2}
    assert released(started=0, call_s=10.0) == []
    # Slots going at the measured pace (2 slots, 20 µs calls: 100,000 a second): 300 waiting
    # is within the allowance; none go back.
    executor._waiting = {f"claim-{seq}": seq for seq in range(1, 301)}
    assert released(started=100_000, call_s=0.00002) == []
