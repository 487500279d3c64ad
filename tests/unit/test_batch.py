"""The Batcher's group commit: one write for the items that gather, each caller its own answer."""

from __future__ import annotations

import asyncio

import pytest

from kaiju_tasks.batch import Batcher, applied_ids, applied_rows


class Store:
    """A write that records its batches and waits for a gate before it returns."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.called = asyncio.Event()
        self.gate = asyncio.Event()
        self.gate.set()
        self.refuse: set[str] = set()  # ids whose presence fails the whole write
        self.applies: set[str] | None = None  # ids that apply (default: all)

    async def write(self, items):
        ids = [item["id"] for item in items]
        self.batches.append(ids)
        self.called.set()
        await self.gate.wait()
        bad = self.refuse.intersection(ids)
        if bad:
            raise RuntimeError(f"cannot write {sorted(bad)}")
        return {i for i in ids if self.applies is None or i in self.applies}


async def written(store: Store) -> None:
    """Wait until the first write has started (it then holds the items submitted so far)."""
    await asyncio.wait_for(store.called.wait(), 10)


async def test_a_lone_item_is_written_at_once_and_its_caller_learns_whether_it_applied():
    store = Store()
    batcher = Batcher(store.write, applied_ids)
    assert await batcher.submit({"id": "a"}) is True
    store.applies = set()
    assert await batcher.submit({"id": "b"}) is False
    assert store.batches == [["a"], ["b"]]


async def test_items_submitted_during_a_write_go_together_in_the_next_one():
    store = Store()
    store.gate.clear()
    batcher = Batcher(store.write, applied_ids)
    first = asyncio.create_task(batcher.submit({"id": "first"}))
    await written(store)
    store.applies = {"first", "x2"}
    others = [asyncio.create_task(batcher.submit({"id": f"x{i}"})) for i in range(5)]
    await asyncio.sleep(0)
    store.gate.set()
    assert await first is True
    assert await asyncio.gather(*others) == [False, False, True, False, False]
    assert store.batches == [["first"], ["x0", "x1", "x2", "x3", "x4"]]


async def test_a_batch_never_holds_more_than_max_batch_items():
    store = Store()
    store.gate.clear()
    batcher = Batcher(store.write, applied_ids, max_batch=3)
    waiting = [asyncio.create_task(batcher.submit({"id": f"t{i}"})) for i in range(8)]
    await written(store)
    store.gate.set()
    assert await asyncio.gather(*waiting) == [True] * 8
    assert [len(batch) for batch in store.batches] == [3, 3, 2]
    assert sorted(i for batch in store.batches for i in batch) == sorted(f"t{i}" for i in range(8))


async def test_each_batch_is_written_in_id_order_so_two_batches_lock_rows_alike():
    store = Store()
    store.gate.clear()
    batcher = Batcher(store.write, applied_ids)
    waiting = [asyncio.create_task(batcher.submit({"id": i})) for i in ["c", "a", "b"]]
    await written(store)
    store.gate.set()
    await asyncio.gather(*waiting)
    assert store.batches == [["a", "b", "c"]]


async def test_a_failing_write_fails_every_caller_whose_item_it_held():
    store = Store()
    store.gate.clear()
    batcher = Batcher(store.write, applied_ids)
    store.refuse = {"a", "b", "c"}  # e.g. the database is down: every item fails
    waiting = [asyncio.create_task(batcher.submit({"id": i})) for i in "abc"]
    await written(store)
    store.gate.set()
    results = await asyncio.gather(*waiting, return_exceptions=True)
    assert [type(r) for r in results] == [RuntimeError] * 3
    assert all("cannot write" in str(r) for r in results)


async def test_one_bad_item_fails_only_its_caller_and_the_others_are_written():
    store = Store()
    store.gate.clear()
    batcher = Batcher(store.write, applied_ids)
    store.refuse = {"bad"}
    waiting = [asyncio.create_task(batcher.submit({"id": i})) for i in ["a", "bad", "c"]]
    await written(store)
    store.gate.set()
    a, bad, c = await asyncio.gather(*waiting, return_exceptions=True)
    assert (a, c) == (True, True)
    assert isinstance(bad, RuntimeError)
    assert str(bad) == "cannot write ['bad']"
    # Tried together first, then one by one.
    assert store.batches == [["a", "bad", "c"], ["a"], ["bad"], ["c"]]


async def test_the_batcher_keeps_working_after_a_failed_write():
    store = Store()
    batcher = Batcher(store.write, applied_ids)
    store.refuse = {"a"}
    with pytest.raises(RuntimeError):
        await batcher.submit({"id": "a"})
    assert await batcher.submit({"id": "b"}) is True


async def test_a_cancelled_write_cancels_every_caller_waiting_on_it():
    store = Store()
    store.gate.clear()
    batcher = Batcher(store.write, applied_ids)
    waiting = [asyncio.create_task(batcher.submit({"id": i})) for i in "ab"]
    await written(store)
    flush = batcher._flushing
    assert flush is not None
    flush.cancel()
    results = await asyncio.gather(*waiting, return_exceptions=True)
    assert all(isinstance(r, asyncio.CancelledError) for r in results)


def test_applied_ids_says_whether_the_items_id_applied():
    assert applied_ids({"a", "b"}, {"id": "a"}) is True
    assert applied_ids({"a", "b"}, {"id": "c"}) is False


def test_applied_rows_finds_the_items_row_or_none():
    rows = [{"id": "a", "status": "FINISHED"}, {"id": "b", "status": "FAILED"}]
    assert applied_rows(rows, {"id": "b"}) == {"id": "b", "status": "FAILED"}
    assert applied_rows(rows, {"id": "c"}) is None
