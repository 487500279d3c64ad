"""Group commit: many tasks' writes of one kind go to the database in one statement.

Each caller awaits its own item; while one flush is in flight, new items gather, and the next
flush takes them all. No timer is involved: a lone item is written at once, and under load the
batch grows by itself. Every item is still committed before its caller continues, so a stage's
result is durable before the next stage starts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Generic, TypeVar

R = TypeVar("R")
Row = TypeVar("Row", bound=Mapping[str, Any])

DEFAULT_MAX_BATCH = 500


class Batcher(Generic[R]):
    """Runs ``write(items)`` for gathered items; each caller gets ``pick(result, item)``."""

    def __init__(
        self,
        write: Callable[[list[dict[str, Any]]], Awaitable[R]],
        pick: Callable[[R, dict[str, Any]], Any],
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
    ) -> None:
        self._write = write
        self._pick = pick
        self._max_batch = max_batch
        self._pending: list[tuple[dict[str, Any], asyncio.Future[Any]]] = []
        self._flushing: asyncio.Task[None] | None = None

    async def submit(self, item: dict[str, Any]) -> Any:
        """Queue ``item`` and return its part of the result once it is committed."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        while self._pending:
            batch = self._pending[: self._max_batch]
            del self._pending[: self._max_batch]
            # Rows are locked in id order by every batch, so two batches cannot deadlock.
            batch.sort(key=lambda entry: str(entry[0].get("id")))
            await self._write_batch(batch)

    async def _write_batch(self, batch: list[tuple[dict[str, Any], asyncio.Future[Any]]]) -> None:
        try:
            result = await self._write([item for item, _ in batch])
        except asyncio.CancelledError as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            raise
        except Exception as exc:  # noqa: BLE001 - every waiter must learn about the failure
            if len(batch) > 1:  # one bad item must not sink the others: write them one by one
                for entry in batch:
                    await self._write_batch([entry])
                return
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for item, future in batch:
            if not future.done():
                future.set_result(self._pick(result, item))


def applied_ids(result: set[str], item: dict[str, Any]) -> bool:
    """``pick`` for writes that return the set of ids that applied."""
    return item["id"] in result


def applied_rows(result: Sequence[Row], item: dict[str, Any]) -> Row | None:
    """``pick`` for writes that return the rows that applied (each with its ``id``)."""
    for row in result:
        if row["id"] == item["id"]:
            return row
    return None
