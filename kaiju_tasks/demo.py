"""The demo of ``kaiju-tasks run --demo``: example methods and a pipeline that uses them.

The pipeline fetches "orders", counts the expired ones with a template, skips or runs a stage by
a condition, sleeps durably on a Timer, and reports, so that a newcomer sees a task go through
its stages (``tasks.get`` shows ``stage`` and ``result`` grow).
"""

from __future__ import annotations

from typing import Any

from kaiju_tasks import methods as methods_
from kaiju_tasks import models

APP = "demo"


def register(registry: methods_.Methods) -> None:
    """Register the demo methods."""

    @registry.register("demo.orders.list")
    def list_orders(expired: bool = False) -> dict[str, Any]:
        orders = [
            {"id": "A-1", "expired": True},
            {"id": "A-2", "expired": False},
            {"id": "A-3", "expired": True},
        ]
        return {"data": [o for o in orders if o["expired"] or not expired]}

    @registry.register("demo.orders.delete")
    def delete_orders(ids: list[str]) -> dict[str, Any]:
        return {"deleted": ids, "count": len(ids)}

    @registry.register("demo.report")
    def report(text: str) -> str:
        return text


async def submit(tasks: Any) -> dict[str, Any]:
    """Create the demo pipeline and return it."""
    result: dict[str, Any] = await tasks.create(
        models.Task(
            app=APP,
            description="kaiju-tasks demo: templates, a condition and a durable timer",
            commands=[
                models.TaskCommand(method="demo.orders.list", params={"expired": True}),
                models.TaskCommand(
                    method="demo.orders.delete",
                    params={"ids": "[0.data.id]"},
                    condition={"0.data": {"ne": []}},
                ),
                models.Timer(3),
                models.TaskCommand(
                    method="demo.report",
                    params={
                        "text": "[!f:deleted {1.count} expired orders: {!x:join:`, `:1.deleted}]"
                    },
                ),
            ],
            kws={"requested_by": "demo"},
            notify=True,
        )
    )
    return result
