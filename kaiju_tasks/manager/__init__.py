"""The manager: moves tasks through their statuses on time (one active leader per database)."""

from __future__ import annotations

from kaiju_tasks.manager.loop import Manager

__all__ = ["Manager"]
