"""Waits shared by the engine tests."""

from __future__ import annotations

from kaiju_tasks.testing import eventually


async def wait_for(store, task_id, *statuses, within=10.0):
    """Poll the task row until it reaches one of ``statuses``; return the row."""

    async def reached():
        row = await store.get_task(task_id)
        return row if row is not None and row["status"] in statuses else None

    return await eventually(
        reached, within=within, interval=0.01, what=f"task {task_id} in {statuses}"
    )
